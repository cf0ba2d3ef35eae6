"""Every durable write: short temp names, fsync/syncfs, renames that never replace, staged folders, the clock.

Bundles, records, reports and the journal all write through here, so there is one temp-name
scheme (``.t-<hex>``: short, hidden, never taken from the inbox) and one idea of "durable":
the data is synced before the rename that publishes it, and the folder is synced after.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import resource
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "mount_points",
    "has_room",
    "utc_now",
    "iso_time",
    "temp_name",
    "fsync_dir",
    "own_folder_usable",
    "write_durably",
    "write_all_durably",
    "write_json_atomic",
    "write_with",
    "rename_noreplace",
    "Folders",
    "staged_dir",
    "remove_stale_staging",
    "remove_stale_temp_files",
    "is_temp_name",
    "naming",
]

_RENAME_NOREPLACE = 1
#: A temp name of :func:`temp_name`.
_TEMP_NAME = re.compile(r"\.t-[0-9a-f]{12}")
#: A staging folder left unlocked this long (seconds) beside a new one was left by a writer that was killed.
STALE_STAGING_SECONDS = 60.0


def iso_time(epoch: float) -> str:
    """``epoch`` (seconds) as ISO 8601 UTC with microseconds."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def utc_now() -> str:
    """Current time, ISO 8601 UTC with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


#: Below this much free space (or this many free inodes) on the root, the daemon reports not ready: a few
#: hundred records and maps still fit, so a balancer or operator hears of it before a write fails.
ROOM_RESERVE_BYTES = 1 << 20
ROOM_RESERVE_INODES = 64


def has_room(path: str | os.PathLike) -> bool:
    """False when the filesystem of ``path`` has less than the reserve of space (or, where it counts them,
    of inodes) left that this process may use; True when it cannot tell."""
    try:
        st = os.statvfs(path)
    except OSError:
        return True
    privileged = os.geteuid() == 0  # root may use the blocks reserved for it
    blocks = st.f_bfree if privileged else st.f_bavail
    inodes = st.f_ffree if privileged else st.f_favail
    return blocks * st.f_frsize >= ROOM_RESERVE_BYTES and (st.f_files == 0 or inodes >= ROOM_RESERVE_INODES)


def temp_name(folder: str | os.PathLike, suffix: str = "") -> str:
    """A fresh hidden name in ``folder``, short whatever the final name's length."""
    return os.path.join(os.fspath(folder), f".t-{os.urandom(6).hex()}{suffix}")


def own_folder_usable(path: str | os.PathLike, dir_fd: int | None = None) -> bool:
    """Open up the folder ``path`` to its owner (read, enter, write) if this process owns it; whether this
    process may now list it and move things in and out of it.

    Moving a folder to another parent, or a file out of a folder, needs write permission on that
    folder, and taking it apart needs to list it. A folder the daemon owns that lacks these (``cp -r`` of a
    read-only tree, a folder made with mode 000) is opened up before it is moved: it is about to be taken
    apart. Links are never followed; the folder is reached by an ``O_PATH`` handle, which needs no
    permission on it.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    wanted = stat.S_IRUSR | stat.S_IWUSR | stat.S_IXUSR
    handle = f"/proc/self/fd/{fd}"  # the folder itself (fchmod refuses an O_PATH descriptor)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            return os.access(handle, os.R_OK | os.W_OK | os.X_OK)
        if info.st_mode & wanted != wanted:
            os.chmod(handle, stat.S_IMODE(info.st_mode) | wanted)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes, fsync: bool, folders: Folders | None = None) -> None:
    dir_fd = None
    if folders is not None:
        dir_fd, path = folders.at(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, path: str, replace: bool, folders: Folders | None = None,
             tmp_folders: Folders | None = None) -> None:
    dir_fd = tmp_fd = None
    if folders is not None:
        dir_fd, path = folders.at(path)
    if tmp_folders is not None:
        tmp_fd, tmp = tmp_folders.at(tmp)
    if replace:
        os.replace(tmp, path, src_dir_fd=tmp_fd, dst_dir_fd=dir_fd)
    else:
        rename_noreplace(tmp, path, src_dir_fd=tmp_fd, dest_dir_fd=dir_fd)


def write_durably(path: str | os.PathLike, data: bytes, tmp_dir: str | os.PathLike | None = None,
                  replace: bool = True, folders: Folders | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename (the folder is not fsync'd).

    The temp file lies beside ``path``, or in ``tmp_dir`` (same filesystem) so that a crash leaves
    nothing half-written where results are read. With ``folders``, ``path`` (and a temp file beside
    it) lies under their root and is reached through them, never through a link.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is false.
    """
    path = os.fspath(path)
    tmp = temp_name(tmp_dir if tmp_dir is not None else os.path.dirname(path))
    tmp_folders = folders if tmp_dir is None else None
    try:
        _write_file(tmp, data, fsync=True, folders=tmp_folders)
        _publish(tmp, path, replace, folders, tmp_folders)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):  # never made, or the folder refuses writes (read-only)
            if tmp_folders is not None:
                tmp_fd, name = tmp_folders.at(tmp)
                os.unlink(name, dir_fd=tmp_fd)
            else:
                os.unlink(tmp)
        raise


