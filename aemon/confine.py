"""Keep the files that libraries write on their own (config, caches, temp files) under the root.

Keras writes ``~/.keras/keras.json``, matplotlib its font cache under ``~/.cache`` or
``~/.config``, TensorFlow's autograph its generated sources in ``$TMPDIR``. The daemon points
all of them into ``.aemon/`` before any of those libraries is imported; its temp folder lies in
its own claims folder, so it is removed with that folder (also after a SIGKILL, by the daemon
that adopts it).

It also keeps libraries that the daemon never uses from loading: Keras imports matplotlib's
pyplot and scikit-learn (with scipy) whenever they are installed, which costs seconds of start-up
in every process (:func:`skip_unused_imports`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["UNUSED_BY_DAEMON", "confine_libraries", "skip_unused_imports"]

#: Optional libraries that Keras or TensorFlow import at start-up when installed, and that no step of
#: the daemon's item path uses (plots are drawn by ``evaluate --report`` only).
UNUSED_BY_DAEMON = ("matplotlib", "sklearn", "scipy", "pandas")


def skip_unused_imports() -> list[str]:
    """Make :data:`UNUSED_BY_DAEMON` unimportable in this process, before TensorFlow is imported.

    Keras guards these imports (``except ImportError``), so it loads as if they were not installed:
    ``import tensorflow`` measured 6.1 s with them installed and about 2 s less without
    (``python -X importtime``, scikit-learn 1.3 s, matplotlib 0.8 s). Only for processes that run
    the daemon; one already imported is left alone.

    Returns:
        The names made unimportable.
    """
    import sys

    skipped = [name for name in UNUSED_BY_DAEMON if name not in sys.modules]
    for name in skipped:
        sys.modules[name] = None  # the import system raises ModuleNotFoundError for a None entry
    return skipped


#: The libraries' folders under ``root/.aemon``, by the variable that points a library there.
LIBRARY_FOLDERS = {"KERAS_HOME": "keras", "MPLCONFIGDIR": "matplotlib", "XDG_CACHE_HOME": "cache",
                   "XDG_CONFIG_HOME": "config"}


def confine_libraries(state: Path, temp: Path) -> Callable[[], None]:
    """Point library config, cache and temp folders of this process (and its children) into ``state``.

    Args:
        state: The daemon's state folder (``root/.aemon``), shared by daemons on one root.
        temp: This process's own temp folder, made here.

    Returns:
        A function that restores the previous values (for a daemon run inside a longer process).
    """
    folders = {**{variable: state / name for variable, name in LIBRARY_FOLDERS.items()}, "TMPDIR": temp}
    before = {name: os.environ.get(name) for name in folders}
    tempdir_before = tempfile.tempdir
    for name, path in folders.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = os.fspath(path)
    tempfile.tempdir = os.fspath(temp)  # gettempdir() may have been cached already

    def restore() -> None:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = tempdir_before

    return restore
