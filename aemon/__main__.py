"""``python -m aemon`` and the ``aemon`` program: the command line.

For ``aemon run``, SIGHUP and SIGTERM are held from the first instruction (the daemon takes them once its
handlers are in place): before, a reload or a stop asked in the first few hundred milliseconds, while
Python imported the command line, ended the process by the signal.
"""

import signal
import sys


def main() -> int:
    """Run the command line (:func:`aemon.cli.main`)."""
    verbs = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if verbs[:1] == ["run"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM})
    from aemon.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