#: Fewest files written with one ``syncfs`` rather than an fsync each. ``syncfs`` also waits for every other
#: writer's data on the filesystem (the files being written into the inbox), so a batch of a few
#: records fsyncs them.
SYNCFS_FROM = 8


def write_all_durably(files: list[tuple[str, bytes]], tmp_dir: str | os.PathLike | None = None,
                      replace: bool = True, folders: Folders | None = None) -> list[str]:
    """Like :func:`write_durably` for many files, with one ``syncfs`` instead of one fsync each.

    Every file is written to its temp name, then the filesystem is synced once, then each temp
    file is renamed: a rename never points at data that is not on disk. Fewer than
    :data:`SYNCFS_FROM` files, or no ``syncfs`` (not Linux): each file is fsync'd.

    Returns:
        The paths not written because they exist (only with ``replace`` false).
    """
    taken: list[str] = []
    if len(files) < SYNCFS_FROM or _syncfs is None:
        for path, data in files:
            try:
                write_durably(path, data, tmp_dir, replace, folders)
            except FileExistsError:
                taken.append(path)
        return taken
    temps = [temp_name(tmp_dir if tmp_dir is not None else os.path.dirname(path)) for path, _ in files]
    published = 0
    try:
        for tmp, (_, data) in zip(temps, files, strict=True):
            _write_file(tmp, data, fsync=False)
        _sync_filesystem(os.path.dirname(temps[0]) or ".")
        for tmp, (path, _) in zip(temps, files, strict=True):
            try:
                _publish(tmp, path, replace, folders)
            except FileExistsError:
                taken.append(path)
                os.unlink(tmp)
            published += 1
    finally:
        for tmp in temps[published:]:  # not renamed: a failure on the way
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return taken


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as indented JSON, durably (file and folder synced)."""
    write_durably(path, (json.dumps(data, indent=2) + "\n").encode())
    fsync_dir(os.path.dirname(os.fspath(path)) or ".")


def write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Let ``writer`` fill a temp file beside ``path``, then rename it over ``path`` (reports, plots)."""
    path = os.fspath(path)
    tmp = temp_name(os.path.dirname(path), os.path.splitext(path)[1])
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def rename_noreplace(src: str | os.PathLike, dest: str | os.PathLike, src_dir_fd: int | None = None,
                     dest_dir_fd: int | None = None) -> None:
    """Rename ``src`` to ``dest`` unless ``dest`` exists (files and folders alike).

    Uses ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem have it; otherwise a
    hard link and unlink for files, and check-then-rename for folders (a narrow race).
    With ``src_dir_fd`` (``dest_dir_fd``), ``src`` (``dest``) is a name in that open folder, whatever
    its path has become since.

    Raises:
        FileExistsError: ``dest`` exists.
    """
    src, dest = os.fspath(src), os.fspath(dest)
    if _renameat2 is not None:
        at_src = _AT_FDCWD if src_dir_fd is None else src_dir_fd
        at_dest = _AT_FDCWD if dest_dir_fd is None else dest_dir_fd
        if _renameat2(at_src, os.fsencode(src), at_dest, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), src, None, dest)
    if stat.S_ISDIR(os.stat(src, dir_fd=src_dir_fd, follow_symlinks=False).st_mode):
        _refuse_taken(dest, dest_dir_fd)
        os.rename(src, dest, src_dir_fd=src_dir_fd, dst_dir_fd=dest_dir_fd)
        return
    try:
        os.link(src, dest, src_dir_fd=src_dir_fd, dst_dir_fd=dest_dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        _refuse_taken(dest, dest_dir_fd)
        os.rename(src, dest, src_dir_fd=src_dir_fd, dst_dir_fd=dest_dir_fd)
        return
    os.unlink(src, dir_fd=src_dir_fd)


def _refuse_taken(dest: str, dir_fd: int | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.stat(dest, dir_fd=dir_fd, follow_symlinks=False)
        raise FileExistsError(errno.EEXIST, "destination exists", dest)


_AT_FDCWD = -100
#: How a folder under a root is opened: never through a link, needing no read permission.
_FOLDER_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)


#: Folders one :class:`Folders` keeps open at once, at most (fewer under a low open-files limit).
MOST_OPEN = 64


def folders_kept_open() -> int:
    """How many folders one :class:`Folders` keeps open: :data:`MOST_OPEN`, or an eighth of the process's
    open-files limit where that is lower, never under 16 (a commit holds two caches beside the files it
    writes; at a limit of 128 two caches of 64 ran out of file handles in the middle of a commit, at every
    restart)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MOST_OPEN
    return max(16, min(MOST_OPEN, soft // 8))


class Folders:
    """The folders under one root, each opened one name at a time without following a link, and kept
    open until :meth:`close` (for one batch). Renames and writes made through them land beneath the
    root whatever a folder's path is swapped for meanwhile (a link to somewhere else): a folder on the
    way that is a link or a file raises ``NotADirectoryError``.

    Args:
        root: The folder everything is beneath (itself opened by its path, links allowed: the operator's).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.prefix = os.path.join(os.fspath(root), "")
        self._fds: dict[str, int] = {}
        self._retired: list[int] = []
        self._most = folders_kept_open()

    def fd(self, rel: str) -> int:
        """The open folder ``root/rel`` (``""`` is the root); valid until :func:`folders_kept_open` other
        folders are opened after it (the least recently used are closed)."""
        fd = self._fds.pop(rel, None)
        if fd is not None:
            self._fds[rel] = fd  # now the most recently used
            return fd
        if not rel:
            fd = os.open(self.prefix, _FOLDER_FLAGS & ~os.O_NOFOLLOW)
        else:
            parent, _, name = rel.rpartition("/")
            if name in ("", ".", ".."):
                raise ValueError(f"not a folder below {self.prefix}: {rel!r}")
            try:
                fd = os.open(name, _FOLDER_FLAGS, dir_fd=self.fd(parent))
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise NotADirectoryError(errno.ENOTDIR, "is a link or a file, not a folder; aemon never follows "
                                         "links", self.prefix + rel) from None
        self._fds[rel] = fd
        while len(self._fds) > self._most:  # a batch of thousands of folders: file handles stay few
            os.close(self._fds.pop(next(iter(self._fds))))
        return fd

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` (under the root) relative to it."""
        text = os.fspath(path)
        if not text.startswith(self.prefix):
            raise ValueError(f"{text} is not below {self.prefix}")
        return text[len(self.prefix):]

    def at(self, path: str | os.PathLike) -> tuple[int, str]:
        """``path`` (under the root) as its open folder and its name there."""
        parent, _, name = self.relative(path).rpartition("/")
        return self.fd(parent), name

    def ensure(self, rel: str) -> int:
        """The open folder ``root/rel``, made in its open parent first if missing."""
        try:
            return self.fd(rel)
        except FileNotFoundError:
            parent, _, name = rel.rpartition("/")
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=self.fd(parent))
            return self.fd(rel)

    def lexists(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (under the root) names anything, looked up through the open folders."""
        try:
            fd, name = self.at(path)
            os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def sync(self, rel: str) -> None:
        """fsync the folder ``root/rel`` (its renames and new files become durable)."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd(rel))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def forget(self, rel: str) -> None:
        """Open ``root/rel`` and the folders below it afresh from now on (removed, or made again, meanwhile).
        The old handles stay valid until :meth:`close`: a caller may still hold one."""
        for key in [k for k in self._fds if k == rel or k.startswith(rel + "/") or not rel]:
            self._retired.append(self._fds.pop(key))

    def close(self) -> None:
        """Close every open folder."""
        self.forget("")
        while self._retired:
            os.close(self._retired.pop())

    def __enter__(self) -> Folders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file (a full disk while a library writes) as naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
        raise


@contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on the folder at ``path`` itself (``flock``, no file added to it): one writer at a
    time. Yields whether ``path`` still names the folder locked (False: it was replaced while waiting).

    Raises:
        FileNotFoundError: nothing at ``path``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks: the sha256 checks still refuse a mixed bundle
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        try:
            now = os.stat(path)
        except FileNotFoundError:
            yield False
        else:
            held = os.fstat(fd)
            yield (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
    finally:
        os.close(fd)


@contextmanager
def staged_dir(out: Path, *, overwrite: bool = False, exists_error: Callable[[Path], Exception]) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``out``; publish it as ``out`` by rename on success.

    On any error the temporary directory is removed and ``out`` is left as it was; one a killed writer left
    is removed by the next staging beside it.

    Raises:
        The error made by ``exists_error``: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise exists_error(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    tmp = Path(temp_name(out.parent))
    tmp.mkdir()
    try:
        with folder_lock(tmp):  # held until published: never taken for a killed writer's (remove_stale_staging)
            yield tmp
            fsync_dir(tmp)
            if out.exists():
                old = Path(temp_name(out.parent))
                with folder_lock(out):  # a calibration writing into it finishes first (and then sees it replaced)
                    os.rename(out, old)
                    os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
            fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temp_name(name: str, suffixes: tuple[str, ...] = ("",)) -> bool:
    """Whether ``name`` is one :func:`temp_name` gives, with one of ``suffixes``."""
    return any(name.endswith(suffix) and _TEMP_NAME.fullmatch(name[: len(name) - len(suffix)])
               for suffix in suffixes)


def remove_stale_temp_files(folder: Path, suffixes: tuple[str, ...]) -> None:
    """Remove the temp files (:func:`temp_name`, with one of ``suffixes``) that writers killed meanwhile left in
    ``folder``: those unchanged for :data:`STALE_STAGING_SECONDS` (a live writer's are newer)."""
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):
            if is_temp_name(entry.name, suffixes) and entry.is_file(follow_symlinks=False) and \
                    time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_STAGING_SECONDS:
                os.unlink(entry.path)


def remove_stale_staging(folder: Path) -> None:
    """Remove the staging folders (:func:`staged_dir`) that writers killed meanwhile left in ``folder``: those
    named by :func:`temp_name`, unchanged for :data:`STALE_STAGING_SECONDS` and locked by no writer."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not _TEMP_NAME.fullmatch(entry.name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or \
                    time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_STAGING_SECONDS:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # a writer holds it (or locks are not supported: then it is left)
            pass
        finally:
            os.close(fd)


def _sync_filesystem(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _libc_function(name: str, argtypes: list):
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_syncfs = _libc_function("syncfs", [ctypes.c_int])
_renameat2 = _libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_uint])


def mount_points() -> list[str]:
    """Every mount point of this process (``/proc/self/mountinfo``; none where it cannot be read). No rename
    crosses one, bind mounts of one filesystem included, and those share its ``st_dev``: only this tells."""
    try:
        with open("/proc/self/mountinfo", "rb") as fp:
            lines = fp.read().splitlines()
    except OSError:
        return []
    octal = re.compile(rb"\\([0-7]{3})")  # a space in a mount point is written \040
    return [os.fsdecode(octal.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4]))
            for fields in (line.split() for line in lines) if len(fields) > 4]
