"""A journal of where a node's entries come and go, so the coordinator's directory follows the moves the
node's TieredCache makes (stores, demotions, promotions, evictions, removals, expiry) without scanning.

It follows the cache's own index (``TieredCache.add_listener``), not its tiers: a move is recorded as the
index makes it, in order, as ``(key, tier_code, added)`` events (a move between tiers is a removal from one
and an addition to the other). The journal is bounded: on overflow it is dropped and flagged so the
coordinator does a full resync from a snapshot instead.
"""

from __future__ import annotations

import threading

from actors.directory import tier_code
from qwen3vl_ray.cache.tiered_cache import TieredCache
from qwen3vl_ray.keys import CacheKey


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

    def follow(self, cache: TieredCache) -> None:
        """Record every later move of ``cache``'s index (what it holds now is in the agent's snapshot)."""
        codes = [tier_code(name) for name in cache.tier_names]

        def heard(key: CacheKey, src: int | None, dst: int | None, nbytes: int | None) -> None:
            if src is not None:
                self.record(key, codes[src], False)
            if dst is not None:
                self.record(key, codes[dst], True)

        cache.add_listener(heard)

    def drain(self) -> tuple[list[tuple[bytes, int, bool]], bool]:
        with self._lock:
            events, overflow = self._events, self._overflow
            self._events, self._overflow = [], False
            return events, overflow
