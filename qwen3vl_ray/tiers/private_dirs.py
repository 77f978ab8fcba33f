"""Private directories: the trust checks, safe opens and one-process lock of the disk tier's directories.

Trust (fail closed): the root and every directory a tier uses must belong to the running user and be writable
by nobody else, and no directory above the root may be writable by a stranger (world-writable without the
sticky bit, or owned by another non-root user): whoever can write a directory can rename ours away and plant
their own. :func:`open_private_root` and :func:`open_private_subdir` refuse anything else with
:class:`UnsafeDirectoryError`, a one-line message naming the path and the fix; they never chmod a directory
of someone else into use. A directory a tier uses is held open by descriptor and everything below it is
reached relative to that descriptor, so a directory renamed under a live tier never redirects it.

One process per directory: :func:`lock_dir` takes an exclusive ``flock`` on a namespace directory for the
tier's lifetime, so a second process on the same directory fails at once with :class:`DirectoryInUseError`
instead of storing twice the budget beside the first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from pathlib import Path

from qwen3vl_ray.errors import ConfigError

DIR_MODE = 0o700
FILE_MODE = 0o600
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
OPEN_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | NOFOLLOW


class UnsafeDirectoryError(ConfigError):
    """A disk-tier directory is not private to the running user (another owner, writable by others, a link).
    The message names the path and the fix; nothing was changed on disk."""


class DirectoryInUseError(OSError, ConfigError):
    """Another process holds the disk tier's directory (one writing process per directory). A ``ConfigError``
    too: the fix is a setting (another ``disk_dir``), so the CLI says it in one line."""


def _unsafe(path, why: str, fix: str) -> UnsafeDirectoryError:
    return UnsafeDirectoryError(f"disk tier refuses {path}: {why}; {fix}")


def check_private(st: os.stat_result, path, what: str = "directory") -> None:
    """Raise :class:`UnsafeDirectoryError` unless ``st`` is a directory of this user writable by nobody else."""
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, f"the {what} is not a directory", "remove it or choose another path")
    if st.st_uid != uid:
        raise _unsafe(path, f"the {what} belongs to uid {st.st_uid}, not this user (uid {uid})",
                      "use a directory of your own (default ~/.cache/qwen3vl-ray/disk-tier), or have it removed")
    if st.st_mode & 0o022:
        raise _unsafe(path, f"the {what} is writable by others (mode {stat.S_IMODE(st.st_mode):o})",
                      f"run `chmod go-w {path}` if only you ever wrote to it, else remove it")


def check_ancestors(path: str | os.PathLike) -> None:
    """Every directory above ``path`` (resolved) must be owned by root or this user, and writable by others
    only with the sticky bit (``/tmp``): else a stranger could rename the tier's root away under it."""
    uid = os.geteuid()
    p = Path(os.path.realpath(path)).parent
    for d in (p, *p.parents):
        st = os.stat(d)
        if st.st_uid not in (0, uid):
            raise _unsafe(path, f"its parent {d} belongs to uid {st.st_uid}, who could replace it",
                          "put the disk tier under a directory owned by you or root")
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            raise _unsafe(path, f"its parent {d} is writable by everyone without the sticky bit "
                                f"(mode {stat.S_IMODE(st.st_mode):o})",
                          f"run `chmod o-w {d}` (or `chmod +t {d}`), or choose a private path")


def fsync_dir_fd(fd: int) -> None:
    """Make the entries of the directory open as ``fd`` (created, renamed, removed names) durable."""
    os.fsync(fd)


def open_private_root(path: str | os.PathLike, fsync: bool = True) -> int:
    """Create ``path`` (0700, with parents) if missing, check it and its ancestors, and return a descriptor
    of it (O_DIRECTORY). Raises :class:`UnsafeDirectoryError`. The root itself may be reached through a link
    the user made (its target is what gets checked); nothing below it is."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not os.path.lexists(path):
        parent_missing = not path.parent.exists()
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if fsync and not parent_missing:
            pfd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                fsync_dir_fd(pfd)
            finally:
                os.close(pfd)
    real = os.path.realpath(path)
    check_ancestors(real)
    try:
        fd = os.open(real, OPEN_DIR)
    except OSError as exc:
        raise _unsafe(path, f"it cannot be opened as a directory ({exc.strerror})", "choose a directory path") from exc
    try:
        check_private(os.fstat(fd), path, "root")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_subdir(parent_fd: int, name: str, path: str | os.PathLike, create: bool = True,
                        fsync: bool = True) -> int:
    """Open (creating 0700 if ``create``) the directory ``name`` inside the directory ``parent_fd``, never
    through a link, and return its descriptor. Ours but too open: tightened to 0700 (we own it). Another
    owner's, or a link: :class:`UnsafeDirectoryError` (``path`` names it in the message)."""
    created = False
    if create:
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(name, OPEN_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unsafe(path, "it is a symbolic link or not a directory (never followed)", "remove it") from exc
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise _unsafe(path, f"it belongs to uid {st.st_uid}, not this user (uid {os.geteuid()})",
                          "have it removed (its entries are not trusted)")
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
        if created and fsync:
            fsync_dir_fd(parent_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- one process per directory --------------------------------------------------------------------------
class DirLock:
    """An exclusive ``flock`` on a directory, held for the life of the tiers of this process that use it.

    Tiers of one process share it (a tier reopened in place, a restart simulated in a test): the lock keeps
    other processes out, not other objects. The last :meth:`release` (or process exit) drops it."""

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        self.fd = fd
        self.key = key
        self.refs = 1
        self.pid = os.getpid()

    def release(self) -> None:
        with _dir_registry:
            if self.refs <= 0:
                return
            self.refs -= 1
            if self.refs == 0:
                if _dir_locks.get(self.key) is self:
                    del _dir_locks[self.key]
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1


_dir_locks: dict[tuple[int, int], DirLock] = {}
_dir_registry = threading.Lock()


def lock_dir(dir_fd: int, path: str | os.PathLike) -> DirLock:
    """Hold the directory open as ``dir_fd`` exclusively against other processes (non-blocking).

    Raises :class:`DirectoryInUseError` naming ``path`` when another process holds it."""
    st = os.fstat(dir_fd)
    key = (st.st_dev, st.st_ino)
    with _dir_registry:
        held = _dir_locks.get(key)
        if held is not None and held.refs > 0 and held.pid == os.getpid():
            held.refs += 1
            return held
        fd = os.open(".", OPEN_DIR, dir_fd=dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryInUseError(errno.EBUSY, f"disk tier directory {path} is in use by another process; "
                                                   "give each process its own disk directory, or stop the other one") from None
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, f"cannot lock {path} ({exc.strerror}); the disk tier needs a local "
                                     "filesystem with working flock") from exc
        lock = DirLock(fd, key)
        _dir_locks[key] = lock
        return lock


def _forget_locks_in_child() -> None:
    """After fork: the child's copies of our lock descriptors would keep the parent's locks alive after the
    parent lets them go; close them (the parent still holds its own). The child takes locks of its own."""
    global _dir_registry
    _dir_registry = threading.Lock()
    for lock in list(_dir_locks.values()):
        if lock.fd >= 0:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = -1
        lock.refs = 0
    _dir_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def is_dir_locked(path: str | os.PathLike) -> bool:
    """True if some process (this one included) holds :func:`lock_dir` on ``path``; unsure counts as held."""
    try:
        fd = os.open(path, OPEN_DIR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock
    return False
