"""Host-over-disk composition for a node agent, used until/unless the core TieredCache is available.

Metadata side plus moves: entries enter the host tier; when it has no room the least recently used host
entries are demoted to the disk tier (and the disk tier's least recently used entries are dropped to make room
there). It implements the part of the TieredCache API the agent uses (``put_many``, ``get(promote=)``,
``demote``, ``remove``, ``stats``, ``close``), so the agent composes either the same way.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Sequence

import torch

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.tiers.base import Tier

logger = logging.getLogger(__name__)


class NodeCache:
    def __init__(self, tiers: Sequence[Tier]) -> None:
        if not 1 <= len(tiers) <= 2:
            raise ValueError(f"NodeCache takes [host] or [host, disk] tiers, got {len(tiers)}")
        self.tiers = list(tiers)
        self._lru = [OrderedDict() for _ in self.tiers]  # per tier: key -> None, oldest first
        for lru, t in zip(self._lru, self.tiers):
            for k in t.keys():  # entries already present (a reopened disk tier)
                lru[k] = None
        self.counts = {"promotions": 0, "demotions": 0, "evictions": 0, "rejected": 0}

    def _make_room(self, level: int, nbytes: int) -> bool:
        tier, lru = self.tiers[level], self._lru[level]
        while tier.free_bytes < nbytes and lru:
            victim = next(iter(lru))
            if level + 1 < len(self.tiers):
                self._move_down(level, victim)
            else:
                tier.remove(victim)
                lru.pop(victim, None)
                self.counts["evictions"] += 1
        return tier.free_bytes >= nbytes

    def _move_down(self, level: int, key: CacheKey) -> bool:
        t = self.tiers[level].get(key)
        self.tiers[level].remove(key)
        self._lru[level].pop(key, None)
        if t is None:
            return False
        self.counts["demotions"] += 1
        return self._store(level + 1, key, t)

    def _store(self, level: int, key: CacheKey, tensor: torch.Tensor) -> bool:
        tier = self.tiers[level]
        prepared = tier.prepare_store(key, tensor)
        old = tier.entry_nbytes(key) or 0
        if not self._make_room(level, prepared.nbytes - old) or not tier.complete_store(prepared):
            self.counts["rejected"] += 1
            return False
        self._lru[level][key] = None
        self._lru[level].move_to_end(key)
        for other in range(len(self.tiers)):  # one copy per node: drop stale copies in other tiers
            if other != level and self.tiers[other].contains(key):
                self.tiers[other].remove(key)
                self._lru[other].pop(key, None)
        return True

    def put_many(self, items: Sequence[tuple[CacheKey, torch.Tensor, Any]]) -> list[bool]:
        """One batch into the top tier: room is made for all of it, then it is committed in one call (the
        object-store tier packs it into one slab)."""
        top, lru = self.tiers[0], self._lru[0]
        batch_many = getattr(top, "complete_store_many", None)
        if batch_many is None:
            return [self._store(0, k, t) for k, t, _ in items]
        prepared = [top.prepare_store(k, t) for k, t, _ in items]
        for p in prepared:  # replaced entries leave first (their room counts)
            if top.remove(p.key):
                lru.pop(p.key, None)
        self._make_room(0, min(sum(p.nbytes for p in prepared), top.capacity_bytes))
        oks = batch_many(prepared)
        for p, ok in zip(prepared, oks):
            if ok:
                lru[p.key] = None
                for level in range(1, len(self.tiers)):  # one copy per node
                    if self.tiers[level].remove(p.key):
                        self._lru[level].pop(p.key, None)
        # what did not fit in the top tier (the tail of the batch) goes straight to the next tier
        for i, (p, ok) in enumerate(zip(prepared, oks)):
            if not ok and len(self.tiers) > 1:
                oks[i] = self._store(1, p.key, items[i][1])
            if not oks[i]:
                self.counts["rejected"] += 1
        return oks

    def put(self, key: CacheKey, tensor: torch.Tensor, parent: Any = None) -> bool:
        return self._store(0, key, tensor)

    def get(self, key: CacheKey, promote: bool = True) -> torch.Tensor | None:
        for level, tier in enumerate(self.tiers):
            if tier.contains(key):
                t = tier.get(key)
                if t is None:
                    self._lru[level].pop(key, None)
                    return None
                self._lru[level].move_to_end(key)
                if promote and level > 0 and self._store(0, key, t):
                    self.counts["promotions"] += 1
                return t
        return None

    def where(self, key: CacheKey) -> str | None:
        return next((t.name for t in self.tiers if t.contains(key)), None)

    def demote(self, key: CacheKey) -> bool:
        for level in range(len(self.tiers) - 1):
            if self.tiers[level].contains(key):
                return self._move_down(level, key)
        return False

    def remove(self, key: CacheKey) -> bool:
        hit = False
        for lru, tier in zip(self._lru, self.tiers):
            if tier.remove(key):
                hit = True
            lru.pop(key, None)
        return hit

    def stats(self) -> dict:
        return {"tiers": {t.name: t.stats() for t in self.tiers}, **self.counts}

    def close(self) -> None:
        for t in self.tiers:
            t.close()
