"""Destinations: free names under ok/, anomaly/, rejected/ and denoised/, and durable writes there.

Names keep their path relative to the inbox; an existing name is never overwritten (the new
item gets ``-1``, ``-2``… before its suffix), and an item's name is reserved together with the
names written beside it (its record, its map). Moves and record writes never replace a name
(``renameat2(RENAME_NOREPLACE)``, see :mod:`aemon.fsio`), so they fail instead of replacing when
another process took the name first. Directory entries are made durable per batch with
:meth:`Router.sync_dirs`, not per file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from aemon.errors import Unreadable
from aemon.fsio import Folders, rename_noreplace, write_all_durably, write_durably
from aemon.images import PNG_LEVEL, npy_header
from aemon.logs import get_logger
from aemon.records import encode

__all__ = ["FOLDERS", "DERIVED", "Router", "png_bytes", "png_name", "rows_bytes"]

#: Result folders under the root.
FOLDERS = ("ok", "anomaly", "rejected", "denoised")


def png_bytes(pixels: np.ndarray, bits: int = 8) -> bytes:
    """``(H, W[, 1])`` or ``(H, W, 3)`` pixels in [0, 1] as a grayscale or RGB PNG file of 8 bits a channel
    (or 16, grayscale only)."""
    from PIL import Image

    top = (1 << bits) - 1
    values = np.clip(np.rint(np.asarray(pixels, np.float64) * top), 0, top).astype(np.uint16 if bits > 8 else np.uint8)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def rows_bytes(rows: np.ndarray, name: str, key: str | None = None, source: str | os.PathLike | None = None,
               index: np.ndarray | None = None) -> bytes:
    """Array rows (exact dtype) as a ``.npy`` file, or an ``.npz`` holding them under ``key``.

    For an ``.npz``, every other member of ``source`` (the item's own archive) comes along, so that
    nothing of the file is lost: an array with one entry per row of the scored array (labels) keeps
    the entries ``index`` (all of them when ``index`` is None), anything else is copied unchanged.
    """
    if not name.lower().endswith(".npz"):
        return _npy_bytes(rows)
    key = key or "x"
    buf = io.BytesIO()
    with contextlib.ExitStack() as stack:
        archive = stack.enter_context(zipfile.ZipFile(source)) if source is not None else None
        members = archive.infolist() if archive is not None else []
        compressed = any(info.compress_type != zipfile.ZIP_STORED for info in members)  # parts as compact
        out = stack.enter_context(zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED))
        out.writestr(f"{key}.npy", _npy_bytes(rows))
        scored = [info for info in members if info.filename.removesuffix(".npy") == key]
        total = None
        if scored:
            with archive.open(scored[0]) as fp:
                total = _rows_in(fp)
        for info in members:
            if info not in scored:
                out.writestr(info.filename, _companion(archive.read(info), total, index))
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _rows_in(fp) -> int | None:
    """The number of rows of an ``.npy`` stream, from its header alone (None if it is not one)."""
    try:
        shape, _ = npy_header(fp, "member")
    except Unreadable:
        return None
    return shape[0] if shape else None


def _companion(member: bytes, total: int | None, index: np.ndarray | None) -> bytes:
    """Another member of an item's ``.npz``: its entries ``index`` if it has one per row, else unchanged."""
    if index is None or total is None or _rows_in(io.BytesIO(member)) != total:
        return member
    try:
        array = np.load(io.BytesIO(member), allow_pickle=False)
    except ValueError:  # an object array: kept whole, never unpickled
        return member
    return _npy_bytes(array[index])


def _naming(exc: OSError, path: Path | str) -> OSError:
    """``exc`` naming the whole ``path`` meant: an error within an open folder names only the file (``'a.png'
    -> 'a.png'``), which tells an operator nothing. One that already names an absolute path is kept."""
    if exc.errno is None or (exc.filename and os.path.isabs(os.fspath(exc.filename))):
        return exc
    return OSError(exc.errno, exc.strerror, os.fspath(path))  # the same subclass (FileExistsError, ...)


def png_name(rel: str) -> str:
    """The name of an image's PNG output: kept for ``.png``, ``.png`` appended otherwise."""
    return rel if rel.lower().endswith(".png") else rel + ".png"


#: Names written beside an item, reserved with it: its record and its anomaly map.
DERIVED = (".json", ".map.png")


#: What the daemon needs of a result folder: to read it (it is opened to be fsync'd), write in it and enter it.
USABLE = os.R_OK | os.W_OK | os.X_OK


class Router:
    """Chooses free destinations under ``root`` and places files there.

    No link is ever followed: every folder on a destination's path is opened one name at a time
    beneath the root (:class:`~aemon.fsio.Folders`), and one that is a file or a link gets a free
    name instead (``batch`` → ``batch-1``). Within :meth:`opened` (one batch's commit) the folders
    stay open, so a folder swapped for a link meanwhile leads nowhere.

    Args:
        root: The daemon's root folder (or ``aemon denoise``'s output folder).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._prefix = os.path.join(os.fspath(self.root), "")
        self._reserved: set[str] = set()
        #: Result folders found refusing writes (logged once each).
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()  # the folders each thread holds open

    @contextlib.contextmanager
    def opened(self) -> Iterator[Folders]:
        """Keep the folders under the root open for one batch (nested calls in one thread share them)."""
        held = getattr(self._local, "folders", None)
        if held is not None:
            yield held
            return
        with Folders(self.root) as folders:
            self._local.folders = folders
            try:
                yield folders
            finally:
                self._local.folders = None

    def destination(self, folder: str, rel: str) -> Path:
        """A free path ``root/folder/rel``, with ``-N`` before the suffix if the name is taken.

        A name counts as taken if it, or a name derived from it (:data:`DERIVED`), exists or is
        reserved, or if it is itself derived from a taken name (``a.png.json`` beside ``a.png``).
        The names stay reserved in this process until :meth:`release`, so that two items of one
        batch never get the same name.
        """
        *dirs, name = rel.split("/")
        with self._lock, self.opened() as folders:
            parent = self._real_dir(folders, folder)
            for part in dirs:
                parent = self._subdir(folders, parent, part)
            stem, suffix = os.path.splitext(name)
            candidate, n = os.path.join(self._prefix + parent, name) if parent else self._prefix + name, 0
            while self._taken(folders, candidate):
                n += 1
                candidate = os.path.join(os.path.dirname(candidate), f"{stem}-{n}{suffix}")
            self._reserved.update([candidate, *(candidate + d for d in DERIVED)])
        return Path(candidate)

    def _taken(self, folders: Folders, path: str) -> bool:
        family = [path, *(path + d for d in DERIVED)]
        family += [path[: -len(d)] for d in DERIVED if path.endswith(d)]
        return any(p in self._reserved or folders.lexists(p) for p in family)

    def _real_dir(self, folders: Folders, rel: str) -> str:
        """The result folder ``rel`` itself, made if missing; an error if it is anything but a real folder."""
        folders.ensure(rel)  # NotADirectoryError for a link or a file
        return rel

    def _subdir(self, folders: Folders, parent: str, name: str) -> str:
        """A real folder ``parent/name`` (made if missing), or ``name-N`` if that name is a file or a link, or a
        folder that refuses this process's writes (read-only for its user, immutable)."""
        rel, n = f"{parent}/{name}" if parent else name, 0
        while True:
            if self._prefix + rel not in self._reserved and self._usable(folders, rel):
                return rel
            n += 1
            rel = f"{parent}/{name}-{n}" if parent else f"{name}-{n}"

    def _usable(self, folders: Folders, rel: str) -> bool:
        """Whether ``rel`` is (or is now made) a folder this process can place files in.

        Raises:
            PermissionError: its parent refuses a new folder, or the folder just made refuses writes (not this
                name's doing: every name would fail).
        """
        made = not folders.lexists(self._prefix + rel)
        try:
            fd = folders.ensure(rel)
        except NotADirectoryError:
            return False
        except PermissionError:
            if made:  # the folder above refuses a new one
                raise
            usable = False  # there, but it cannot even be opened
        else:
            usable = os.access(".", USABLE, dir_fd=fd)  # read too: the folder is opened to be fsync'd
            if not usable and made:
                raise PermissionError(errno.EACCES, "a folder the daemon has just made refuses its writes (the "
                                                    "umask, or a default ACL of the folder above)",
                                      self._prefix + rel)
        if not usable and rel not in self._refused:
            self._refused.add(rel)
            get_logger().warning("route.folder_refused", folder=rel,
                                 hint="this result folder refuses the daemon's writes (its permissions, or chattr "
                                      "+i); items bound for it go to a free name beside it")
        return usable

    def ensure_parent(self, dest: str) -> None:
        """Make ``dest``'s folders again (removed since :meth:`destination`), following no link."""
        folder, *dirs = os.path.dirname(self.relative(Path(dest))).split("/")
        with self._lock, self.opened() as folders:
            folders.forget(folder)
            parent = self._real_dir(folders, folder)
            for part in dirs:
                made = self._subdir(folders, parent, part)
                if made != f"{parent}/{part}":
                    raise NotADirectoryError(errno.ENOTDIR, "a folder on the destination became a file or a link",
                                             dest)
                parent = made

    def release(self, paths: Iterable[Path]) -> None:
        """Forget reservations made by :meth:`destination` (the files now exist, or never will)."""
        with self._lock:
            for path in map(os.fspath, paths):
                self._reserved.difference_update([path, *(path + d for d in DERIVED)])

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, POSIX style."""
        text = os.fspath(path)
        if text.startswith(self._prefix):
            return text[len(self._prefix):]
        return Path(path).relative_to(self.root).as_posix()

    def place(self, src: str, dest: Path | str, src_dir_fd: int | None = None) -> None:
        """Move ``src`` (a file, a link or a folder; a name in ``src_dir_fd`` if given) to ``dest`` without
        ever replacing an existing ``dest``.

        Raises:
            FileExistsError: ``dest`` exists (another process took the name).
            NotADirectoryError: a folder on the way to ``dest`` is a link or a file.
        """
        with self.opened() as folders:
            try:
                dir_fd, name = folders.at(dest)
                rename_noreplace(src, name, src_dir_fd=src_dir_fd, dest_dir_fd=dir_fd)
                return
            except FileNotFoundError:
                os.stat(src, dir_fd=src_dir_fd, follow_symlinks=False)  # gone itself: FileNotFoundError
            except OSError as exc:
                raise _naming(exc, dest) from exc
            self.ensure_parent(os.fspath(dest))  # the folder was removed under us
            dir_fd, name = folders.at(dest)
            try:
                rename_noreplace(src, name, src_dir_fd=src_dir_fd, dest_dir_fd=dir_fd)
            except OSError as exc:
                raise _naming(exc, dest) from exc

    def write_records(self, pairs: list[tuple[str, dict[str, Any]]], tmp_dir: Path | None = None) -> list[str]:
        """Write the records of a batch durably (``dest.json`` each, never replacing a file), one sync.

        With ``tmp_dir`` (the batch folder) the temp files are written there, not beside the results.

        Returns:
            The destinations whose record name was taken meanwhile (nothing written for them).
        """
        with self.opened() as folders:
            taken = write_all_durably([(f"{dest}.json", encode(record)) for dest, record in pairs],
                                      tmp_dir, replace=False, folders=folders)
        return [path[: -len(".json")] for path in taken]

    def sync_dirs(self, paths: Iterable[Path | str]) -> None:
        """fsync each distinct directory once (renames and new files there become durable)."""
        with self.opened() as folders:
            for folder in sorted(set(map(os.fspath, paths))):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    folders.sync(folders.relative(os.path.join(folder, "")).rstrip("/"))

    def write_new(self, data: bytes, folder: str, rel: str) -> Path:
        """Write ``data`` to a free name under ``folder`` durably (one-shot verbs).

        Raises:
            OSError: the filesystem refused, naming the whole path meant (not a name within an open folder).
        """
        try:
            with self.opened() as folders:
                dest = self.destination(folder, rel)
                try:
                    write_durably(dest, data, replace=False, folders=folders)
                    folders.sync(os.path.dirname(folders.relative(dest)))
                finally:
                    self.release([dest])
        except OSError as exc:
            raise _naming(exc, os.path.join(self.root, folder, rel)) from exc
        return dest
