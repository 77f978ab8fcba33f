"""Swap space: tensors that may leave accelerator memory while idle and come back bit-exact.

``register(tensor, priority)`` hands a tensor to the swap space and returns a :class:`SwapHandle`. While
resident the handle holds the tensor itself (no copy). Under pressure the lowest-priority, least recently
used handles are written to the cache's top tier and pinned there (a swapped-out tensor exists nowhere
else, so neither eviction nor idle expiry may drop it), and their device memory is released; ``handle.get()`` brings the tensor back on its original device, dtype and shape.

Swap must be bit-exact, so every tier of the backing cache must use a lossless codec. Handles are tracked
by a counter id, never ``id(tensor)``; a handle dropped without ``release()`` is reclaimed by a finalizer
and counted as a leak.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from qwen3vl_ray.codecs import make_codec
from qwen3vl_ray.errors import CapacityError, ConfigError
from qwen3vl_ray.keys import CacheKey, content_key

log = logging.getLogger(__name__)


@dataclass
class SwapConfig:
    """Budget of tensors kept resident by the swap space.

    Attributes:
        resident_budget_bytes: bytes of registered tensors allowed to stay resident (on their device).
        high_watermark: resident fraction above which ``relieve`` swaps out (0.9).
        low_watermark: resident fraction that ``relieve`` drains down to (0.75).
    """

    resident_budget_bytes: int
    high_watermark: float = 0.9
    low_watermark: float = 0.75

    def __post_init__(self) -> None:
        if not isinstance(self.resident_budget_bytes, int) or self.resident_budget_bytes <= 0:
            raise ConfigError(f"resident_budget_bytes must be a positive int, got {self.resident_budget_bytes!r}")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError(f"watermarks must satisfy 0 < low <= high <= 1, got {self.low_watermark}, {self.high_watermark}")


@dataclass(slots=True)
class _Record:
    key: CacheKey
    priority: int
    nbytes: int
    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]
    last_use: float
    tensor: torch.Tensor | None  # set while resident


class SwapHandle:
    """A registered tensor. ``get()`` returns it (swapping in if needed); ``release()`` forgets it."""

    __slots__ = ("_space", "_id", "_finalizer", "__weakref__")

    def __init__(self, space: "SwapSpace", hid: int) -> None:
        self._space = space
        self._id = hid
        # A handle dropped without release() must give its memory back: reclaim and count it as a leak.
        self._finalizer = weakref.finalize(self, space._reclaim_leak, hid)

    @property
    def resident(self) -> bool:
        return self._space._record(self._id).tensor is not None

    @property
    def where(self) -> str | None:
        """"resident", a cache tier name, or None once lost."""
        rec = self._space._record(self._id)
        return "resident" if rec.tensor is not None else self._space.cache.where(rec.key)

    def get(self) -> torch.Tensor:
        return self._space._swap_in(self._id)

    def swap_out(self) -> bool:
        return self._space._swap_out(self._id)

    def release(self) -> None:
        self._finalizer.detach()
        self._space._forget(self._id)


class SwapSpace:
    """Registers tensors and moves the idle, unimportant ones down the cache's tiers under pressure."""

    def __init__(self, cache, config: SwapConfig) -> None:
        for tc in cache.config.tiers:
            if tc.kind == "device":
                raise ConfigError("a swap space's cache holds what left the device: use host/disk tiers only, not 'device'")
            if not make_codec(tc.codec).lossless:
                raise ConfigError(f"swap needs lossless tiers; the {tc.kind} tier uses codec {tc.codec!r}")
        self.cache = cache
        self.config = config
        self._records: dict[int, _Record] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._salt = os.urandom(16)  # swap keys are private to this space, never guessable from content
        self.resident_bytes = 0
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0
        self.leaks = 0
        self.lost = 0

    # ------------------------------------------------------------------ public
    def register(self, tensor: torch.Tensor, priority: int = 0) -> SwapHandle:
        """Take ``tensor`` under management. Higher ``priority`` stays resident longer."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"register expects a torch.Tensor, got {type(tensor).__name__}")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.config.resident_budget_bytes:
            raise CapacityError(f"tensor of {nbytes} bytes exceeds the swap resident budget of {self.config.resident_budget_bytes} bytes")
        with self._lock:
            hid = next(self._ids)
            key = content_key(self.cache.config.namespace, "swap", self._salt + hid.to_bytes(8, "little"))
            self._records[hid] = _Record(key, int(priority), nbytes, tensor.device, tensor.dtype, tuple(tensor.shape), time.monotonic(), tensor)
            self.resident_bytes += nbytes
            self._fit(nbytes=0, keep=hid)
            return SwapHandle(self, hid)

    def relieve(self, target_bytes: int | None = None) -> int:
        """Swap out lowest-priority, least recently used handles until resident <= target. Bytes freed."""
        target = int(self.config.low_watermark * self.config.resident_budget_bytes) if target_bytes is None else target_bytes
        with self._lock:
            before = self.resident_bytes
            for hid in self._order():
                if self.resident_bytes <= target:
                    break
                self._swap_out(hid)
            return before - self.resident_bytes

    def swap_out_idle(self, idle_s: float, now: float | None = None) -> int:
        """Swap out resident handles unused for ``idle_s`` seconds. Returns how many went."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [hid for hid, r in self._records.items() if r.tensor is not None and now - r.last_use > idle_s]
            return sum(1 for hid in idle if self._swap_out(hid))

    def on_pressure(self, report=None) -> None:
        """Pressure-monitor subscriber: drain to the low watermark."""
        self.relieve()

    def stats(self) -> dict:
        with self._lock:
            return {
                "handles": len(self._records),
                "resident": sum(1 for r in self._records.values() if r.tensor is not None),
                "resident_bytes": self.resident_bytes,
                "resident_budget_bytes": self.config.resident_budget_bytes,
                "swapped_out_bytes": self.swapped_out_bytes,
                "swapped_in_bytes": self.swapped_in_bytes,
                "leaks": self.leaks,
                "lost": self.lost,
            }

    # ------------------------------------------------------------------ internals
    def _record(self, hid: int) -> _Record:
        rec = self._records.get(hid)
        if rec is None:
            raise KeyError(f"swap handle {hid} was released")
        return rec

    def _order(self) -> list[int]:
        resident = [(r.priority, r.last_use, hid) for hid, r in self._records.items() if r.tensor is not None]
        return [hid for _, _, hid in sorted(resident)]

    def _fit(self, nbytes: int, keep: int) -> None:
        """Make room for ``nbytes`` more resident bytes, never swapping out ``keep``."""
        high = self.config.high_watermark * self.config.resident_budget_bytes
        if self.resident_bytes + nbytes <= high:
            return
        target = int(self.config.low_watermark * self.config.resident_budget_bytes) - nbytes
        for hid in self._order():
            if self.resident_bytes <= target:
                break
            if hid != keep:
                self._swap_out(hid)

    def _swap_out(self, hid: int) -> bool:
        with self._lock:
            rec = self._record(hid)
            if rec.tensor is None:
                return True
            if not self.cache.put(rec.key, rec.tensor):
                log.warning("swap-out of %d bytes found no room in any tier; it stays resident", rec.nbytes)
                return False
            # A swapped-out tensor exists nowhere else: pinned, so neither eviction nor idle expiry can
            # drop it (it stays where it landed until swap-in or release).
            self.cache.pin(rec.key)
            rec.tensor = None
            self.resident_bytes -= rec.nbytes
            self.swapped_out_bytes += rec.nbytes
            return True

    def _swap_in(self, hid: int) -> torch.Tensor:
        with self._lock:
            rec = self._record(hid)
            rec.last_use = time.monotonic()
            if rec.tensor is not None:
                return rec.tensor
            self._fit(rec.nbytes, keep=hid)
            t = self.cache.get(rec.key, promote=False)
            if t is None:
                self.lost += 1
                raise LookupError("swapped-out tensor is gone from every tier (lost with a node or evicted)")
            t = t.to(device=rec.device, dtype=rec.dtype).reshape(rec.shape)
            self.cache.unpin(rec.key)
            self.cache.remove(rec.key)
            rec.tensor = t
            self.resident_bytes += rec.nbytes
            self.swapped_in_bytes += rec.nbytes
            return t

    def _forget(self, hid: int) -> None:
        with self._lock:
            rec = self._records.pop(hid, None)
            if rec is None:
                return
            if rec.tensor is not None:
                self.resident_bytes -= rec.nbytes
            else:
                self.cache.unpin(rec.key)
                self.cache.remove(rec.key)

    def _reclaim_leak(self, hid: int) -> None:
        if hid in self._records:
            self.leaks += 1
            log.debug("swap handle %d dropped without release(); reclaimed", hid)
            self._forget(hid)
