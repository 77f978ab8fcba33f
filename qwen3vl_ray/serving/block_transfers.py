"""Block loads and saves off the engine's step: one background thread per store, jobs in submission order.

vLLM's engine step is the latency every running request pays, so the connector keeps the store's work out of
it where vLLM allows:

- **saves**: the step copies the new full blocks out of the paged KV into a staging buffer (one memcpy: the
  blocks may be reused by vLLM as soon as the step ends) and hands them to the transfer thread, which stores
  them (host tier copy, codec, disk write, or the Ray round trip to the node agent) while the engine computes
  the next step;
- **asynchronous loads** (``load_mode="async"``): vLLM parks the request (``WAITING_FOR_REMOTE_KVS``) while the
  transfer thread reads its blocks and writes them into the blocks vLLM reserved for it, so the other running
  requests' steps go on meanwhile; the request is scheduled once ``get_finished`` reports it;
- **synchronous loads** (``load_mode="sync"``, the default: one request's TTFT is lowest without the extra
  scheduler round trip of an asynchronous load) run on the same thread and the step waits for them.

One thread; jobs run in submission order, except loads that need no queued save: a load submitted after a save
of the same block finds it, because it runs after it. Until a save has run, its keys are *pending*: the
scheduler counts them as held (``pending``), so a request that arrives right after another one stored its
prompt still gets the hit. A load none of whose blocks is pending goes ahead of the queued saves: it needs
nothing they write, and a request's first token should not wait for the disk writes and fsyncs of the blocks
the requests before it stored (it did, and the serving benchmark's host + disk row lost its whole gain).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.serving.block_store import BlockStore
from qwen3vl_ray.serving.paged_blocks import PagedBlocks

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how loads run: in the engine step (``sync``) or while vLLM parks the request (``async``)
LOAD_MODES = ("sync", "async")
#: how saves run: the store's work in the engine step (``sync``) or on the transfer thread (``async``)
SAVE_MODES = ("sync", "async")


@dataclass(slots=True)
class BlockMove:
    """One block between vLLM's paged KV (``block_id``) and the store (``key``; ``parent`` chains it)."""

    block_id: int
    key: CacheKey
    parent: CacheKey | None = None


@dataclass(slots=True)
class LoadResult:
    """What one load did: the vLLM block ids it could not fill (recomputed by vLLM), the tokens it loaded from
    each tier, the bytes written into the paged KV, and the seconds it took."""

    failed_block_ids: list[int] = field(default_factory=list)
    tokens_per_tier: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    seconds: float = 0.0


#: a block read ahead of its load (``BlockTransfers.fetch``): its entry and the tier it came from
Fetched = dict[CacheKey, tuple[torch.Tensor, str]]


def read_blocks(store: BlockStore, keys: Sequence[CacheKey]) -> tuple[list, list]:
    """Per key its entry and tier from the store, (None, None) where it is gone. Never raises: a store that
    fails is a miss for every key."""
    try:
        return store.load_with_tiers(keys)
    except Exception:  # the store failing is a miss: vLLM recomputes these blocks, the engine goes on
        log.warning("reading %d blocks from the tiers failed; recomputing them", len(keys), exc_info=True)
        return [None] * len(keys), [None] * len(keys)


def load_blocks(store: BlockStore, paged: PagedBlocks, moves: Sequence[BlockMove], block_size: int,
                fetched: Fetched | None = None) -> LoadResult:
    """Write ``moves``' blocks into their vLLM blocks: those in ``fetched`` from there, the others read from the
    store now. Never raises: a store that fails, a block that is gone or does not fit the layout is a failed
    block id, which vLLM recomputes."""
    t0 = time.perf_counter()
    fetched = fetched or {}
    need = [m.key for m in moves if m.key not in fetched]
    read = dict(zip(need, zip(*read_blocks(store, need)))) if need else {}
    result = LoadResult()
    loaded = Counter()
    for move in moves:
        entry, tier = fetched.get(move.key) or read.get(move.key, (None, None))
        if entry is None or not paged.fits(entry):
            result.failed_block_ids.append(move.block_id)
            continue
        paged.scatter(move.block_id, entry)
        loaded[tier] += 1
    result.tokens_per_tier = {tier: n * block_size for tier, n in loaded.items()}
    result.nbytes = sum(loaded.values()) * paged.entry_nbytes
    result.seconds = time.perf_counter() - t0
    return result


