"""Destinations and records: move an item under ok/, anomaly/ or rejected/, then write its record.

Names keep their path relative to the inbox; an existing name is never overwritten (the new
item gets ``-1``, ``-2``… before its suffix). The item is moved (or written) first and its
``NAME.json`` record last, through a temp file, fsync and ``os.replace``: the record is the
commit point. The daemon stages a moved item's record in its claim folder first
(:meth:`Router.stage_record`), so a crash between the move and the record is finished on restart.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from aemon.bundle import fsync_dir

__all__ = ["FOLDERS", "PENDING_PREFIX", "Router"]

#: Result folders under the root.
FOLDERS = ("ok", "anomaly", "rejected", "denoised")
#: Name prefix of a record staged in a claim folder (hidden, so never taken as an item).
PENDING_PREFIX = ".record-"


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a hidden temp file, fsync and ``os.replace``."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Router:
    """Places results under ``root``.

    Args:
        root: The daemon's root folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def destination(self, folder: str, rel: str) -> Path:
        """A free path ``root/folder/rel``: with ``-N`` before the suffix if the name is taken."""
        first = self.root / folder / rel
        first.parent.mkdir(parents=True, exist_ok=True)
        candidate, n = first, 0
        while candidate.exists() or candidate.with_name(candidate.name + ".json").exists():
            n += 1
            candidate = first.with_name(f"{first.stem}-{n}{first.suffix}")
        return candidate

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, POSIX style."""
        return path.relative_to(self.root).as_posix()

    def move(self, src: Path, folder: str, rel: str) -> Path:
        """Move ``src`` to a free name under ``folder``; returns where it went."""
        dest = self.destination(folder, rel)
        self.move_to(src, dest)
        return dest

    def move_to(self, src: Path, dest: Path) -> None:
        """Move ``src`` to ``dest`` (a path from :meth:`destination`) durably."""
        os.rename(src, dest)
        fsync_dir(dest.parent)

    def stage_record(self, claim_dir: Path, record: dict[str, Any]) -> Path:
        """Write ``record`` durably into ``claim_dir`` before its item is moved.

        A crash between the move and :meth:`commit_record` leaves it there; recovery
        (:meth:`aemon.inbox.Inbox.recover`) then finishes the commit instead of losing the record.
        """
        path = claim_dir / f"{PENDING_PREFIX}{uuid.uuid4().hex}.json"
        _fsync_write(path, (json.dumps(record, indent=2) + "\n").encode())
        return path

    def commit_record(self, pending: Path, dest: Path) -> Path:
        """Rename a staged record to ``dest.json``: the commit point of ``dest``."""
        path = dest.with_name(dest.name + ".json")
        os.replace(pending, path)
        fsync_dir(path.parent)
        return path

    def write_rows(self, rows: np.ndarray, folder: str, rel: str, key: str | None = None) -> Path:
        """Write array rows (exact dtype) as ``.npy``, or ``.npz`` under ``key`` for an ``.npz`` item."""
        dest = self.destination(folder, rel)
        buf = io.BytesIO()
        if dest.suffix.lower() == ".npz":
            np.savez(buf, **{key or "x": rows})
        else:
            np.save(buf, rows, allow_pickle=False)
        _fsync_write(dest, buf.getvalue())
        return dest

    def write_png(self, pixels: np.ndarray, folder: str, rel: str) -> Path:
        """Write ``(H, W[, 1])`` pixels in [0, 1] as an 8-bit grayscale PNG.

        The name is kept for ``.png`` items; other images get ``.png`` appended.
        """
        from PIL import Image

        if not rel.lower().endswith(".png"):
            rel = rel + ".png"
        dest = self.destination(folder, rel)
        img = Image.fromarray(np.clip(np.rint(np.squeeze(pixels) * 255.0), 0, 255).astype(np.uint8), mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        _fsync_write(dest, buf.getvalue())
        return dest

    def write_record(self, dest: Path, record: dict[str, Any]) -> Path:
        """Write ``dest.json`` atomically: the commit point of ``dest``."""
        path = dest.with_name(dest.name + ".json")
        _fsync_write(path, (json.dumps(record, indent=2) + "\n").encode())
        return path
