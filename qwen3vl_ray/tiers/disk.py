"""Disk tier: one file per entry under ``<path>/<namespace hex>/<key hex[:2]>/<key hex>.qvt`` (data side).

Crash safety: a store writes a temp file in the entry's directory, fsyncs it, renames it over the final
name and fsyncs the directory, so a file with the final name is always complete (a kill leaves at most a
temp file, removed at the next start). A new 2-hex directory is fsynced in its parent, and a remove fsyncs
the entry's directory, so a power loss neither loses a committed entry nor brings back a removed one.
Every read checks the header checksum, the file length and the payload's xxh3_128 checksum; a file that
fails is removed, counted in ``corrupt`` and served as a miss.

Trust (fails closed): the root and the namespace directory must be this user's and writable by nobody
else (``private_dirs.open_private_root``/``open_private_subdir``: anything else is refused in one line naming
the path and the fix). The namespace directory is held open and every entry is reached relative to that
descriptor, so renaming directories under a live tier never redirects it. Entry files are opened with
``O_NOFOLLOW | O_NONBLOCK`` and served only if they are regular files of this user; anything else under an
entry's name (a link, a FIFO, another user's file) is unlinked, counted in ``unsafe`` and a miss, never a
hang. A 2-hex sub-directory that is a link is removed at start-up, never followed; one of another owner
is refused. Every OS error on a read is a counted miss (``io_errors``) and the entry leaves the index
(except the process-wide, passing ones: out of descriptors or memory); on a store, a failed put.

One process per directory: the tier holds an exclusive ``flock`` on its namespace directory
(``private_dirs.lock_dir``), so a second process fails at once with ``DirectoryInUseError`` instead of
storing a second budget's worth. Tiers of one process share the lock. Temp files carry a random token of
the process that wrote them: at start-up (lock held, so no other process writes here) every temp file
without this process' token is a dead writer's and is removed. No PIDs, so a reused PID keeps nothing.

Restart: the index (key -> file size) is rebuilt from the directory by reading headers only, so a new
process serves what the last one left. Only this namespace's directory is read; a header whose namespace
or key disagrees with where it lies is treated as corrupt. Keys become paths only through ``key_hex``.

Budget: ``used_bytes`` counts whole files (header + payload) plus stores in flight, and a store is refused
(``False``) if it would take the directory over ``capacity_bytes`` even for a moment.

Threads: one lock guards the index and the accounting; file I/O runs outside it except the rename that
publishes a store and the unlink of a remove or a drop. A reader opens by name, so a concurrent replace
gives it either the old or the new complete file. The held-room store (``allocate`` under the cache's
metadata lock, ``write`` outside it) lets the cache write and fsync without holding its lock: ``write``
publishes (renames and indexes) itself, so ``commit`` has nothing left to do. ``discard`` unlinks and leaves
the directory fsync to ``sync``, which the cache calls after releasing its lock.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import math
import os
import re
import stat
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import xxhash

from qwen3vl_ray.codecs import decode, make_codec
from qwen3vl_ray.codecs.base import dtype_from_name, dtype_name
from qwen3vl_ray.errors import CapacityError, CodecError, CorruptEntryError
from qwen3vl_ray.keys import CacheKey, Namespace, key_from_hex, key_hex, validate_key
from qwen3vl_ray.tiers import disk_format as fmt
from qwen3vl_ray.tiers import private_dirs
from qwen3vl_ray.tiers.base import PreparedStore, Reservation, Tier, encode_payload
from qwen3vl_ray.tiers.config import TierConfig

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
TMP_SUFFIX = ".tmp"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NONBLOCK: a FIFO planted under an entry's name opens at once (then fails the regular-file check) instead
# of waiting forever for a writer; on a regular file it changes nothing.
_OPEN_READ = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
_OPEN_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_OPEN_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_HEX2 = re.compile(r"^[0-9a-f]{2}$")
# Errors of the process, not of the entry: a miss, but the file is fine and stays indexed.
_PASSING = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.ENOBUFS})


class UnsafeEntryError(CorruptEntryError):
    """Something other than this user's regular file lies under an entry's name (link, FIFO, foreign file)."""


_token_of: tuple[int, str] = (-1, "")


def _process_token() -> str:
    """16 random hex characters naming this process in temp-file names (new after a fork)."""
    global _token_of
    pid = os.getpid()
    if _token_of[0] != pid:
        _token_of = (pid, os.urandom(8).hex())
    return _token_of[1]


def _fsync_dir(name: str, dir_fd: int) -> None:
    """fsync the directory ``name`` (``"."``: ``dir_fd`` itself) inside the directory open as ``dir_fd``."""
    fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, buf, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < view.nbytes:
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # a regular file never does this without raising; refuse to spin on it
            raise OSError(f"pwrite wrote {n} bytes at offset {offset + done}")
        done += n


def _byte_view(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as a flat writable memoryview, no copy, for ``preadv`` to fill.

    Through ctypes rather than ``t.reshape(-1).view(torch.uint8).numpy()``: three torch dispatches cost
    ~6 us per read here, ctypes ~1.5 us, and it works for dtypes numpy lacks (bfloat16). The view does
    not keep ``t`` alive: the caller holds ``t`` for as long as it uses the view.
    """
    return memoryview((ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


def _np_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 numpy view (CPU; copies only when it must be made contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    return (flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)).numpy()


# Payloads move in chunks, and each chunk is hashed right after the kernel copied it (read) or right
# after it was handed to the kernel (write), while its cache lines are still in L2/L3: the checksum then
# costs compute only, not a second pass over DRAM. 2 MiB: small enough that a chunk is still in this core's
# caches when it is hashed (neighbours thrash the shared L3), large enough that syscalls stay few (32 per
# 64 MiB). On the shared 2-core dev box, 1, 2 and 4 MiB measured within noise of each other (CPU time
# favoured larger chunks for 8 MiB entries, wall time smaller ones for 64 MiB entries).
# Tried and measured worse here (benchmarks.tiers, paired with the old code on the same box): hashing on
# a helper thread beside the I/O (xxhash and preadv both release the GIL). Waiting for the helper cost a
# scheduler wake-up per get (8 MiB warm get fell to 0.2x the plain read at load 6); a helper the reader
# never waits for (it folds in what the helper has not) still lost ~0.1-0.2x at 8 MiB at load 3: GIL
# hand-offs between the two threads and no free core on the shared 2-core box. The hash here is xxhash's
# dispatched SIMD build, ~30 GB/s on this box, so a serial hash caps an 8 MiB warm get near 0.8x.
CHUNK = 2 << 20
FADVISE_MIN = 1 << 20  # payloads this large get POSIX_FADV_SEQUENTIAL (bigger readahead when cold)
_fadvise = getattr(os, "posix_fadvise", None)  # Linux; absent on macOS


def _read_and_hash(fd: int, view: memoryview, offset: int) -> tuple[int, bytes]:
    """Fill ``view`` from file ``offset`` on and return (bytes read, xxh3_128 of them)."""
    n = view.nbytes
    if n <= CHUNK:  # one chunk: one-shot hash, fewer Python calls on the small-entry path
        got = os.preadv(fd, [view], offset)
        if got == n or got == 0:
            return got, xxhash.xxh3_128_digest(view[:got])
        h = xxhash.xxh3_128(view[:got])  # a short read: carry on chunk by chunk
    else:
        h, got = xxhash.xxh3_128(), 0
    while got < n:
        chunk = view[got: got + CHUNK]
        r = os.preadv(fd, [chunk], offset + got)
        if r == 0:
            break  # end of file: truncated, the caller compares ``got`` with what the header promised
        h.update(chunk if r == chunk.nbytes else chunk[:r])
        got += r
    return got, h.digest()


def _write_and_hash(fd: int, view: memoryview, offset: int) -> bytes:
    """Write ``view`` at file ``offset`` in chunks; return xxh3_128 of what was written."""
    h = xxhash.xxh3_128()
    done, n = 0, view.nbytes
    while done < n:
        chunk = view[done: done + CHUNK]
        w = os.pwrite(fd, chunk, offset + done)
        if w <= 0:
            raise OSError(f"pwrite wrote {w} bytes at offset {offset + done}")
        h.update(chunk if w == chunk.nbytes else chunk[:w])
        done += w
    return h.digest()


class DiskTier(Tier):
    """Entries as checksummed files under ``cfg.path``. Built by :func:`~qwen3vl_ray.tiers.factory.make_tier`."""

    name = "disk"
    holds_room = True
    slow_writes = True

    def __init__(self, cfg: TierConfig, namespace: Namespace, lease: Any = None) -> None:
        """``lease``: anything with ``release()`` held for the tier's life and released by :meth:`close`
        (the :class:`~qwen3vl_ray.tiers.disk_home.DiskHome` that ``cfg.path`` is).

        Raises :class:`~qwen3vl_ray.tiers.private_dirs.UnsafeDirectoryError` when the root or the namespace
        directory is not this user's alone, and :class:`~qwen3vl_ray.tiers.private_dirs.DirectoryInUseError`
        when another process holds the directory."""
        if cfg.kind != "disk" or not cfg.path:
            raise ValueError(f"DiskTier needs a disk TierConfig with a path, got kind={cfg.kind!r} path={cfg.path!r}")
        self.cfg = cfg
        self.namespace = namespace
        self.lease = lease
        self.capacity_bytes = cfg.capacity_bytes
        self.codec = make_codec(cfg.codec)
        self._raw = self.codec.name == "none"
        self.root = Path(os.path.expanduser(cfg.path))
        self.dir = self.root / namespace.hex
        self._dir_str = str(self.dir)
        self._uid = os.geteuid()
        root_fd = private_dirs.open_private_root(self.root, fsync=cfg.fsync)
        try:
            self._dfd = private_dirs.open_private_subdir(root_fd, namespace.hex, self.dir, fsync=cfg.fsync)
        finally:
            os.close(root_fd)
        # Closed only when the tier is collected: close() may race a reader still using the descriptor.
        self._close_fd = weakref.finalize(self, os.close, self._dfd)
        try:
            lock = private_dirs.lock_dir(self._dfd, self.dir)
        except BaseException:
            self._close_fd()
            raise
        self._unlock = weakref.finalize(self, lock.release)
        self._closed = False
        self._index: dict[CacheKey, int] = {}  # key -> file size in bytes (header + payload)
        self._used = 0
        self._reserved = 0
        self._unsynced: dict[str, int] = {}  # 2-hex directory -> discards in it not yet fsynced (a generation)
        self._lock = threading.Lock()
        self._tmp_ids = itertools.count()
        self._c = dict(puts=0, gets=0, hits=0, misses=0, rejected=0, removes=0, corrupt=0, unsafe=0, io_errors=0,
                       bytes_written=0, bytes_read=0, recovered=0, stray_tmp_removed=0, trimmed_on_start=0)
        try:
            self._rebuild()
        except BaseException:
            self._unlock()
            raise

    # -- paths -----------------------------------------------------------------------------------
    def path_of(self, key: CacheKey) -> Path:
        """Where the entry of ``key`` lies (for people and tests; the tier itself opens names relative to
        the namespace directory's descriptor)."""
        return Path(f"{self._dir_str}/{self._rel(key)}")

    @staticmethod
    def _rel(key: CacheKey) -> str:
        h = key_hex(key)
        return f"{h[:2]}/{h}{fmt.SUFFIX}"

    # -- start-up --------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        found: list[tuple[float, CacheKey, int]] = []
        with os.scandir(self._dfd) as it:
            subs = sorted(e.name for e in it if _HEX2.match(e.name))
        for name in subs:
            sfd = self._open_subdir_at_start(name)
            if sfd is None:
                continue
            try:
                self._scan_subdir(name, sfd, found)
            finally:
                os.close(sfd)
        self._index = {k: size for _, k, size in found}
        self._used = sum(size for _, _, size in found)
        if self._used > self.capacity_bytes:  # budget shrank since the files were written: oldest go
            for _, key, size in sorted(found):
                if self._used <= self.capacity_bytes:
                    break
                self._unlink_quiet(self._rel(key))
                del self._index[key]
                self._used -= size
                self._c["trimmed_on_start"] += 1
        self._c["recovered"] = len(self._index)
        log.info("disk tier %s: %d entries (%d bytes) recovered, %d corrupt and %d unsafe removed, %d temp files "
                 "removed", self.dir, len(self._index), self._used, self._c["corrupt"], self._c["unsafe"],
                 self._c["stray_tmp_removed"])

    def _open_subdir_at_start(self, name: str) -> int | None:
        """A 2-hex sub-directory's descriptor; a link there is removed (never followed), another user's
        directory refused (we cannot empty it, and what it holds is not ours)."""
        try:
            st = os.stat(name, dir_fd=self._dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            log.warning("disk tier: %s/%s is a symbolic link; removed, never followed", self.dir, name)
            self._unlink_quiet(name)
            self._c["unsafe"] += 1
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None  # a file by that name: stores under this prefix fail (counted), nothing is served
        return private_dirs.open_private_subdir(self._dfd, name, self.dir / name, create=False, fsync=False)

    def _scan_subdir(self, sub: str, sfd: int, found: list) -> None:
        token = _process_token()
        with os.scandir(sfd) as it:
            names = [e.name for e in it]
        for name in names:
            rel = f"{sub}/{name}"
            if name.endswith(TMP_SUFFIX):
                # ".<hex>.<token>.<n>.tmp": we hold the directory's lock, so only this process writes here;
                # a temp file without our token is a dead writer's.
                parts = name.split(".")
                if len(parts) < 4 or parts[-3] != token:
                    self._unlink_quiet(rel)
                    self._c["stray_tmp_removed"] += 1
                continue
            if not name.endswith(fmt.SUFFIX):
                continue
            try:
                key = key_from_hex(name[: -len(fmt.SUFFIX)])
            except ValueError:
                continue  # not ours to judge
            if name[:2] != sub:
                self._drop(rel, None, "file lies in the wrong directory")
                continue
            try:
                fd = os.open(rel, _OPEN_READ, dir_fd=self._dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM):  # a link, a socket, not ours
                    self._drop(rel, None, f"cannot be opened safely ({exc.strerror})", unsafe=True)
                else:
                    log.warning("disk tier: cannot open %s/%s at start-up: %s", self.dir, rel, exc)
                continue
            st = None
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    continue  # a directory named like an entry: not ours to judge, never served
                self._check_file(st)
                self._check(fmt.decode_header(os.pread(fd, fmt.MAX_HEADER, 0)), key, st.st_size)
            except UnsafeEntryError as exc:
                self._drop(rel, st, str(exc), unsafe=True)
                continue
            except CorruptEntryError as exc:
                self._drop(rel, st, str(exc))
                continue
            except OSError as exc:  # an I/O error: skip, keep going
                log.warning("disk tier: cannot read %s/%s at start-up: %s", self.dir, rel, exc)
                continue
            finally:
                os.close(fd)
            found.append((st.st_mtime, key, st.st_size))

    def _check_file(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeEntryError(f"not a regular file (mode {st.st_mode:o})")
        if st.st_uid != self._uid:
            raise UnsafeEntryError(f"file belongs to uid {st.st_uid}, not this user")

    def _check(self, h: fmt.EntryHeader, key: CacheKey, size: int) -> None:
        if h.key != key:
            raise CorruptEntryError(f"header names key {h.key.hex()}, file name says {key.hex()}")
        if h.namespace != self.namespace.digest:
            raise CorruptEntryError(f"entry belongs to namespace {h.namespace.hex()}, not {self.namespace.hex}")
        if h.file_len != size:
            raise CorruptEntryError(f"file is {size} bytes, header says {h.file_len}: truncated or overwritten")

    # -- accounting ------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used + self._reserved

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> Iterator[CacheKey]:
        with self._lock:
            return iter(list(self._index))

    def entry_nbytes(self, key: CacheKey) -> int | None:
        return self._index.get(key)

    # -- store -----------------------------------------------------------------------------------
    def prepare_store(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        key, payload, plen = encode_payload(self.codec, self.name, key, tensor)
        dtype = dtype_name(tensor.dtype)
        shape = tuple(tensor.shape)
        fmt.check_fields(dtype, self.codec.spec(), len(shape))  # a bad call fails here, before any file exists
        nbytes = fmt.header_len(dtype, self.codec.spec(), len(shape)) + plen
        if nbytes > self.capacity_bytes:
            raise CapacityError(f"entry of {nbytes} bytes (header included) is larger than the whole disk tier ({self.capacity_bytes} bytes)")
        return PreparedStore(key, nbytes, payload, {"dtype": dtype, "shape": shape, "len": plen})

    def complete_store(self, prepared: PreparedStore) -> bool:
        res = self.allocate(prepared)
        return res is not None and self.write(res)

    # -- held-room store ---------------------------------------------------------------------------
    def allocate(self, prepared: PreparedStore) -> Reservation | None:
        size = prepared.nbytes
        with self._lock:
            if self._closed or self._used + self._reserved + size > self.capacity_bytes:
                self._c["rejected"] += 1
                return None
            self._reserved += size
        return Reservation(prepared, size)

    def write(self, res: Reservation) -> bool:
        # The file write, fsync, rename and index update all happen here; the reservation turns into used
        # bytes on success and is released either way.
        size, res.slot = res.slot, 0
        try:
            return self._write(res.prepared)
        finally:
            with self._lock:
                self._reserved -= size

    def commit(self, res: Reservation) -> None:
        """Nothing left: ``write`` published the file (a reader finds it complete or not at all)."""

    def abort(self, res: Reservation) -> None:
        with self._lock:
            self._reserved -= res.slot
        res.slot = 0

    def _write(self, prepared: PreparedStore) -> bool:
        key, meta = prepared.key, prepared.meta
        data = memoryview(_np_bytes(prepared.payload) if self._raw else prepared.payload).cast("B")
        spec = self.codec.spec()
        hlen = fmt.header_len(meta["dtype"], spec, len(meta["shape"]))
        dfd = self._dfd
        final = self._rel(key)
        sub = final[:2]
        tmp = f"{sub}/.{final[3: -len(fmt.SUFFIX)]}.{_process_token()}.{next(self._tmp_ids)}{TMP_SUFFIX}"
        fd, published = -1, False
        try:
            try:
                fd = os.open(tmp, _OPEN_WRITE, FILE_MODE, dir_fd=dfd)
            except FileNotFoundError:  # first entry under this 2-hex-digit prefix
                self._make_subdir(sub)
                fd = os.open(tmp, _OPEN_WRITE, FILE_MODE, dir_fd=dfd)
            try:
                # Payload first (hashed chunk by chunk as it goes out), then the header that carries its
                # checksum. Nobody can see the file before the rename, so the order is safe.
                digest = _write_and_hash(fd, data, hlen)
                _pwrite_all(fd, fmt.encode_header(key, self.namespace.digest, meta["dtype"], spec, meta["shape"],
                                                  data.nbytes, digest), 0)
                if self.cfg.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                os.replace(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
                old = self._index.get(key)
                self._index[key] = prepared.nbytes
                self._used += prepared.nbytes - (old or 0)
                self._c["puts"] += 1
                self._c["bytes_written"] += prepared.nbytes
            published = True
            if self.cfg.fsync:
                _fsync_dir(sub, dfd)  # makes the rename durable; the file is complete either way
        except OSError:
            if published:  # only the directory fsync failed: the entry is complete, indexed and served
                log.warning("disk tier: directory fsync after storing %s failed", key_hex(key), exc_info=True)
                with self._lock:
                    self._c["io_errors"] += 1
                return True
            log.warning("disk tier: store of %s failed", key_hex(key), exc_info=True)
            if fd >= 0:
                self._unlink_quiet(tmp)
            with self._lock:
                self._c["io_errors"] += 1
                self._c["rejected"] += 1
            return False
        except BaseException:  # never leave a temp file behind, whatever stopped us
            if fd >= 0:
                self._unlink_quiet(tmp)
            raise
        return True

    def _make_subdir(self, sub: str) -> None:
        """Create the 2-hex directory ``sub`` (0700), durable in its parent before any entry lands in it.
        Raises ``OSError`` (a failed put) if what is there is a link or not ours."""
        try:
            os.close(private_dirs.open_private_subdir(self._dfd, sub, self.dir / sub, fsync=self.cfg.fsync))
        except private_dirs.UnsafeDirectoryError as exc:
            raise OSError(errno.EPERM, str(exc)) from exc

    # -- reads -----------------------------------------------------------------------------------
    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        key = validate_key(key)
        with self._lock:
            self._c["gets"] += 1
            present = key in self._index and not self._closed
            if not present:
                self._c["misses"] += 1
        if not present:
            return None
        rel = self._rel(key)
        try:
            fd = os.open(rel, _OPEN_READ, dir_fd=self._dfd)
        except FileNotFoundError:  # removed under us (concurrent remove, or by hand)
            self._forget_missing(key, rel)
            return None
        except OSError as exc:  # a link (ELOOP), a socket (ENXIO), no permission, out of descriptors, ...
            self._read_failed(key, rel, None, exc)
            return None
        st = None
        try:
            st = os.fstat(fd)
            self._check_file(st)
            h = fmt.decode_header(os.pread(fd, fmt.MAX_HEADER, 0))
            self._check(h, key, st.st_size)
            result = self._read_payload(fd, h, out)
        except UnsafeEntryError as exc:
            self._drop(rel, st, str(exc), key, unsafe=True)
            return None
        except (CorruptEntryError, CodecError) as exc:
            self._drop(rel, st, str(exc), key)
            return None
        except OSError as exc:
            self._read_failed(key, rel, st, exc)
            return None
        finally:
            os.close(fd)
        with self._lock:
            self._c["hits"] += 1
            self._c["bytes_read"] += h.file_len
        return result

    def _read_payload(self, fd: int, h: fmt.EntryHeader, out: torch.Tensor | None) -> torch.Tensor:
        shape = h.shape
        try:
            dtype = dtype_from_name(h.dtype)
        except CodecError as exc:
            raise CorruptEntryError(str(exc)) from exc
        if out is not None and (out.dtype != dtype or tuple(out.shape) != shape):
            raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, entry is {dtype} {shape}")
        if h.payload_len >= FADVISE_MIN and _fadvise is not None:  # cold: larger readahead; warm: no-op
            _fadvise(fd, h.header_len, h.payload_len, os.POSIX_FADV_SEQUENTIAL)
        if h.codec == "none":
            need = math.prod(shape) * dtype.itemsize
            if need != h.payload_len:  # checked before allocating anything of the header's size
                raise CorruptEntryError(f"payload is {h.payload_len} bytes, {h.dtype} {shape} needs {need}")
            # Straight into ``out`` when it is a contiguous CPU tensor: no staging buffer, no extra copy.
            direct = out is not None and out.device.type == "cpu" and out.is_contiguous()
            dst = out if direct else torch.empty(shape, dtype=dtype)
            self._fill(fd, _byte_view(dst) if need else memoryview(bytearray()), h)
            if out is not None and not direct:
                out.copy_(dst)
                return out
            return dst
        buf = bytearray(h.payload_len)
        self._fill(fd, memoryview(buf), h)
        if out is not None:
            # straight into ``out`` (its dtype and shape are the header's): no result tensor to allocate and copy;
            # on a GPU ``out`` the compressed codes cross the bus and expand there
            try:
                return decode(buf, out=out)
            except ValueError as exc:  # the payload holds another tensor than its header says
                raise CorruptEntryError(str(exc)) from exc
        t = decode(buf)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CorruptEntryError(f"payload decodes to {t.dtype} {tuple(t.shape)}, header says {dtype} {shape}")
        if out is not None:
            out.copy_(t)
            return out
        return t

    @staticmethod
    def _fill(fd: int, view: memoryview, h: fmt.EntryHeader) -> None:
        got, digest = _read_and_hash(fd, view, h.header_len)
        if got != h.payload_len:
            raise CorruptEntryError(f"read {got} of {h.payload_len} payload bytes: truncated")
        if digest != h.checksum:
            raise CorruptEntryError("payload checksum mismatch")

    def contains(self, key: CacheKey) -> bool:
        return validate_key(key) in self._index

    def remove(self, key: CacheKey) -> bool:
        with self._lock:
            rel = self._unlink_entry(key)
        if rel is None:
            return False
        if self.cfg.fsync:  # a power loss must not bring the entry back
            try:
                _fsync_dir(rel[:2], self._dfd)
            except OSError:
                log.warning("disk tier: directory fsync after removing %s failed", rel, exc_info=True)
                with self._lock:
                    self._c["io_errors"] += 1
        return True

    def discard(self, key: CacheKey) -> bool:
        with self._lock:
            rel = self._unlink_entry(key)
            if rel is None:
                return False
            if self.cfg.fsync:
                self._unsynced[rel[:2]] = self._unsynced.get(rel[:2], 0) + 1
        return True

    def _unlink_entry(self, key: CacheKey) -> str | None:
        """Take ``key`` out of the index and unlink its file (the caller holds the lock and makes the removal
        durable, now or at the next sync); its relative path, or None when it is not stored."""
        key = validate_key(key)
        size = self._index.pop(key, None)
        if size is None:
            return None
        self._used -= size
        self._c["removes"] += 1
        rel = self._rel(key)
        self._unlink_quiet(rel)
        return rel

    def sync(self) -> None:
        """fsync every directory with a discard not yet synced. Each caller syncs all it sees pending (its own
        discards included), and clears a directory only if no discard landed in it meanwhile, so no caller
        returns before its own discards are durable."""
        if not self._unsynced:  # the common case, read without the lock: nothing discarded since the last sync
            return
        with self._lock:
            pending = dict(self._unsynced)
        for sub, gen in pending.items():
            try:
                _fsync_dir(sub, self._dfd)
            except OSError:
                log.warning("disk tier: directory fsync after removing entries in %s/%s failed", self.dir, sub,
                            exc_info=True)
                with self._lock:
                    self._c["io_errors"] += 1
            with self._lock:
                if self._unsynced.get(sub) == gen:
                    del self._unsynced[sub]

    # -- failure handling ---------------------------------------------------------------------------
    def _read_failed(self, key: CacheKey, rel: str, st: os.stat_result | None, exc: OSError) -> None:
        """An OS error reading ``key``: a counted miss, never an exception. The entry leaves the index (its
        file removed, so the budget stays true) unless the error is the process' own and passing."""
        if exc.errno in _PASSING:
            log.warning("disk tier read of %s/%s failed (%s); entry kept", self.dir, rel, exc)
            with self._lock:
                self._c["io_errors"] += 1
                self._c["misses"] += 1
            return
        unsafe = exc.errno in (errno.ELOOP, errno.ENXIO)  # a link or a socket under the entry's name
        with self._lock:
            self._c["io_errors"] += 1
        self._drop(rel, st, f"read failed: {exc}", key, unsafe=unsafe, counted=unsafe)

    def _drop(self, rel: str, st: os.stat_result | None, why: str, key: CacheKey | None = None,
              unsafe: bool = False, counted: bool = True) -> None:
        """Remove the file at ``rel`` (relative to the namespace directory) that was judged bad, and its
        index entry; a miss when ``key`` is given. ``counted``: in ``unsafe`` or ``corrupt``."""
        log.warning("disk tier: %s entry %s/%s removed (%s)", "unsafe" if unsafe else "bad", self.dir, rel, why)
        with self._lock:
            if counted:
                self._c["unsafe" if unsafe else "corrupt"] += 1
            if key is not None:
                self._c["misses"] += 1
            try:
                now = os.stat(rel, dir_fd=self._dfd, follow_symlinks=False)
            except OSError:
                now = None
            # Unlink only the file we judged: a concurrent store may have just renamed a good one in. Both
            # renames and drops happen under this lock, so what is here now is what the index describes.
            if now is not None and (st is None or (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)):
                if not stat.S_ISDIR(now.st_mode):
                    self._unlink_quiet(rel)
                if key is not None and key in self._index:
                    self._used -= self._index.pop(key)
            elif now is None and key is not None and key in self._index:
                self._used -= self._index.pop(key)

    def _forget_missing(self, key: CacheKey, rel: str) -> None:
        with self._lock:
            self._c["misses"] += 1
            try:
                os.stat(rel, dir_fd=self._dfd, follow_symlinks=False)
            except FileNotFoundError:
                if key in self._index:
                    self._used -= self._index.pop(key)
            except OSError:
                pass

    def _unlink_quiet(self, rel: str) -> None:
        try:
            os.unlink(rel, dir_fd=self._dfd)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("disk tier: cannot remove %s/%s", self.dir, rel, exc_info=True)

    def close(self) -> None:
        """Stop serving and storing, and let the directory (and the lease) go for the next process. Idempotent."""
        with self._lock:
            self._closed = True
        self._unlock()
        if self.lease is not None:
            self.lease.release()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "name": self.name,
                "path": str(self.dir),
                "codec": self.codec.spec(),
                "capacity_bytes": self.capacity_bytes,
                "used_bytes": self._used + self._reserved,
                "free_bytes": self.capacity_bytes - self._used - self._reserved,
                "entries": len(self._index),
                **self._c,
            }

    def __repr__(self) -> str:
        return f"DiskTier({str(self.dir)!r}, {self.capacity_bytes} B, codec={self.codec.spec()!r})"
