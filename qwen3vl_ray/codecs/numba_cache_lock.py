"""Cross-process locking of numba's on-disk kernel cache, which numba itself leaves unlocked (numba/numba#10128).

Why: every process on a node (the node agent, the serving workers, a job's driver, ``qwen3vl-ray warm-kernels``
with several jobs) compiles the fused codec kernels on first use and saves them into one cache directory. Numba
keeps one index file per kernel, mapping each compiled signature to a numbered data file. ``save`` reads the
index, takes the first free number, writes the index, then the data, with nothing held in between. Two processes
saving different signatures of one kernel at once can both take number N. The index then names N for one
signature while N holds the other's machine code. A later process loads that code for the wrong argument types
or the wrong kernel variant: silently wrong payloads, or a crash. The same can happen to a load that reads a data
file between another process's index and data writes.

:func:`install` wraps ``IndexDataCacheFile.save``, ``flush`` (which empties the index) and ``load`` in an
``flock`` on ``<index>.lock`` beside the index: an exclusive lock for a save's read-modify-write and a flush, a
shared one for a load (its index read, then its data read). Compiling stays outside the lock, so processes still
compile in parallel. Only the few milliseconds of file I/O are serialized. Where the lock file cannot be opened (a read-only cache
directory), numba runs as before, unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os

log = logging.getLogger(__name__)

_MARK = "_qwen3vl_ray_locked"


@contextlib.contextmanager
def _flocked(index_path: str | None, mode: int):
    """Hold ``flock(mode)`` on ``index_path + ".lock"`` (created 0600), or nothing where it can't be opened."""
    fd = None
    if index_path:
        try:
            fd = os.open(index_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.debug("numba cache lock %s.lock not taken: %s", index_path, exc)
    try:
        if fd is not None:
            fcntl.flock(fd, mode)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases its flock


def _locked(method, mode: int):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _flocked(getattr(self, "_index_path", None), mode):
            return method(self, *args, **kwargs)

    return wrapper


def install() -> bool:
    """Lock numba's cache file I/O across processes (idempotent). False where this numba has no
    ``IndexDataCacheFile`` with ``save`` and ``load`` (its cache then runs unlocked, as numba ships it)."""
    try:
        import numba
        from numba.core import caching
    except ImportError:
        return False
    cls = getattr(caching, "IndexDataCacheFile", None)
    if cls is None or not all(callable(getattr(cls, name, None)) for name in ("save", "load")):
        log.warning("numba %s has no IndexDataCacheFile.save/load: its kernel cache stays unlocked across processes",
                    numba.__version__)
        return False
    if getattr(cls, _MARK, False):
        return True
    cls.save = _locked(cls.save, fcntl.LOCK_EX)
    cls.load = _locked(cls.load, fcntl.LOCK_SH)
    if callable(getattr(cls, "flush", None)):
        cls.flush = _locked(cls.flush, fcntl.LOCK_EX)
    setattr(cls, _MARK, True)
    return True
