"""The device KV budget: refuse what can never fit, swap idle sessions down to make room for the rest.

Metadata side only. The budget covers the store's device tier plus the live KV of the running request
(prompt + new tokens). Before a request runs, ``make_room`` demotes this engine's device-resident entries
down the tiers, idle sessions' first, then least recently used; nothing is dropped, so a swapped session
comes back from host or disk on its next turn without recompute.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from qwen3vl_ray.errors import CapacityError
from qwen3vl_ray.keys import CacheKey

logger = logging.getLogger(__name__)


class KeyRegistry:
    """Keys this engine stored, least recently used first, with their owner (a session id or None).

    The store does not list keys per tier; this is what pressure relief walks. Entries the store has
    dropped are pruned lazily when met.
    """

    def __init__(self) -> None:
        self._keys: OrderedDict[CacheKey, str | None] = OrderedDict()

    def add(self, key: CacheKey, owner: str | None) -> None:
        if key in self._keys and self._keys[key] is not None and owner is None:
            owner = self._keys[key]  # a session's chunk stays the session's when a prompt reuses it
        self._keys[key] = owner
        self._keys.move_to_end(key)

    def touch(self, key: CacheKey) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)

    def discard(self, key: CacheKey) -> None:
        self._keys.pop(key, None)

    def owned_by(self, owner: str) -> list[CacheKey]:
        return [k for k, o in self._keys.items() if o == owner]

    def items(self) -> list[tuple[CacheKey, str | None]]:
        return list(self._keys.items())

    def __len__(self) -> int:
        return len(self._keys)


def device_tier(store: Any) -> Any | None:
    """The store's device tier object, or None when it has none."""
    for tier in getattr(store, "tiers", []):
        if getattr(tier, "name", None) == "device":
            return tier
    return None


class DeviceBudget:
    """Keeps (device tier bytes + running request's KV bytes) within ``budget_bytes``."""

    def __init__(self, store: Any, registry: KeyRegistry, budget_bytes: int, idle_order: Callable[[], Iterable[str]]):
        self.store = store
        self.registry = registry
        self.budget_bytes = budget_bytes
        self._idle_order = idle_order  # session ids, most idle first
        self.demoted = 0

    def used_bytes(self) -> int:
        tier = device_tier(self.store)
        return int(tier.used_bytes) if tier is not None else 0

    def check(self, need_bytes: int, what: str) -> None:
        """Raise CapacityError if ``need_bytes`` of live KV can never fit the budget."""
        if need_bytes > self.budget_bytes:
            raise CapacityError(
                f"{what} needs {need_bytes} bytes of KV on the device but kv_device_budget_bytes is "
                f"{self.budget_bytes}, even with every cached entry offloaded; shorten the prompt, lower "
                f"max_new_tokens or raise the budget"
            )

    def make_room(self, need_bytes: int, protect: Iterable[CacheKey] = ()) -> bool:
        """Demote device-resident entries until ``need_bytes`` fits next to the device tier. True if it fits."""
        if self.used_bytes() + need_bytes <= self.budget_bytes:
            return True
        protected = set(protect)
        t0 = time.perf_counter()
        before = self.demoted
        for key in self._candidates():
            if key in protected:
                continue
            where = self.store.where(key)
            if where is None:
                self.registry.discard(key)
                continue
            if where == "device" and self.store.demote(key):
                self.demoted += 1
                if self.used_bytes() + need_bytes <= self.budget_bytes:
                    break
        fits = self.used_bytes() + need_bytes <= self.budget_bytes
        logger.info("device pressure: demoted %d entries in %.1f ms (fits=%s)", self.demoted - before,
                    1e3 * (time.perf_counter() - t0), fits)
        return fits

    def _candidates(self) -> Iterable[CacheKey]:
        # Idle sessions first (most idle first), then everything else least recently used first.
        seen: set[CacheKey] = set()
        for sid in self._idle_order():
            for key in self.registry.owned_by(sid):
                seen.add(key)
                yield key
        for key, _ in self.registry.items():
            if key not in seen:
                yield key
