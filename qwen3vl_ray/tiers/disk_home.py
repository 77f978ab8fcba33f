"""Disk home: the directory a node's disk tier lives in, stable for a machine and its disk (metadata side).

A disk tier is only worth its NVMe if the next process on the same machine finds what the last one stored.
A Ray node id changes with every ``ray start``, so it cannot name the directory. A home is named by the
machine instead, plus a slot number for the case of several agents on one machine at once (the tests'
3-node cluster on one host)::

    <root>/machine-<machine tag>-<slot>/lock                      held (flock) by the live agent
    <root>/machine-<machine tag>-<slot>/<namespace hex>/...        the DiskTier's files

Machine tag: an application-specific hash of ``/etc/machine-id`` (the raw id is meant to stay private, as
systemd asks), which survives reboots and ``ray up`` re-runs and differs between machines sharing an NFS
path. Without a machine id, a random id persisted in ``<root>/.disk-id`` (0600) stands in: it lives on the
disk itself, so it also changes when the disk is wiped or replaced.

Slots: :meth:`DiskHome.claim` takes the lowest slot whose lock it can ``flock`` exclusively and holds it
until :meth:`DiskHome.release` or process exit (the kernel drops the lock of a killed process), so two live
agents never share a directory, and a restarted agent takes the lowest free slot again and finds its files.
Inside one process a second claim by the same owner (a node's agent rebuilt in place) shares the first
claim's slot: a flock would otherwise refuse the process its own directory.

Trim: homes of other slots and machines, old per-node directories (``node-<hex>``) and other namespaces in
this home count against the budget unless a live agent holds them; :meth:`DiskHome.trim` removes the least
recently written ones until the budget is met. It never touches a held home, nor a name it did not make,
nor a namespace directory a live tier holds (its flock, :func:`lock_dir`).

Trust: every directory is opened and checked through :mod:`qwen3vl_ray.tiers.private_dirs` (this user's
alone, or refused in one line).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from qwen3vl_ray.tiers.private_dirs import DIR_MODE, FILE_MODE, NOFOLLOW, OPEN_DIR, is_dir_locked, open_private_root

log = logging.getLogger(__name__)

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
ID_FILE = ".disk-id"  # fallback machine id, inside the root
LOCK_FILE = "lock"
MAX_SLOTS = 256
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HOME = re.compile(r"^machine-([0-9a-f]{16})-(0|[1-9][0-9]{0,3})$")
_LEGACY = re.compile(r"^node-[0-9a-f]{16,128}$")  # the per-Ray-node directories of earlier versions
_OWNER = re.compile(r"^[0-9A-Za-z_.-]{0,128}$")


# -- trust: whose directories we use -------------------------------------------------------------------
def machine_tag(root: str | os.PathLike, id_files: tuple[str, ...] = MACHINE_ID_FILES) -> str:
    """16 hex characters naming this machine (and, through the fallback id, this disk) under ``root``."""
    for f in id_files:
        try:
            with open(f, "rb") as fh:
                raw = fh.read(64).strip().decode("ascii", "replace").lower()
        except OSError:
            continue
        if _HEX32.match(raw):
            return _tag(raw)
    return _tag(_disk_id(Path(root)))


def _tag(machine_id: str) -> str:
    return hashlib.blake2b(machine_id.encode(), digest_size=8, person=b"qwen3vl-ray-disk").hexdigest()


def _disk_id(root: Path) -> str:
    """The random id stored in ``root``, created on first use (published with link(): the first writer wins)."""
    path = root / ID_FILE
    for _ in range(3):
        try:
            with open(path, "rb", opener=lambda p, f: os.open(p, f | NOFOLLOW)) as fh:
                raw = fh.read(64).strip().decode("ascii", "replace")
            if _HEX32.match(raw):
                return raw
            raise OSError(errno.EINVAL, f"{path} does not hold a 32-hex-digit id; remove it to make a new one")
        except FileNotFoundError:
            pass
        tmp = root / f"{ID_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, FILE_MODE)
        try:
            os.write(fd, os.urandom(16).hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process got there first: read its id
        finally:
            os.unlink(tmp)
    raise OSError(errno.EIO, f"cannot create or read {path}")


@dataclass(slots=True)
class Trimmed:
    """One directory :meth:`DiskHome.trim` removed."""

    path: str
    nbytes: int
    mtime: float


class _Lock:
    """An flock'ed lock file; closing the descriptor (or the process dying) releases it."""

    def __init__(self, fd: int, slot: int) -> None:
        self.fd = fd
        self.slot = slot
        self.refs = 1
        self._finalizer = weakref.finalize(self, os.close, fd)

    def drop(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self._finalizer()


# (root, machine, owner) -> the lock this process holds for it; weak: a home dropped unreleased frees it
_held: "weakref.WeakValueDictionary[tuple, _Lock]" = weakref.WeakValueDictionary()
_registry = threading.Lock()


class DiskHome:
    """A claimed home directory under ``root``. Claim with :meth:`claim`; release when the tier closes."""

    def __init__(self, root: Path, machine: str, slot: int, lock: _Lock) -> None:
        self.root = root
        self.machine = machine
        self.slot = slot
        self.path = root / f"machine-{machine}-{slot}"
        self._lock: _Lock | None = lock

    @classmethod
    def claim(cls, root: str | os.PathLike, owner: str = "", machine: str | None = None,
              max_slots: int = MAX_SLOTS) -> "DiskHome":
        """Hold the lowest free slot of this machine under ``root`` (created 0700 if missing).

        ``owner`` (e.g. a node id) only matters inside one process: a second claim by the same owner shares
        the first one's slot. Raises ``OSError`` when all ``max_slots`` are held or locks do not work here.
        """
        if not _OWNER.match(owner):
            raise ValueError(f"owner must be 0-128 letters, digits, _ . -, got {owner!r}")
        root = Path(os.path.expanduser(os.fspath(root)))
        os.close(open_private_root(root))  # created 0700 if missing; someone else's or an open one: refused
        machine = machine_tag(root) if machine is None else machine
        if not re.fullmatch(r"[0-9a-f]{16}", machine):
            raise ValueError(f"machine tag must be 16 lowercase hex characters, got {machine!r}")
        key = (os.path.realpath(root), machine, owner)
        with _registry:
            lock = _held.get(key) if owner else None
            if lock is not None and lock.refs > 0:
                lock.refs += 1
                return cls(root, machine, lock.slot, lock)
            for slot in range(max_slots):
                lock = _try_lock(root / f"machine-{machine}-{slot}", slot, make_dir=True)
                if lock is not None:
                    if owner:
                        _held[key] = lock
                    home = cls(root, machine, slot, lock)
                    os.utime(home.path)  # last used now: the trim of another agent ranks it by this
                    log.info("disk home %s claimed (owner %s)", home.path, owner or "-")
                    return home
        raise OSError(errno.EBUSY, f"all {max_slots} disk homes of machine {machine} under {root} are held")

    def release(self) -> None:
        """Let the slot go (idempotent). Files stay for the next claim."""
        if self._lock is not None:
            self._lock.drop()
            self._lock = None

    close = release

    @property
    def held(self) -> bool:
        return self._lock is not None

    def trim(self, budget_bytes: int, used_bytes: int, keep_namespace: str) -> list[Trimmed]:
        """Remove unheld directories, least recently written first, until ``used_bytes`` (this home's live
        tier) plus what they hold fits ``budget_bytes``. Candidates: other homes under the root (any machine
        or slot), old ``node-<hex>`` directories, and namespace directories of this home other than
        ``keep_namespace``. Held homes neither count nor go. Returns what was removed (also logged)."""
        if budget_bytes < 0 or used_bytes < 0:
            raise ValueError(f"budget_bytes and used_bytes must be >= 0, got {budget_bytes} and {used_bytes}")
        found: list[tuple[float, Path, int, bool]] = []  # (newest mtime, path, bytes, is a home)
        uid = os.geteuid()
        for entry in _dirs(self.root, uid):
            if entry.name == self.path.name:
                for sub in _dirs(self.path, uid):
                    if _HEX32.match(sub.name) and sub.name != keep_namespace and not is_dir_locked(sub.path):
                        found.append((*_size_and_mtime(Path(sub.path)), False))
            elif _HOME.match(entry.name) or _LEGACY.match(entry.name):
                p = Path(entry.path)
                if not _is_held(p):
                    found.append((*_size_and_mtime(p), True))
        over = used_bytes + sum(n for _, _, n, _ in found) - budget_bytes
        removed: list[Trimmed] = []
        for mtime, path, nbytes, is_home in sorted(found, key=lambda f: (f[0], str(f[1]))):
            if over <= 0:
                break
            if _remove(path, is_home):
                removed.append(Trimmed(str(path), nbytes, mtime))
                log.info("disk home %s: trimmed %s (%d bytes, last written %.0f s ago) to keep %d bytes under "
                         "the %d-byte budget", self.path.name, path, nbytes, _age(mtime), used_bytes, budget_bytes)
            over -= nbytes  # removed, or taken since the scan (then it no longer counts either)
        return removed

    def __repr__(self) -> str:
        return f"DiskHome({str(self.path)!r}, held={self.held})"


def _still_there(fd: int, path: Path) -> bool:
    """The locked descriptor is still the file at ``path`` (not one a trim unlinked meanwhile)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    now = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev)


def _try_lock(home: Path, slot: int, make_dir: bool) -> _Lock | None:
    """Exclusive non-blocking flock of ``home/lock``; None if another holder has it (or it went away)."""
    for _ in range(8):  # a concurrent trim may remove the directory under us: make it again
        if make_dir:
            try:
                home.mkdir(mode=DIR_MODE, exist_ok=True)
            except FileExistsError:
                return None  # a file or a link by that name: not ours, skip the slot
            st = os.stat(home, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                return None  # a link, or someone else's directory: skip the slot
            if st.st_mode & 0o777 != DIR_MODE:
                os.chmod(home, DIR_MODE)
        try:
            fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT | NOFOLLOW, FILE_MODE)
        except FileNotFoundError:
            if not make_dir:
                return None
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, f"cannot lock {home / LOCK_FILE} ({exc.strerror}); the disk directory "
                                     "must be on a filesystem with working flock") from exc
        if _still_there(fd, home / LOCK_FILE):
            return _Lock(fd, slot)
        os.close(fd)
        if not make_dir:
            return None
    return None


def _is_held(home: Path) -> bool:
    try:
        fd = os.open(home / LOCK_FILE, os.O_RDWR | NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: treat as held, never remove it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _remove(path: Path, is_home: bool) -> bool:
    """Remove ``path``; a home only while holding its lock, its lock file last so a concurrent claim either
    fails to lock the old file or makes a new one in a directory we then leave alone."""
    if not is_home:  # a namespace directory of our own (held) home: only while no tier holds it
        try:
            fd = os.open(path, OPEN_DIR)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a tier opened it since the scan
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        return not path.exists()
    lock = _try_lock(path, -1, make_dir=False)
    if lock is None:
        return False  # claimed since the scan
    try:
        for child in os.scandir(path):
            if child.name == LOCK_FILE:
                continue
            if child.is_dir(follow_symlinks=False):
                shutil.rmtree(child.path, ignore_errors=True)
            else:
                os.unlink(child.path)
        os.unlink(path / LOCK_FILE)
        os.rmdir(path)
    except OSError as exc:  # e.g. ENOTEMPTY: a claim made a new lock file meanwhile; it owns the directory now
        log.info("disk home trim: left %s (%s)", path, exc)
        return False
    finally:
        lock.drop()
    return True


def _dirs(path: Path, uid: int) -> list[os.DirEntry]:
    """Real directories (no links) in ``path`` owned by ``uid``: others' directories are never ours to trim."""
    out = []
    with os.scandir(path) as it:
        for e in it:
            try:
                if e.is_dir(follow_symlinks=False) and e.stat(follow_symlinks=False).st_uid == uid:
                    out.append(e)
            except OSError:
                continue
    return out


def _size_and_mtime(path: Path) -> tuple[float, Path, int]:
    """(newest mtime in the tree, path, bytes of its regular files)."""
    newest, total = os.stat(path, follow_symlinks=False).st_mtime, 0
    for dirpath, dirnames, filenames in os.walk(path):  # never descends into links
        for names, is_file in ((dirnames, False), (filenames, True)):
            for name in names:
                try:
                    st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                except OSError:
                    continue
                newest = max(newest, st.st_mtime)
                total += st.st_size if is_file else 0
    return newest, path, total


def _age(mtime: float) -> float:
    return max(0.0, time.time() - mtime)
