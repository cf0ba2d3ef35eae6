"""Destinations: free names under ok/, anomaly/, rejected/ and denoised/, and durable writes there.

Names keep their path relative to the inbox; an existing name is never overwritten (the new
item gets ``-1``, ``-2``… before its suffix). Moves are made with ``link`` + ``unlink``, which
fails instead of replacing when another process took the name first. Files are written to a
hidden temp name, fsync'd and renamed; directory entries are made durable per batch with
:meth:`Router.sync_dirs`, not per file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from aemon.bundle import fsync_dir

__all__ = ["FOLDERS", "Router", "write_durably", "png_bytes", "png_name", "rows_bytes"]

#: Result folders under the root.
FOLDERS = ("ok", "anomaly", "rejected", "denoised")


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a hidden temp file, fsync and ``os.replace`` (no directory fsync)."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with tmp.open("wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        self._made: set[Path] = set()
        self._reserved: set[Path] = set()
        self._lock = threading.Lock()

    def destination(self, folder: str, rel: str) -> Path:
        """A free path ``root/folder/rel``, with ``-N`` before the suffix if the name is taken.

        The name stays reserved in this process until :meth:`release` so that two items of one
        batch never get the same name.
        """
        first = self.root / folder / rel
        self._mkdir(first.parent)
        candidate, n = first, 0
        with self._lock:
            while (candidate in self._reserved or os.path.lexists(candidate)
                   or os.path.lexists(candidate.with_name(candidate.name + ".json"))):
                n += 1
                candidate = first.with_name(f"{first.stem}-{n}{first.suffix}")
            self._reserved.add(candidate)
        return candidate

    def release(self, paths: Iterable[Path]) -> None:
        """Forget reservations made by :meth:`destination` (the files now exist, or never will)."""
        with self._lock:
            self._reserved.difference_update(paths)

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, POSIX style."""
        return path.relative_to(self.root).as_posix()

    def place(self, src: Path, dest: Path) -> None:
        """Move ``src`` to ``dest`` without ever replacing an existing ``dest``.

        Raises:
            FileExistsError: ``dest`` exists (another process took the name).
        """
        if not dest.parent.is_dir():  # removed under us since it was first made
            self._made.discard(dest.parent)
            self._mkdir(dest.parent)
        if src.is_dir() and not src.is_symlink():
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

    def write_record(self, dest: Path, record: dict[str, Any]) -> Path:
        """Write ``dest.json`` durably: the commit point of ``dest``."""
        path = dest.with_name(dest.name + ".json")
        write_durably(path, (json.dumps(record) + "\n").encode())
        return path

    def sync_dirs(self, paths: Iterable[Path]) -> None:
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

    def _mkdir(self, folder: Path) -> None:
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)
