"""Pools keyed by (shape, dtype, device): one slab per kind of tensor the engine moves.

Typical pools: KV chunks (``[2, layers, kv_heads, chunk, head_dim]`` bf16 on the device), vision features
(``[tokens, hidden]``), and pinned host staging buffers (flat uint8) for async device<->host copies.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Sequence

import torch

from qwen3vl_ray.pools.block_pool import BlockPool, SlotHandle, pinning_available, resolve_device

log = logging.getLogger(__name__)

PoolKey = tuple[tuple[int, ...], torch.dtype, torch.device]


class PoolManager:
    """Creates pools on demand and routes acquisitions by (shape, dtype, device)."""

    def __init__(self, zero_on_release: bool = True) -> None:
        """``zero_on_release``: every pool zeroes a slot when it comes back (default True: slots are shared
        between tenants, and a released KV or vision block must not be readable by the next holder)."""
        self.zero_on_release = zero_on_release
        self._pools: dict[PoolKey, BlockPool] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device | None) -> PoolKey:
        return tuple(int(s) for s in shape), dtype, resolve_device(device)

    def create(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        capacity: int,
        device: str | torch.device | None = "auto",
        pin_memory: bool = False,
    ) -> BlockPool:
        """Create the pool for (shape, dtype, device); ``ValueError`` if one exists already."""
        key = self._key(shape, dtype, device)
        with self._lock:
            if key in self._pools:
                raise ValueError(f"a pool for {key} exists already ({self._pools[key]!r})")
            pool = BlockPool(key[0], dtype, capacity, key[2], self.zero_on_release, pin_memory)
            self._pools[key] = pool
        log.info("created %r (%.1f MiB)", pool, pool.slot_bytes * capacity / 2**20)
        return pool

    def staging(self, nbytes: int, capacity: int) -> BlockPool:
        """Flat uint8 host buffers of ``nbytes``, page-locked when CUDA is present (for async copies)."""
        key = self._key((nbytes,), torch.uint8, "cpu")
        with self._lock:
            pool = self._pools.get(key)
        if pool is not None:
            return pool
        return self.create((nbytes,), torch.uint8, capacity, "cpu", pin_memory=pinning_available())

    def pool(self, shape: Sequence[int], dtype: torch.dtype, device: str | torch.device | None = "auto") -> BlockPool:
        key = self._key(shape, dtype, device)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                known = ", ".join(f"{d} {s} on {dev}" for s, d, dev in self._pools) or "none"
                raise ValueError(f"no pool for {dtype} {key[0]} on {key[2]}; pools: {known}")
            return pool

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, device: str | torch.device | None = "auto") -> SlotHandle | None:
        """A slot of the matching pool, None when it is full; ``ValueError`` if no pool matches."""
        return self.pool(shape, dtype, device).acquire()

    def store(self, tensor: torch.Tensor) -> SlotHandle | None:
        """Copy ``tensor`` into a slot of the pool matching its shape/dtype/device."""
        return self.pool(tensor.shape, tensor.dtype, tensor.device).store(tensor)

    def pools(self) -> list[BlockPool]:
        with self._lock:
            return list(self._pools.values())

    def stats(self) -> dict[str, dict]:
        return {repr(p): dataclasses.asdict(p.stats()) for p in self.pools()}