def save_blocks(store: BlockStore, moves: Sequence[BlockMove], entries: Sequence[torch.Tensor]) -> int:
    """Store the gathered ``entries``; how many were stored. Never raises: saving is best effort, an unsaved
    block is a later miss, never a failed request."""
    try:
        return sum(store.save_many([(m.key, e, m.parent) for m, e in zip(moves, entries)]))
    except Exception:
        log.warning("saving %d blocks to the tiers failed", len(moves), exc_info=True)
        return 0


class StagingBuffers:
    """Reused host buffers for blocks gathered out of the paged KV and waiting for the transfer thread.

    A fresh tensor per save would pay first-touch page faults on every byte (several times the copy itself,
    measured), so buffers go back to a free list when their save is done. At most ``max_buffers`` exist; a
    step that finds none free waits for one (the transfer thread is behind: back-pressure instead of memory
    growing without bound).
    """

    def __init__(self, entry_shape: tuple[int, ...], dtype: torch.dtype, max_buffers: int = 4) -> None:
        self.entry_shape, self.dtype, self.max_buffers = entry_shape, dtype, max_buffers
        self._free: list[torch.Tensor] = []
        self._count = 0
        self._cond = threading.Condition()

    def acquire(self, rows: int) -> torch.Tensor:
        """A ``[>= rows, *entry_shape]`` buffer, owned by the caller until ``release``."""
        with self._cond:
            while True:
                for i, buf in enumerate(self._free):
                    if buf.shape[0] >= rows:
                        return self._free.pop(i)
                if self._count < self.max_buffers:
                    self._count += 1
                    break
                if self._free:  # all free ones are too small: grow one
                    self._free.pop()
                    break
                self._cond.wait()
        # a power of two of rows: a later step with a few blocks more can reuse it; not more, since one entry
        # of a real model is MiBs (Qwen3-VL-2B in vLLM's CPU block: 14 MiB)
        return torch.empty((1 << max(rows - 1, 0).bit_length(), *self.entry_shape), dtype=self.dtype)

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()


