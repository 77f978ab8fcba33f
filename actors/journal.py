"""A Tier wrapper that journals where entries come and go, so the coordinator's directory can follow the
moves the TieredCache makes inside a node (stores, demotions, evictions) without scanning the tiers.

Data side passes straight through; only successful stores and removes are recorded, in order, as
``(key, tier_code, added)``. The journal is bounded: on overflow it is dropped and flagged so the coordinator
does a full resync from a snapshot instead.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator, Sequence

import torch

from actors.directory import tier_code
from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.tiers.base import PreparedStore, Tier


class Journal:
    def __init__(self, max_events: int = 1_000_000) -> None:
        self.max_events = max_events
        self._events: list[tuple[bytes, int, bool]] = []
        self._overflow = False
        self._lock = threading.Lock()

    def record(self, key: bytes, code: int, added: bool) -> None:
        with self._lock:
            if len(self._events) >= self.max_events:
                self._events.clear()
                self._overflow = True  # the coordinator must resync from a snapshot
            self._events.append((key, code, added))

    def drain(self) -> tuple[list[tuple[bytes, int, bool]], bool]:
        with self._lock:
            events, overflow = self._events, self._overflow
            self._events, self._overflow = [], False
            return events, overflow


class JournalingTier(Tier):
    """Delegates to ``inner`` and records successful stores/removes in ``journal``."""

    def __init__(self, inner: Tier, journal: Journal) -> None:
        self.inner = inner
        self.name = inner.name
        self.capacity_bytes = inner.capacity_bytes
        self.journal = journal
        self._code = tier_code(inner.name)

    @property
    def used_bytes(self) -> int:
        return self.inner.used_bytes

    @property
    def free_bytes(self) -> int:
        return self.inner.free_bytes

    def __len__(self) -> int:
        return len(self.inner)

    def keys(self) -> Iterator[CacheKey]:
        return self.inner.keys()

    def entry_nbytes(self, key: CacheKey) -> int | None:
        return self.inner.entry_nbytes(key)

    def prepare_store(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        return self.inner.prepare_store(key, tensor)

    def complete_store(self, prepared: PreparedStore) -> bool:
        ok = self.inner.complete_store(prepared)
        if ok:
            self.journal.record(prepared.key, self._code, True)
        return ok

    def complete_store_many(self, prepared: Sequence[PreparedStore]) -> list[bool]:
        inner = getattr(self.inner, "complete_store_many", None)
        oks = inner(prepared) if inner else [self.inner.complete_store(p) for p in prepared]
        for p, ok in zip(prepared, oks):
            if ok:
                self.journal.record(p.key, self._code, True)
        return oks

    def put(self, key: CacheKey, tensor: torch.Tensor) -> bool:
        ok = self.inner.put(key, tensor)
        if ok:
            self.journal.record(key, self._code, True)
        return ok

    def put_many(self, items: Sequence[tuple[CacheKey, torch.Tensor]]) -> list[bool]:
        oks = self.inner.put_many(items)
        for (k, _), ok in zip(items, oks):
            if ok:
                self.journal.record(k, self._code, True)
        return oks

    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.inner.get(key, out)

    def get_many(self, keys: Sequence[CacheKey]) -> list[torch.Tensor | None]:
        return self.inner.get_many(keys)

    def contains(self, key: CacheKey) -> bool:
        return self.inner.contains(key)

    def contains_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return self.inner.contains_many(keys)

    def remove(self, key: CacheKey) -> bool:
        ok = self.inner.remove(key)
        if ok:
            self.journal.record(key, self._code, False)
        return ok

    def remove_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        keys = list(keys)
        oks = self.inner.remove_many(keys)
        for k, ok in zip(keys, oks):
            if ok:
                self.journal.record(k, self._code, False)
        return oks

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Tier-specific extras of the object-store tier (entry(), stage_many(), compact(), ...).
        return getattr(self.__dict__["inner"], name)
