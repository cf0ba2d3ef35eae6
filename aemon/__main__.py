"""``python -m aemon`` and the ``aemon`` program: the command line.

For ``aemon run``, SIGHUP is held from the first instruction (the daemon takes it once it can reload):
before, a reload asked in the first few hundred milliseconds, while Python imported the command line,
ended the process.
"""

import signal
import sys


def main() -> int:
    """Run the command line (:func:`aemon.cli.main`)."""
    verbs = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if verbs[:1] == ["run"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from aemon.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
