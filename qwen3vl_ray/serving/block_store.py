"""Where the connector's blocks live: the project's tiered store, in the engine's process or on the node agents.

The scheduler-side and the worker-side connector of one vLLM engine run in one process (in-process engine
core, or the engine core process with its single worker), so they share one store: the scheduler's lookup
and the worker's load see the same entries. ``shared_store`` hands out that one instance per configuration.

The store holds a host tier (pooled memory, the configured codec) and, when ``disk_bytes > 0``, a disk tier
below it, whose files survive the process: at a clean exit the host tier's blocks move down to it, and the
next engine on the machine finds them again (a killed process loses what was only in host memory). A disk
directory belongs to one process at a time (it is locked); engines that run at once on one node or across
nodes share blocks through the node agents instead (``store="ray"``: ``actors.kv_block_store``).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch

from qwen3vl_ray import settings as settings_mod
from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.cache.tiered_cache import TieredCache
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.keys import CacheKey, Namespace

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BlockStoreCounters:
    """What moved through a store, in blocks (the connector turns them into tokens)."""

    lookups: int = 0
    hit_blocks: int = 0
    loaded: dict[str, int] = field(default_factory=dict)  # tier -> blocks loaded from it
    load_failures: int = 0
    saved: int = 0
    save_rejected: int = 0


class BlockStore(ABC):
    """Where the connector's blocks live. Subclasses say how; this class counts what moved.

    Implementations: :class:`LocalBlockStore` (the tiers in this process) and ``actors.kv_block_store.
    AgentBlockStore`` (the node agents' tiers, across the Ray cluster)."""

    def __init__(self) -> None:
        self.counters = BlockStoreCounters()
        self._counters_lock = threading.Lock()

    def longest_prefix(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` the store holds."""
        n = self._held_prefix(keys)
        with self._counters_lock:
            self.counters.lookups += 1
            self.counters.hit_blocks += n
        return n

    def load_many(self, keys: Sequence[CacheKey]) -> list[torch.Tensor | None]:
        """The blocks, or None for each one that is gone or failed its integrity check (never an error)."""
        return self.load_with_tiers(keys)[0]

    def load_with_tiers(self, keys: Sequence[CacheKey]) -> tuple[list[torch.Tensor | None], list[str | None]]:
        """``load_many`` and, per block, the tier it came from (``host``, ``disk``, ``remote``; None: not loaded)."""
        tensors, tiers = self._load(keys)
        tiers = [tier if t is not None else None for t, tier in zip(tensors, tiers)]
        with self._counters_lock:
            for tier in tiers:
                if tier is None:
                    self.counters.load_failures += 1
                else:
                    self.counters.loaded[tier] = self.counters.loaded.get(tier, 0) + 1
        return tensors, tiers

    def save_many(self, items: Sequence[tuple[CacheKey, torch.Tensor, CacheKey | None]]) -> list[bool]:
        """Store ``(key, block, parent)`` items; per item whether it is stored (no room is not an error)."""
        oks = self._save(items)
        with self._counters_lock:
            self.counters.saved += sum(oks)
            self.counters.save_rejected += len(oks) - sum(oks)
        return oks

    @abstractmethod
    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]: ...

    @abstractmethod
    def _held_prefix(self, keys: Sequence[CacheKey]) -> int: ...

    @abstractmethod
    def _load(self, keys: Sequence[CacheKey]) -> tuple[list[torch.Tensor | None], list[str | None]]:
        """Per key the tensor (None: not loaded) and the tier it came from."""

    @abstractmethod
    def _save(self, items: Sequence[tuple[CacheKey, torch.Tensor, CacheKey | None]]) -> list[bool]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the store holds in this process."""


class LocalBlockStore(BlockStore):
    """vLLM blocks in a :class:`TieredCache` (host, then disk) in this process."""

    def __init__(self, cache: TieredCache) -> None:
        super().__init__()
        self.cache = cache

    @classmethod
    def from_settings(cls, s: settings_mod.Settings, namespace: Namespace) -> "LocalBlockStore":
        tiers = settings_mod.tier_configs(s)[1:]  # vLLM's paged KV is the device level: host and disk here
        return cls(TieredCache(CacheConfig(tiers=tiers, policy=s.policy, namespace=namespace)))

    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        return self.cache.contains_many(keys)

    def _held_prefix(self, keys: Sequence[CacheKey]) -> int:
        return self.cache.longest_prefix(keys)

    def _load(self, keys: Sequence[CacheKey]) -> tuple[list[torch.Tensor | None], list[str | None]]:
        tiers = [self.cache.where(k) for k in keys]
        return [self.cache.get(k) for k in keys], tiers

    def _save(self, items: Sequence[tuple[CacheKey, torch.Tensor, CacheKey | None]]) -> list[bool]:
        return self.cache.put_many(items)

    def close(self) -> None:
        """Move what the host tier holds down to the disk tier (if there is one), then close: host memory dies
        with the process, the disk tier's files are what the next engine on this machine starts from."""
        if "disk" in self.cache.tier_names:
            moved = self.cache.relieve("host", 0)
            log.info("KV connector store: %d B moved from host to disk at close", moved)
        self.cache.close()


#: where blocks can live: ``local`` (this process's tiers) or ``ray`` (the node agents; needs the actors layer)
STORE_KINDS = ("local", "ray")

_STORES: dict[tuple, BlockStore] = {}
_STORES_LOCK = threading.Lock()


def store_namespace(tenant: str) -> Namespace:
    """The namespace of a connector store's own tiers (its disk files). The keys in it carry the model, dtype,
    layout and tenant of each entry already (``block_keys``), so one store serves every model of a tenant, and
    the KV and encoder-cache connectors of one engine share it (and its disk directory)."""
    return Namespace(model="qwen3vl_ray-vllm-connector", dtype="any", layout="vllm", tenant=tenant)


def shared_store(s: settings_mod.Settings, kind: str = "local") -> BlockStore:
    """The one store of this process for (this kind, these settings); made on first use and closed at exit (a
    local disk tier's index and lock are released cleanly)."""
    if kind not in STORE_KINDS:
        raise ConfigError(f"store must be one of {', '.join(STORE_KINDS)}, got {kind!r}")
    namespace = store_namespace(s.tenant)
    key = (kind, repr(settings_mod.tier_configs(s)[1:]), s.policy, s.tenant)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            if kind == "ray":
                # the Ray layer plugs in by name: this core package never imports it
                store = importlib.import_module("actors.kv_block_store").AgentBlockStore.from_settings(s)
            else:
                store = LocalBlockStore.from_settings(s, namespace)
            _STORES[key] = store
            log.info("KV connector store (%s) of tenant %s ready", kind, s.tenant)
        return store


def open_stores() -> list[BlockStore]:
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
