"""Keep the files that libraries write on their own (config, caches, temp files) under the root.

Keras writes ``~/.keras/keras.json``, matplotlib its font cache under ``~/.cache`` or
``~/.config``, TensorFlow's autograph its generated sources in ``$TMPDIR``. The daemon points
all of them into ``.aemon/`` before any of those libraries is imported; its temp folder lies in
its own claims folder, so it is removed with that folder (also after a SIGKILL, by the daemon
that adopts it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["confine_libraries"]


def confine_libraries(state: Path, temp: Path) -> Callable[[], None]:
    """Point library config, cache and temp folders of this process (and its children) into ``state``.

    Args:
        state: The daemon's state folder (``root/.aemon``), shared by daemons on one root.
        temp: This process's own temp folder, made here.

    Returns:
        A function that restores the previous values (for a daemon run inside a longer process).
    """
    folders = {
        "KERAS_HOME": state / "keras",
        "MPLCONFIGDIR": state / "matplotlib",
        "XDG_CACHE_HOME": state / "cache",
        "XDG_CONFIG_HOME": state / "config",
        "TMPDIR": temp,
    }
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
