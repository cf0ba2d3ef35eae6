"""Destinations: free names under ok/, anomaly/, rejected/ and denoised/, and durable writes there.

Names keep their path relative to the inbox; an existing name is never overwritten (the new
item gets ``-1``, ``-2``… before its suffix). Moves are made with ``link`` + ``unlink``, which
fails instead of replacing when another process took the name first. Files are written to a
hidden temp name, made durable (fsync, or one ``syncfs`` for a batch of records) and renamed;
directory entries are made durable per batch with :meth:`Router.sync_dirs`, not per file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from aemon.bundle import fsync_dir

__all__ = ["FOLDERS", "Router", "write_durably", "png_bytes", "png_name", "rows_bytes"]

#: Result folders under the root.
FOLDERS = ("ok", "anomaly", "rejected", "denoised")


def _temp_name(path: str, folder: str | None = None) -> str:
    parent, name = os.path.split(path)
    return os.path.join(folder or parent, f".{name}.{os.urandom(6).hex()}.tmp")


def _write_file(path: str, data: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path | str, data: bytes, tmp_dir: Path | str | None = None) -> None:
    """Write ``data`` to ``path`` via a hidden temp file, fsync and ``os.replace`` (no directory fsync).

    The temp file lies beside ``path``, or in ``tmp_dir`` (same filesystem) so that a crash
    leaves nothing half-written where results are read.
    """
    tmp = _temp_name(os.fspath(path), tmp_dir and os.fspath(tmp_dir))
    try:
        _write_file(tmp, data, fsync=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_all_durably(files: list[tuple[str, bytes]], tmp_dir: Path | str | None = None) -> None:
    """Like :func:`write_durably` for many files, with one ``syncfs`` instead of one fsync each.

    Every file is written to its temp name, then the filesystem is synced once, then each temp
    file is renamed: a rename never points at data that is not on disk. Without ``syncfs``
    (not Linux) each file is fsync'd.
    """
    if len(files) < 2 or _syncfs is None:
        for path, data in files:
            write_durably(path, data, tmp_dir)
        return
    temps = [_temp_name(path, tmp_dir and os.fspath(tmp_dir)) for path, _ in files]
    try:
        for tmp, (_, data) in zip(temps, files, strict=True):
            _write_file(tmp, data, fsync=False)
        fd = os.open(os.path.dirname(temps[0]) or ".", os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs failed: {os.strerror(err)}")
        finally:
            os.close(fd)
        for tmp, (path, _) in zip(temps, files, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _load_syncfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_syncfs = _load_syncfs()


def png_bytes(pixels: np.ndarray) -> bytes:
    """``(H, W[, 1])`` pixels in [0, 1] as an 8-bit grayscale PNG file."""
    from PIL import Image

    img = Image.fromarray(np.clip(np.rint(np.squeeze(pixels) * 255.0), 0, 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rows_bytes(rows: np.ndarray, name: str, key: str | None = None) -> bytes:
    """Array rows (exact dtype) as a ``.npy`` file, or an ``.npz`` holding them under ``key``."""
    buf = io.BytesIO()
    if name.lower().endswith(".npz"):
        np.savez(buf, **{key or "x": rows})
    else:
        np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def png_name(rel: str) -> str:
    """The name of an image's PNG output: kept for ``.png``, ``.png`` appended otherwise."""
    return rel if rel.lower().endswith(".png") else rel + ".png"


class Router:
    """Chooses free destinations under ``root`` and places files there.

    Args:
        root: The daemon's root folder (or ``aemon denoise``'s output folder).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._prefix = os.path.join(os.fspath(self.root), "")
        self._made: set[str] = set()
        self._reserved: set[str] = set()
        self._lock = threading.Lock()

    def destination(self, folder: str, rel: str) -> Path:
        """A free path ``root/folder/rel``, with ``-N`` before the suffix if the name is taken.

        The name stays reserved in this process until :meth:`release` so that two items of one
        batch never get the same name.
        """
        first = os.path.join(self._prefix, folder, rel)
        parent, name = os.path.split(first)
        self._mkdir(parent)
        stem, suffix = os.path.splitext(name)
        candidate, n = first, 0
        with self._lock:
            while candidate in self._reserved or os.path.lexists(candidate) or os.path.lexists(candidate + ".json"):
                n += 1
                candidate = os.path.join(parent, f"{stem}-{n}{suffix}")
            self._reserved.add(candidate)
        return Path(candidate)

    def release(self, paths: Iterable[Path]) -> None:
        """Forget reservations made by :meth:`destination` (the files now exist, or never will)."""
        with self._lock:
            self._reserved.difference_update(map(os.fspath, paths))

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, POSIX style."""
        text = os.fspath(path)
        if text.startswith(self._prefix):
            return text[len(self._prefix):]
        return Path(path).relative_to(self.root).as_posix()

    def place(self, src: Path | str, dest: Path | str) -> None:
        """Move ``src`` to ``dest`` without ever replacing an existing ``dest``.

        Raises:
            FileExistsError: ``dest`` exists (another process took the name).
        """
        parent = os.path.dirname(dest)
        if not os.path.isdir(parent):  # removed under us since it was first made
            self._made.discard(parent)
            self._mkdir(parent)
        if stat.S_ISDIR(os.lstat(src).st_mode):
            if os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, "destination exists", str(dest))
            os.rename(src, dest)
            return
        try:
            os.link(src, dest, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A filesystem without hard links: check, then rename (a narrow race with other daemons).
            if os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, "destination exists", str(dest)) from exc
            os.rename(src, dest)
            return
        os.unlink(src)

    def write_records(self, pairs: list[tuple[str, dict[str, Any]]], tmp_dir: Path | None = None) -> None:
        """Write the records of a batch durably (``dest.json`` each), with one filesystem sync.

        With ``tmp_dir`` (the batch folder) the temp files are written there, not beside the results.
        """
        write_all_durably([(f"{dest}.json", (json.dumps(record) + "\n").encode()) for dest, record in pairs],
                          tmp_dir)

    def sync_dirs(self, paths: Iterable[Path | str]) -> None:
        """fsync each distinct directory once (renames and new files there become durable)."""
        for folder in sorted(set(paths)):
            try:
                fsync_dir(folder)
            except FileNotFoundError:
                continue

    def write_new(self, data: bytes, folder: str, rel: str) -> Path:
        """Write ``data`` to a free name under ``folder`` durably (one-shot verbs)."""
        dest = self.destination(folder, rel)
        try:
            write_durably(dest, data)
            fsync_dir(dest.parent)
        finally:
            self.release([dest])
        return dest

    def _mkdir(self, folder: str) -> None:
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