class BlockTransfers:
    """The transfer thread of one store (see the module docstring). Use :func:`transfers_for`."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        # (0: a load that needs no queued save, 1: everything else in order; submission number; the job)
        self._jobs: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._pending: Counter[CacheKey] = Counter()
        self._lock = threading.Lock()
        self._fetched: dict[str, Fetched] = {}  # request id -> its blocks read ahead of its load (``fetch``)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwen3vl-ray-block-transfers", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------ loads
    def submit_load(self, paged: PagedBlocks, moves: Sequence[BlockMove], block_size: int,
                    on_done: Callable[[LoadResult], None], fetched: Fetched | None = None) -> None:
        """Load ``moves`` on the transfer thread (those in ``fetched`` from there); ``on_done`` gets the result
        there (it always runs)."""
        load, ahead = self._load_job(paged, moves, block_size, fetched)
        self._submit(lambda: on_done(load()), ahead=ahead)

    def load_now(self, paged: PagedBlocks, moves: Sequence[BlockMove], block_size: int,
                 fetched: Fetched | None = None) -> LoadResult:
        """Load ``moves`` and wait: on the transfer thread, after the saves submitted before it that it needs."""
        return self._wait_for(*self._load_job(paged, moves, block_size, fetched))

    def _load_job(self, paged: PagedBlocks, moves: Sequence[BlockMove], block_size: int,
                  fetched: Fetched | None) -> tuple[Callable[[], LoadResult], bool]:
        """The load as a job that never raises (a caller waits for its result), and whether it may go ahead
        of the queued saves (none of the blocks it reads is pending)."""
        moves, fetched = list(moves), fetched or {}

        def load() -> LoadResult:
            try:
                return load_blocks(self.store, paged, moves, block_size, fetched)
            except Exception:  # noqa: BLE001 - every block is then a failed load, which vLLM recomputes
                log.exception("loading %d blocks into the paged KV failed; recomputing them", len(moves))
                return LoadResult(failed_block_ids=[m.block_id for m in moves])

        return load, not any(self.pending([m.key for m in moves if m.key not in fetched]))

    # ------------------------------------------------------------------ blocks read ahead
    def fetch(self, owner: str, keys: Sequence[CacheKey]) -> int:
        """Read ``keys`` now and keep the leading run that came back for ``owner``'s load (``take_fetched``);
        how many that is. A lookup that reports only those as hits has them in memory already, so the load in
        the engine step cannot fail (``TierKVConnector``: vLLM 0.32 must never see a synchronous load of an
        image's blocks fail). Replaces what ``owner`` had fetched before."""
        keys = list(keys)
        self.drop_fetched(owner)
        entries, tiers = self._wait_for(lambda: read_blocks(self.store, keys), ahead=not any(self.pending(keys)))
        n = 0
        while n < len(keys) and entries[n] is not None:
            n += 1
        if n:
            with self._lock:
                self._fetched[owner] = {k: (e, t) for k, e, t in zip(keys[:n], entries[:n], tiers[:n])}
        return n

    def take_fetched(self, owner: str) -> Fetched:
        """What ``fetch`` read for ``owner``, handed over once ({} if nothing)."""
        with self._lock:
            return self._fetched.pop(owner, {})

    def drop_fetched(self, owner: str) -> None:
        with self._lock:
            self._fetched.pop(owner, None)

    # ------------------------------------------------------------------ saves
    def submit_save(self, moves: Sequence[BlockMove], entries: Sequence[torch.Tensor],
                    on_done: Callable[[int, float], None]) -> None:
        """Store gathered ``entries`` on the transfer thread; ``on_done(saved, seconds)`` runs there after it.
        The entries must stay valid until then (``on_done`` is where their buffer is released)."""
        moves = list(moves)
        with self._lock:
            self._pending.update(m.key for m in moves)

        def job() -> None:
            t0 = time.perf_counter()
            saved = save_blocks(self.store, moves, entries)
            with self._lock:
                self._pending.subtract(m.key for m in moves)
                self._pending = +self._pending  # drop the keys whose count reached 0
            on_done(saved, time.perf_counter() - t0)

        self._submit(job)

    def pending(self, keys: Sequence[CacheKey]) -> list[bool]:
        """Per key whether a save of it is queued or running (it will be in the store before any later load)."""
        with self._lock:
            return [k in self._pending for k in keys]

    # ------------------------------------------------------------------ lifecycle
    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has run; False if ``timeout`` passed first."""
        if self._closed:
            return True  # close ran the queue out; later jobs run in their callers
        done = threading.Event()
        self._submit(done.set)
        return done.wait(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Run what is queued, then stop the thread; jobs submitted afterwards run in their callers (an engine
        shutting down after this process's exit hook still stores its last blocks, and never waits on a thread
        that is gone)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put((1, next(self._seq), None))  # under the lock: no job can be queued behind it
        self._thread.join(timeout)

    def _wait_for(self, fn: Callable[[], T], ahead: bool) -> T:
        """Run ``fn`` (which never raises) as a job and wait for what it returns."""
        done = threading.Event()
        box: list[T] = []

        def job() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self._submit(job, ahead=ahead)
        done.wait()
        return box[0]

    def _submit(self, job: Callable[[], None], ahead: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._jobs.put((0 if ahead else 1, next(self._seq), job))
                return
        job()

    def _run(self) -> None:
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - one failed job (a callback's bug) must not stop later ones
                log.exception("a block transfer failed")


_TRANSFERS: dict[int, BlockTransfers] = {}
_TRANSFERS_LOCK = threading.Lock()
_LIVE: "weakref.WeakSet[BlockTransfers]" = weakref.WeakSet()


def transfers_for(store: BlockStore) -> BlockTransfers:
    """The one transfer thread of ``store`` in this process: the scheduler-side connector asks it what is still
    being saved, the worker-side one submits to it (in one engine process they share the store)."""
    with _TRANSFERS_LOCK:
        transfers = _TRANSFERS.get(id(store))
        if transfers is None or transfers.store is not store:
            transfers = _TRANSFERS[id(store)] = BlockTransfers(store)
        return transfers


def drain_all(timeout: float | None = None) -> None:
    """Finish every queued transfer of this process (tests, and before reading a store's counters)."""
    for transfers in list(_LIVE):
        transfers.drain(timeout)


# Registered after block_store's own exit hook (this module imports it), so it runs before it: queued saves
# reach the store before the store moves its host tier to disk and closes.
@atexit.register
def _finish_transfers() -> None:
    for transfers in list(_LIVE):
        transfers.close()
