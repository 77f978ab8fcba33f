"""Where the connector's blocks live: the project's tiered store, in the engine's process.

The scheduler-side and the worker-side connector of one vLLM engine run in one process (in-process engine
core, or the engine core process with its single worker), so they share one store: the scheduler's lookup
and the worker's load see the same entries. ``shared_store`` hands out that one instance per configuration.

The store holds a host tier (pooled memory, the configured codec) and, when ``disk_bytes > 0``, a disk tier
below it, whose files survive the process: at a clean exit the host tier's blocks move down to it, and the
next engine on the machine finds them again (a killed process loses what was only in host memory). A disk
directory belongs to one process at a time (it is locked); engines that run at once on one node share
blocks through the node's agent instead.
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from qwen3vl_ray import settings as settings_mod
from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.cache.tiered_cache import TieredCache
from qwen3vl_ray.keys import CacheKey, Namespace

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BlockStoreCounters:
    """What moved through the store, in blocks (the connector turns them into tokens)."""

    lookups: int = 0
    hit_blocks: int = 0
    loaded: dict[str, int] = field(default_factory=dict)  # tier -> blocks loaded from it
    load_failures: int = 0
    saved: int = 0
    save_rejected: int = 0


class LocalBlockStore:
    """vLLM blocks in a :class:`TieredCache` (host, then disk), keyed by ``block_keys``."""

    def __init__(self, cache: TieredCache) -> None:
        self.cache = cache
        self.counters = BlockStoreCounters()
        self._lock = threading.Lock()  # counters only; the cache has its own lock

    @classmethod
    def from_settings(cls, s: settings_mod.Settings, namespace: Namespace) -> "LocalBlockStore":
        tiers = settings_mod.tier_configs(s)[1:]  # vLLM's paged KV is the device level: host and disk here
        return cls(TieredCache(CacheConfig(tiers=tiers, policy=s.policy, namespace=namespace)))

    def longest_prefix(self, keys: Sequence[CacheKey]) -> int:
        n = self.cache.longest_prefix(keys)
        with self._lock:
            self.counters.lookups += 1
            self.counters.hit_blocks += n
        return n

    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        return self.cache.contains_many(keys)

    def load_many(self, keys: Sequence[CacheKey]) -> list[torch.Tensor | None]:
        """The blocks, or None for each one that is gone or failed its integrity check (never an error)."""
        out = []
        for key in keys:
            tier = self.cache.where(key)
            t = self.cache.get(key)
            with self._lock:
                if t is None or tier is None:
                    self.counters.load_failures += 1
                else:
                    self.counters.loaded[tier] = self.counters.loaded.get(tier, 0) + 1
            out.append(t)
        return out

    def save_many(self, items: Sequence[tuple[CacheKey, torch.Tensor, CacheKey | None]]) -> list[bool]:
        oks = self.cache.put_many(items)
        with self._lock:
            self.counters.saved += sum(oks)
            self.counters.save_rejected += len(oks) - sum(oks)
        return oks

    def stats(self) -> dict:
        return {"store": self.cache.stats(), "counters": self.counters}

    def close(self) -> None:
        """Move what the host tier holds down to the disk tier (if there is one), then close: host memory dies
        with the process, the disk tier's files are what the next engine on this machine starts from."""
        if "disk" in self.cache.tier_names:
            moved = self.cache.relieve("host", 0)
            log.info("KV connector store: %d B moved from host to disk at close", moved)
        self.cache.close()


_STORES: dict[tuple, LocalBlockStore] = {}
_STORES_LOCK = threading.Lock()


def shared_store(s: settings_mod.Settings, namespace: Namespace) -> LocalBlockStore:
    """The one store of this process for (these tier settings, this namespace); made on first use, closed at
    exit (the disk tier's index and lock are released cleanly)."""
    key = (namespace.digest, repr(settings_mod.tier_configs(s)[1:]), s.policy)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = LocalBlockStore.from_settings(s, namespace)
            log.info("KV connector store %s: %s", namespace.hex[:12], ", ".join(
                f"{t.name} {settings_mod.format_bytes(t.capacity_bytes)}" for t in store.cache.tiers))
        return store


def open_stores() -> list[LocalBlockStore]:
    """The stores this process has open (what its engines' connectors use), for metrics and tests."""
    with _STORES_LOCK:
        return list(_STORES.values())


@atexit.register
def _close_stores() -> None:
    with _STORES_LOCK:
        for store in _STORES.values():
            try:
                store.close()
            except Exception:  # noqa: BLE001 - exiting: a failed close must not hide the real exit status
                log.exception("closing a KV connector store failed")
        _STORES.clear()
