"""Fixed-size slots preallocated in one slab (data side: owns bytes, knows nothing about keys).

Why a pool: a fresh CPU tensor pays first-touch page faults on every fill (~4x slower than a copy into
memory already mapped), and a fresh CUDA tensor goes through the caching allocator and fragments it.
A pool maps its slab once (zero-filled at start, which also faults every page in) and hands out slots.

Two ways to hold a slot:

* :meth:`BlockPool.acquire` returns a :class:`SlotHandle`. ``handle.release()`` gives the slot back; a
  handle garbage-collected without release gives it back too and is counted in ``leaks`` (so a bug
  costs a counter, not the slot).
* :meth:`BlockPool.acquire_ids` / :meth:`BlockPool.release_ids` hand out bare slot indices to an owner
  that tracks them itself (the pooled tiers keep thousands of blocks per entry list; a finalizer per
  block would cost more than the copy).

Both are O(1) per slot: the free list is a stack of indices; a bytearray marks which slots are out so a
double release is caught. Never keyed by ``id(tensor)``: ids are reused after garbage collection.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> ``cuda`` when present, else ``cpu``; anything else as given (validated)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return dev


def pinning_available() -> bool:
    """Page-locked host memory only makes sense (and only works) with a CUDA runtime."""
    return torch.cuda.is_available()


def _allocate_slab(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pinned: bool) -> torch.Tensor:
    """One zero-filled slab. Touching every page now is what makes later fills run at copy speed.

    A plain CPU slab comes from numpy, which asks the kernel for transparent huge pages on large
    buffers (madvise); torch's CPU allocator does not, and 4 KiB pages made streaming copies into the
    slab ~30% slower here (TLB misses). Pinned and device slabs come from torch.
    """
    if device.type != "cpu" or pinned:
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pinned)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize * int(np.prod(shape, dtype=np.int64))
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(0)
    return torch.from_numpy(buf).view(dtype).reshape(shape)


@dataclass(frozen=True, slots=True)
class PoolStats:
    capacity: int
    in_use: int
    high_water: int
    failed_acquires: int
    leaks: int
    acquires: int
    releases: int
    slot_bytes: int


class SlotHandle:
    """One acquired slot. ``tensor`` is a view into the pool's slab, valid until ``release``."""

    __slots__ = ("_pool", "_slot", "_finalizer", "__weakref__")

    def __init__(self, pool: "BlockPool", slot: int) -> None:
        self._pool = pool
        self._slot = slot
        # The finalizer holds the pool and slot, not the handle: it runs when the handle is collected.
        self._finalizer = weakref.finalize(self, pool._reclaim_leaked, slot)

    @property
    def slot(self) -> int:
        return self._slot

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    @property
    def tensor(self) -> torch.Tensor:
        if self.released:
            raise ValueError(f"slot {self._slot} of {self._pool!r} was already released")
        return self._pool.slab[self._slot]

    def copy_from(self, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Fill the slot from ``src`` (same shape and dtype as the pool's slots, else ``ValueError``)."""
        self._pool.check_compatible(src)
        dst = self.tensor
        dst.copy_(src, non_blocking=non_blocking)
        return dst

    def release(self) -> None:
        if not self._finalizer.detach():
            raise ValueError(f"slot {self._slot} of {self._pool!r} was already released")
        self._pool.release_ids((self._slot,))

    def __enter__(self) -> "SlotHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.released:
            self.release()

    def __repr__(self) -> str:
        return f"SlotHandle(slot={self._slot}, released={self.released})"


class BlockPool:
    """``capacity`` slots of ``shape``/``dtype`` on ``device`` in one preallocated slab.

    Args:
        shape: shape of one slot.
        dtype: element dtype of every slot.
        capacity: number of slots (> 0).
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda:N"``.
        zero_on_release: zero a slot when it comes back, so no tenant ever sees another's data (default
            True: pools are shared between tenants; ``benchmarks.pools`` measures what it costs).
        pin_memory: page-lock a CPU slab; honoured only when CUDA is present (ignored otherwise).
    """

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        capacity: int,
        device: str | torch.device | None = "auto",
        zero_on_release: bool = True,
        pin_memory: bool = False,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"slot shape must be non-empty with positive sizes, got {shape}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"pool capacity must be a positive int (slots), got {capacity!r}")
        self.shape = shape
        self.dtype = dtype
        self.capacity = capacity
        self.device = resolve_device(device)
        self.zero_on_release = zero_on_release
        self.pinned = bool(pin_memory and self.device.type == "cpu" and pinning_available())
        self.slab = _allocate_slab((capacity, *shape), dtype, self.device, self.pinned)
        self.slot_bytes = self.slab[0].numel() * self.slab.element_size()
        # CPU slabs are zeroed through numpy (one memset per run of slots); torch's zero_ splits large fills
        # over its intra-op threads, which on a busy host ran slower than a single memset.
        self._slab_np = self.slab.reshape(-1).view(torch.uint8).numpy() if self.device.type == "cpu" else None
        self._lock = threading.Lock()
        # Stack of free slot indices, lowest on top so fresh acquisitions come out ascending (contiguous).
        self._free = list(range(capacity - 1, -1, -1))
        self._out = bytearray(capacity)  # 1 while a slot is acquired
        self._high_water = 0
        self._failed = 0
        self._leaks = 0
        self._acquires = 0
        self._releases = 0

    # -- handles -----------------------------------------------------------------------------
    def acquire(self) -> SlotHandle | None:
        """A slot handle, or None when every slot is in use (counted in ``failed_acquires``)."""
        ids = self.acquire_ids(1)
        return None if ids is None else SlotHandle(self, ids[0])

    def store(self, src: torch.Tensor) -> SlotHandle | None:
        """Acquire a slot and copy ``src`` into it. ``ValueError`` on wrong shape/dtype; None if full."""
        self.check_compatible(src)
        handle = self.acquire()
        if handle is not None:
            handle.tensor.copy_(src)
        return handle

    def check_compatible(self, src: torch.Tensor) -> None:
        if tuple(src.shape) != self.shape or src.dtype != self.dtype:
            raise ValueError(
                f"tensor {src.dtype} {tuple(src.shape)} does not fit pool slots of {self.dtype} {self.shape}"
            )

    # -- bare ids (owner tracks them) ----------------------------------------------------------
    def acquire_ids(self, n: int) -> list[int] | None:
        """``n`` slot indices, all or nothing; None (counted) if fewer than ``n`` are free."""
        if n <= 0:
            raise ValueError(f"number of slots to acquire must be > 0, got {n}")
        with self._lock:
            if n > len(self._free):
                self._failed += 1
                return None
            free = self._free
            ids = free[-n:]
            del free[-n:]
            ids.reverse()
            out = self._out
            for i in ids:
                out[i] = 1
            self._acquires += n
            in_use = self.capacity - len(free)
            if in_use > self._high_water:
                self._high_water = in_use
            return ids

    def release_ids(self, ids: Sequence[int]) -> None:
        with self._lock:
            out = self._out
            # Validate everything first: a bad or repeated id must not leave earlier slots half-released.
            for i in ids:
                if not (0 <= i < self.capacity) or not out[i]:
                    raise ValueError(f"slot {i} is not acquired from this pool (capacity {self.capacity})")
            if len(set(ids)) != len(ids):
                raise ValueError(f"slot ids released twice in one call: {sorted(ids)}")
            for i in ids:
                out[i] = 0
            if self.zero_on_release:
                self._zero(ids)
            # Push in reverse so the next acquire_ids pops them in the same ascending order.
            self._free.extend(reversed(ids))
            self._releases += len(ids)

    def _zero(self, ids: Sequence[int]) -> None:
        """Zero the slots ``ids``, one fill per run of consecutive slots (a tier releases whole runs)."""
        if isinstance(ids, range) and ids.step == 1:
            runs = [(ids.start, ids.stop)] if len(ids) else []
        else:
            runs, order = [], sorted(ids)
            for i in order:
                if runs and runs[-1][1] == i:
                    runs[-1][1] = i + 1
                else:
                    runs.append([i, i + 1])
        B = self.slot_bytes
        for a, b in runs:
            if self._slab_np is not None:
                self._slab_np[a * B: b * B] = 0
            else:  # on the device: queued on the current stream, so it lands before any later copy into it
                self.slab[a:b].zero_()

    def _reclaim_leaked(self, slot: int) -> None:
        self.release_ids((slot,))
        with self._lock:
            self._leaks += 1
        log.warning("pool %s: slot %d was garbage-collected without release (leak %d)", self.shape, slot, self._leaks)

    # -- accounting -------------------------------------------------------------------------------
    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                capacity=self.capacity,
                in_use=self.capacity - len(self._free),
                high_water=self._high_water,
                failed_acquires=self._failed,
                leaks=self._leaks,
                acquires=self._acquires,
                releases=self._releases,
                slot_bytes=self.slot_bytes,
            )

    def __repr__(self) -> str:
        return f"BlockPool({self.dtype} {self.shape} x{self.capacity} on {self.device}{', pinned' if self.pinned else ''})"
