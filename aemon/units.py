"""Units: the files one claimed inbox entry is made of, each routed on its own.

An image or array file is one unit. A folder is one unit per file inside it (searched
recursively): nothing inside a folder is ever dropped. Files that are not scored (hidden,
partial or backup names, links, FIFOs and other special files) and empty subfolders become
units that are rejected with their own record. A file name too long to route is rejected under a
short name; paths that would not fit the filesystem once routed are rejected whole, as
``name_too_long``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from aemon.claims import Claim
from aemon.errors import EmptyItem, IgnoredName, ItemRejected, NameTooLong, Unreadable, UnsafeItem, UnsupportedType
from aemon.fsio import iso_time, own_folder_usable
from aemon.images import Look
from aemon.inbox import is_ignored
from aemon.writers import writers_of

__all__ = ["MAX_NAME_BYTES", "Unit", "expand", "check_file", "short_name"]

#: Longest file name taken, in bytes: room is left for ``-N`` and ``.map.png``/``.json`` (255 in all).
MAX_NAME_BYTES = 224
#: Bytes kept free under PATH_MAX for a destination's suffixes (``-N``, ``.json``, a map name).
_PATH_SLACK = 32
_PATH_MAX = 4096


@dataclass
class Unit:
    """One file to route: an image, an array, or one file of a folder batch."""

    #: Where the file lies now (inside the batch folder for the daemon).
    path: Path
    #: Its path relative to ``inbox/`` (or as given to a verb): the record's ``item``.
    rel: str
    #: When it arrived (epoch seconds).
    arrived: float = 0.0
    #: The folder batch it belongs to (the entry's name), if any.
    batch: str | None = None
    #: Where it goes, relative to a result folder; ``rel`` unless that cannot be used.
    place_rel: str | None = None
    x: np.ndarray | None = None
    raw: np.ndarray | None = None
    key: str | None = None
    #: The ``.npz`` file as opened when decoded (its other members are copied from it), until planned.
    source: BinaryIO | None = None
    #: How an image file looks (size and mode), for its denoised output.
    look: Look | None = None
    error: ItemRejected | None = None
    scores: np.ndarray | None = None
    p_values: np.ndarray | None = None
    verdicts: list[str] | None = None
    recon: np.ndarray | None = None
    #: Anomaly maps (PNG bytes) by row: row 0 for an image.
    maps: dict[int, bytes] = field(default_factory=dict)
    #: The rows of an array that wanted a map and got none, where more wanted one than are drawn for one item
    #: (else None).
    maps_left_out: np.ndarray | None = None

    def close_source(self) -> None:
        """Close the file kept open since decoding, if any."""
        if self.source is not None:
            self.source.close()
            self.source = None

    @property
    def received_at(self) -> str:
        """Arrival time, ISO 8601 UTC."""
        return iso_time(self.arrived)

    @property
    def dest_rel(self) -> str:
        """The path under ``ok/``, ``anomaly/`` or ``rejected/`` this unit asks for."""
        return self.place_rel or self.rel


def _nbytes(text: str) -> int:
    return len(os.fsencode(text))


def short_name(name: str) -> str:
    """A name that fits: the start of ``name``, a hash of the whole, and its suffix if short."""
    stem, suffix = os.path.splitext(name)
    if _nbytes(suffix) > 16:
        stem, suffix = name, ""
    head = os.fsencode(stem)[:96].decode(errors="ignore")
    return f"{head}-{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}{suffix}"


def expand(claim: Claim, dest_root: str) -> list[Unit]:
    """The units of ``claim``.

    Args:
        claim: A claimed entry.
        dest_root: The result folders' parent (the root), to check destination path lengths.
    """
    name = claim.name
    if claim.error is not None:
        return [Unit(claim.path, name, claim.arrived, error=claim.error)]
    if _nbytes(name) > MAX_NAME_BYTES:
        return [Unit(claim.path, name, claim.arrived, place_rel=short_name(name), error=_name_over_limit(name))]
    if not stat.S_ISDIR(os.lstat(claim.path).st_mode):
        return [Unit(claim.path, name, claim.arrived)]
    units, problem = _walk(claim, dest_root)
    if problem is not None:
        return [Unit(claim.path, name, claim.arrived, error=problem)]
    if not units:
        return [Unit(claim.path, name, claim.arrived, error=EmptyItem(f"folder {name} holds no files"))]
    held = _changed_since_taken_and_open(claim, units)
    return [unit for unit in units if os.fspath(unit.path) not in held]


def _changed_since_taken_and_open(claim: Claim, units: list[Unit]) -> set[str]:
    """Files of a claimed folder written since it was taken and still open for writing: a process that kept a
    handle on the folder (its working directory) writes on. They stay in the batch folder and go back to the
    inbox when the batch is done. A file open since before (held by a reader that opened it read-write, past
    the inbox's stuck-open time) is decided: leaving it would send the folder round for ever."""
    taken = os.lstat(claim.batch_dir).st_ctime_ns  # made, and the entry renamed into it, when it was taken
    changed = []
    for unit in units:
        with contextlib.suppress(OSError):
            if unit.error is None and os.lstat(unit.path).st_ctime_ns >= taken:
                changed.append(os.fspath(unit.path))
    return writers_of(changed)[0] if changed else set()  # no walk of /proc for a folder nobody touched since


def _walk(claim: Claim, dest_root: str) -> tuple[list[Unit], ItemRejected | None]:
    base = os.fspath(claim.batch_dir)
    longest = _PATH_MAX - _PATH_SLACK - _nbytes(os.path.join(dest_root, "rejected", ""))
    errors: list[OSError] = []
    units: list[Unit] = []
    _open_up(os.fspath(claim.path))
    for dirpath, dirs, files in os.walk(claim.path, onerror=errors.append):
        for d in dirs:  # before the walk lists them: a folder of the daemon's own with mode 000 is opened up
            _open_up(os.path.join(dirpath, d))
        if not os.access(dirpath, os.W_OK) and not own_folder_usable(dirpath):
            rel = os.path.relpath(dirpath, base)
            return [], Unreadable(f"folder {rel} is read-only and not the daemon's to change, so its files cannot be "
                                  "moved out; the folder is kept whole")
        blocked = _held_by_sticky(dirpath, [*files, *dirs])
        if blocked is not None:
            rel = os.path.relpath(os.path.join(dirpath, blocked), base)
            return [], Unreadable(f"{rel} is another user's, in a folder with the sticky bit: only its owner may "
                                  "move it, so the folder is kept whole")
        names = list(files)
        for d in list(dirs):
            if os.path.islink(os.path.join(dirpath, d)):  # a link to a folder: a unit, never followed
                dirs.remove(d)
                names.append(d)
        if not dirs and not names and dirpath != os.fspath(claim.path):  # an empty subfolder: a unit too
            rel = os.path.relpath(dirpath, base)
            if _too_long(dirpath, rel, longest):
                return [], _name_too_long(rel)
            units.append(Unit(Path(dirpath), rel, claim.arrived, batch=claim.name,
                              error=EmptyItem(f"folder {rel} holds no files")))
        for fname in sorted(names):
            path = os.path.join(dirpath, fname)
            rel = os.path.relpath(path, base)
            place, error = None, None
            if _nbytes(fname) > MAX_NAME_BYTES:  # rejected under a short name, as at the top of the inbox
                place, error = os.path.join(os.path.dirname(rel), short_name(fname)), _name_over_limit(fname)
            elif is_ignored(fname):
                error = IgnoredName(f"{fname} is a hidden, partial or backup name; such files are never scored")
            if _too_long(path, place or rel, longest):
                return [], _name_too_long(rel)
            units.append(Unit(Path(path), rel, claim.arrived, batch=claim.name, place_rel=place, error=error))
    if errors:
        exc = errors[0]
        if exc.errno == errno.ENAMETOOLONG:
            return [], NameTooLong(f"a path inside {claim.name} is too long to read (PATH_MAX); the folder is kept "
                                   "whole")
        return [], Unreadable(f"cannot read inside {claim.name}: {exc.strerror}; the folder is kept whole")
    units.sort(key=lambda u: u.rel)
    return units, None


def _open_up(folder: str) -> None:
    """Give the daemon's own ``folder`` the permissions taking it apart needs, where it lacks them."""
    if not os.path.islink(folder) and not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        own_folder_usable(folder)


def _held_by_sticky(folder: str, names: list[str]) -> str | None:
    """The first of ``names`` that the sticky bit of ``folder`` keeps this process from moving, if any."""
    info = os.lstat(folder)
    if not info.st_mode & stat.S_ISVTX or info.st_uid == os.geteuid() or _may_move_any():
        return None
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(os.path.join(folder, name)).st_uid != os.geteuid():
                return name
    return None


@functools.cache
def _may_move_any() -> bool:
    """Whether this process has CAP_FOWNER (root, unless dropped): the sticky bit does not hold it back."""
    try:
        with open("/proc/self/status") as fp:
            caps = next(line for line in fp if line.startswith("CapEff:"))
        return bool(int(caps.split()[1], 16) >> _CAP_FOWNER & 1)
    except (OSError, StopIteration, ValueError):
        return os.geteuid() == 0


_CAP_FOWNER = 3


def _too_long(path: str, rel: str, longest: int) -> bool:
    """Whether a unit at ``path``, routed to ``rel`` inside a result folder, could not be: a name it is routed
    under (its own or a subfolder's) leaves no room for ``-N`` and a record's ``.json``, or a path is near
    PATH_MAX."""
    return (any(_nbytes(part) > MAX_NAME_BYTES for part in rel.split(os.sep)) or _nbytes(path) >= _PATH_MAX - 1
            or _nbytes(rel) > longest)


def _name_over_limit(name: str) -> NameTooLong:
    """A file name longer than :data:`MAX_NAME_BYTES` (the unit goes to ``rejected/`` under :func:`short_name`)."""
    return NameTooLong(f"the name {name[:80]}… is {_nbytes(name)} bytes long; the longest taken is {MAX_NAME_BYTES}")


def _name_too_long(rel: str) -> NameTooLong:
    return NameTooLong(f"{rel[:80]}… is too long to route (a name over {MAX_NAME_BYTES} bytes or a path near "
                       "PATH_MAX); the folder is kept whole")


def check_file(unit: Unit) -> None:
    """Refuse what must never be opened: links (they may lead anywhere) and special files.

    Raises:
        UnsafeItem: a symbolic link.
        UnsupportedType: a FIFO, socket or device.
    """
    mode = os.lstat(unit.path).st_mode
    if stat.S_ISLNK(mode):
        raise UnsafeItem(f"{unit.rel} is a symbolic link, never followed; use the file itself")
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"))
        kind = next((name for test, name in kinds if test(mode)), "a special file")
        raise UnsupportedType(f"{unit.rel} is {kind}, not a file; only regular files are read")
