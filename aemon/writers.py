"""Which files some process still holds open for writing, from one walk of ``/proc``.

The inbox asks before it takes an entry whose writer it has not seen close (a hard link, a lost close
event, an entry found by a scan, a folder renamed in); the claims ask before they expand a folder.
"""

from __future__ import annotations

import functools
import os
import stat

__all__ = ["writers_of"]

#: The inode of the machine's own pid namespace (the kernel's PROC_PID_INIT_INO); a container's differs.
_INIT_PID_NAMESPACE = 0xEFFFFFFC


@functools.cache
def _proc_shows_everyone() -> bool:
    """Whether this process's ``/proc`` lists every process of the machine: in the machine's own pid
    namespace (not a container's), and not mounted with ``hidepid`` (systemd's ``ProtectProc=invisible``
    hides other users' processes). Where it does not, a writer may be missing from it."""
    try:
        in_init = os.stat("/proc/self/ns/pid").st_ino == _INIT_PID_NAMESPACE
        with open("/proc/self/mountinfo") as mounts:
            options = [line.split(" - ")[1].split()[2] for line in mounts if line.split()[4] == "/proc"]
    except (OSError, IndexError):
        return False
    hidden = any(o.startswith("hidepid=") and o not in ("hidepid=0", "hidepid=off")
                 for opts in options for o in opts.split(","))
    return in_init and not hidden


def writers_of(paths: list[str]) -> tuple[set[str], bool]:
    """Which of ``paths`` some process holds open for writing, from one walk of ``/proc``.

    A descriptor names its file by the resolved path (an inbox reached through a link shows by its
    real one), by a path through another mount (a bind mount, another mount namespace: same file name),
    or by another name for a file with several hard links (a writer writing under its own name that
    linked the file in) or whose writer removed its own name: all but the first are matched by inode,
    whose cost is paid only for descriptors that may be one of ``paths``.

    Returns:
        The paths held open for writing, and whether that is all of them: False when it cannot be
        told for some (no ``/proc``, a ``/proc`` that does not list every process, or processes whose
        open files this user may not see).
    """
    wanted, inodes, linked, same_file = _names_and_inodes(paths)
    names = {os.path.basename(path) for path in paths}
    found: set[str] = set()
    complete = _proc_shows_everyone()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found, False
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            complete = False
            continue
        except OSError:
            continue  # the process has exited
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                asked = wanted.get(target)
                if asked is None and not (target.startswith("/") and (
                        linked or target.endswith(" (deleted)") or os.path.basename(target) in names)):
                    continue
                if asked in found:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    fields = dict(line.split(":", 1) for line in info if ":" in line)
                if asked is None:
                    if "ino" in fields and int(fields["ino"]) not in inodes:
                        continue  # told by fdinfo alone: no stat of another process's file
                    st = os.stat(f"{fd_dir}/{fd}")  # the device too (and the inode, where fdinfo lacks it)
                    asked = inodes.get(st.st_ino, {}).get(st.st_dev, (None,))[0]
                    if asked is None or asked in found:
                        continue
                flags = int(fields["flags"].split()[0], 8)
            except (OSError, KeyError, ValueError):
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                found.update(same_file.get(asked, (asked,)))  # every asked-about link of the file is held
    return found, complete


def _names_and_inodes(paths: list[str]) -> tuple[dict[str, str], dict[int, dict[int, list[str]]], bool,
                                                 dict[str, list[str]]]:
    """How ``/proc`` may name each of ``paths`` (as given, or below its folder's resolved path), the
    regular files' paths by inode and device, whether any has other hard links, and each regular
    file's path to every one of ``paths`` that is the same file (links to one inode)."""
    wanted: dict[str, str] = {}
    inodes: dict[int, dict[int, list[str]]] = {}
    linked = False
    resolved: dict[str, str] = {}
    for path in paths:
        wanted[path] = path
        head, tail = os.path.split(path)
        if head not in resolved:
            resolved[head] = os.path.realpath(head)
        wanted.setdefault(os.path.join(resolved[head], tail), path)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault(st.st_ino, {}).setdefault(st.st_dev, []).append(path)
            linked = linked or st.st_nlink > 1
    same_file = {path: group for by_dev in inodes.values() for group in by_dev.values() for path in group}
    return wanted, inodes, linked, same_file
