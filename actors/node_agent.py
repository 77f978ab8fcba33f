"""Node agent: the one process per node that owns the node's host tier (Ray object store) and disk tier.

``NodeAgentLogic`` holds everything and runs without Ray (inject a :class:`LocalObjectStore`); the
``NodeAgent`` actor is a thin wrapper. Data side: the agent stores and serves chunks; metadata it reports for
the coordinator's policies: per-entry access stats and chain parents (value; the node cache's own records of
its entries, ``TieredCache.entry_info``), pressure, and a journal of where entries come and go
(``drain_journal``, following the cache's index) so the cluster directory follows the moves without scanning. What the
coordinator may demote or evict is offered in the node cache's own policy order (``_victim_order``), the order
its local room-making takes, so cluster-level moves never drop a chain's head before its tail; and it is done
through the cache's own demote path, so the policy hears the same events (``on_demote``, ``on_evict``) and the
store counts the same moves as for local room-making. A lookup that misses is reported to the cache too (its
policies learn from misses). With ``AgentConfig.idle_ttl_s`` set, entries of either tier idle past it are dropped
on the agent's periodic work, the pressure read of each coordinator pass (``expire_idle``), and leave the
coordinator's directory through the journal like any other removal.

Reads hand out handles, not bytes: ``get_chunks`` returns the ObjectRef of each host entry (promoting disk
hits into the host tier first), so a worker on this node reads it zero-copy and a worker on another node
pulls it through Ray's object transfer (cross-node hit). Restart semantics: host entries die with the agent
(misses afterwards); the disk tier reopens its directory and serves its entries again.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from actors.config import NAMESPACE, AgentConfig
from actors.directory import TIER_CODES
from actors.journal import Journal
from actors.metrics import Metrics
from actors.object_store_tier import RAW, LocalObjectStore, ObjectStore, ObjectStoreTier, array_to_tensor, slice_of
from actors.pressure_report import EvictionCandidate, NodeReport, TierReport
from actors.tenancy import Tenant, tenant_checked
from actors.wire import WireChunk, to_wire
from qwen3vl_ray.cache.lifetimes import LifetimeConfig, LifetimeManager
from qwen3vl_ray.codecs.base import decode
from qwen3vl_ray.keys import CacheKey, Namespace, validate_key

logger = logging.getLogger(__name__)

AGENT_PREFIX = "qwen3vl_ray_agent_"
_NODE_ID_RE = re.compile(r"^[0-9a-f]{16,128}$")
#: Namespace of the default tenant agent's own tiers (keys are already namespaced by their producers).
AGENT_NAMESPACE = Namespace(model="qwen3vl_ray-node-agent", dtype="any", layout="chunks")


def agent_namespace(tenant: Tenant) -> Namespace:
    """The namespace of a tenant's agent tiers: its disk files live apart from every other tenant's."""
    return AGENT_NAMESPACE if tenant.is_default else Namespace(model=AGENT_NAMESPACE.model, dtype="any",
                                                                layout="chunks", tenant=tenant.id)
REUSE_HALF_LIFE_S = 300.0


def agent_name(node_id: str, tenant: Tenant = Tenant()) -> str:
    """The named actor of ``tenant``'s agent on ``node_id`` (one per tenant and node)."""
    return AGENT_PREFIX + check_node_id(node_id) + tenant.suffix


def check_node_id(node_id: str) -> str:
    """Node ids become actor names and directory names: only hex is accepted."""
    if not isinstance(node_id, str) or not _NODE_ID_RE.match(node_id):
        raise ValueError(f"node id must be 16-128 lowercase hex characters, got {node_id!r}")
    return node_id


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where a chunk can be read: a store handle (ObjectRef under Ray) plus how to decode it. What ``get_chunks``
    hands back across the actor boundary (the read side's counterpart of ``actors.wire.WireChunk``)."""

    handle: Any  # the slab holding the chunk
    index: int  # position in the slab
    nbytes: int
    codec: str  # RAW or a codec spec
    dtype: str
    shape: tuple[int, ...]
    tier: str  # tier it was found in on the agent ("host" or "disk")


def materialize(refs: Sequence[ChunkRef | None], store: ObjectStore) -> list[torch.Tensor | None]:
    """Read many chunks with one batched store read of their slabs (zero-copy views; each slab once) and
    copy each chunk out into a tensor."""
    handles: dict[Any, Any] = {}
    for r in refs:
        if r is not None:
            handles.setdefault(_handle_id(r.handle), r.handle)
    arrays = dict(zip(handles, store.get_many(list(handles.values()))))
    out: list[torch.Tensor | None] = []
    for r in refs:
        if r is None:
            out.append(None)
            continue
        arr = slice_of(arrays[_handle_id(r.handle)], r.index, r.nbytes)
        out.append(array_to_tensor(arr, r.dtype, r.shape) if r.codec == RAW else decode(arr))
    return out


def _handle_id(handle: Any) -> Any:
    # ObjectRefs hash by object id; LocalObjectStore handles are arrays (identity)
    return handle if hasattr(handle, "binary") else id(handle)


def tenant_disk_dir(config: AgentConfig, tenant: Tenant) -> str:
    """Where a tenant's agents keep their disk tiers: ``disk_dir`` for the default tenant, else
    ``<disk_dir>/tenant-<tenant id>`` (created 0700), so each tenant's homes, budget and trimming stay its own."""
    if tenant.is_default:
        return config.disk_dir
    path = os.path.join(config.disk_dir, f"tenant-{tenant.id}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def node_disk_home(config: AgentConfig, node_id: str, tenant: Tenant = Tenant()):
    """The node's disk-tier home: ``<tenant disk dir>/machine-<machine tag>-<slot>``, the lowest slot of this
    machine no live agent holds (``qwen3vl_ray.tiers.disk_home``). Stable across Ray sessions, unlike the node id,
    so a restarted node or a later embedded run serves what an earlier one stored; agents of a one-machine test
    cluster still never share one. Held (flock) until the disk tier closes or the process exits."""
    from qwen3vl_ray.tiers.disk_home import DiskHome

    return DiskHome.claim(tenant_disk_dir(config, tenant), owner=check_node_id(node_id))


def build_node_cache(node_id: str, config: AgentConfig, host: ObjectStoreTier, tenant: Tenant = Tenant()):
    """Compose the node's tiers with the core TieredCache: the object-store host tier (injected) over the core
    DiskTier in the node's disk home (its index is rebuilt from its files on open, so a restarted agent serves
    them again; other unheld homes are then trimmed to the disk budget)."""
    from qwen3vl_ray.cache import CacheConfig, TieredCache
    from qwen3vl_ray.tiers.config import TierConfig
    from qwen3vl_ray.tiers.disk import DiskTier

    cfgs = [TierConfig("host", config.host_bytes, codec=config.host_codec, high_watermark=config.high_watermark,
                       low_watermark=config.low_watermark)]
    tiers = [host]
    disk = None
    if config.disk_bytes:
        namespace = agent_namespace(tenant)
        home = node_disk_home(config, node_id, tenant)
        try:
            dcfg = TierConfig("disk", config.disk_bytes, codec=config.disk_codec, path=str(home.path),
                              fsync=config.disk_fsync, high_watermark=config.high_watermark,
                              low_watermark=config.low_watermark)
            tier = DiskTier(dcfg, namespace, lease=home)  # the tier's close() releases the home
        except BaseException:
            home.release()
            raise
        try:
            home.trim(config.disk_bytes, tier.used_bytes, namespace.hex)
        except OSError:  # trimming is housekeeping: the tier serves without it
            logger.warning("disk home %s: trimming other directories failed", home.path, exc_info=True)
        disk = tier
        cfgs.append(dcfg)
        tiers.append(disk)
    # prefetch_threads=0: the agent runs one call at a time; promotions happen inside get_chunks
    cache = TieredCache(CacheConfig(tiers=cfgs, policy=config.policy, namespace=agent_namespace(tenant),
                                    prefetch_threads=0), tiers=tiers)
    return cache, disk


class NodeAgentLogic:
    """All of a node agent's behaviour. Not thread-safe: the actor runs one call at a time.

    ``clock``: monotonic seconds of idle expiry (``expire_idle``); the node cache's own idle clock is
    ``time.monotonic`` too."""

    def __init__(self, node_id: str, config: AgentConfig, store: ObjectStore | None = None,
                 metrics: Metrics | None = None, cache_factory=build_node_cache, tenant: Tenant = Tenant(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id = check_node_id(node_id)
        self.config = config
        self.tenant = tenant
        self.epoch = uuid.uuid4().hex  # changes on every (re)start: the coordinator resyncs on a new epoch
        self.store = store if store is not None else LocalObjectStore()
        self.metrics = metrics if metrics is not None else Metrics(node_id)
        self.host = ObjectStoreTier(config.host_bytes, config.host_codec, self.store)
        self.cache, self.disk = (cache_factory(node_id, config, self.host) if tenant.is_default
                                 else cache_factory(node_id, config, self.host, tenant))
        # the directory follows the cache's own index: every store, demotion, promotion, eviction and removal
        self.journal = Journal()
        self.journal.follow(self.cache)
        # swaps between the node's tiers, whoever made them (a put making room, the coordinator's demotions, a
        # disk hit's promotion), counted as the cache's index makes them
        self.cache.add_listener(self._count_swap)
        from qwen3vl_ray.cache.pressure import PressureConfig, PressureMonitor

        self.monitor = PressureMonitor(self.cache, PressureConfig(min_interval_s=0))
        self.lifetimes = LifetimeManager(self.cache, LifetimeConfig(idle_ttl_s=config.idle_ttl_s or None), clock)
        # each entry's hits, last access and chain parent (its value, and no parent before its children in the
        # coordinator's demotions and evictions: ``_victim_order``) are the node cache's own record of it
        # chunks served by handle through get_chunks, per tier (the tiers' own counters do not see them)
        self._served = {"hits": {"host": 0, "disk": 0}, "misses": 0}
        # rare events are exported at 0 from the start: their panels read 0, not "no data"
        for name in ("qwen3vl_ray_promotions", "qwen3vl_ray_demotions", "qwen3vl_ray_swap_bytes_out"):
            self.metrics.declare(name, tier="host")
        self.metrics.declare("qwen3vl_ray_evictions")
        logger.info("node agent %s up (epoch %s): host %d B, disk %d B with %d entries", node_id[:12], self.epoch[:8],
                    config.host_bytes, config.disk_bytes, 0 if self.disk is None else len(self.disk))

    # -- writes --------------------------------------------------------------------------------
    def put_chunks(self, items: Sequence[WireChunk]) -> list[str | None]:
        """Store many chunks through the cache's batched put: the newest entries of the batch that fit the host
        tier go into the object store as one slab (host victims are demoted to disk first, in the policy's
        order, to make that room); the older ones of a batch larger than the host tier go straight to the disk
        tier (without one, the batch's head stays: a chain's later chunks are useless without it). Returns the
        tier each chunk is in afterwards, or None if it was not stored."""
        batch = []
        for c in items:
            if not isinstance(c, WireChunk):
                raise TypeError(f"put_chunks takes WireChunk items, got {type(c).__name__}")
            batch.append((validate_key(c.key), c.tensor(), None if c.parent is None else validate_key(c.parent)))
        # the slabs the room-making thins out are re-packed once at the end, so their memory returns
        with self.host.deferred_compaction():
            oks = self.cache.put_many(batch)
        where = [self._where(k) if ok else None for (k, _, _), ok in zip(batch, oks)]
        for (_, t, _), w in zip(batch, where):
            if w is not None:
                self.metrics.inc("qwen3vl_ray_swap_bytes_in", t.numel() * t.element_size(), tier=w)
        return where

    def remove_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        with self.host.deferred_compaction():  # each thinned slab re-packed once, not at every halving
            return self.cache.remove_many(keys)

    def _count_swap(self, key: CacheKey, src: int | None, dst: int | None, nbytes: int | None) -> None:
        """The cache's listener: a move from host to disk is a demotion, one back a promotion. A move that carries
        no bytes (a failed replace's undo: the key is back where its old value stayed) is neither."""
        if src is None or dst is None or nbytes is None:
            return
        moved = (self.cache.tier_names[src], self.cache.tier_names[dst])
        if moved == ("host", "disk"):
            self.metrics.inc("qwen3vl_ray_demotions", tier="host")
            if nbytes:
                self.metrics.inc("qwen3vl_ray_swap_bytes_out", nbytes, tier="host")
        elif moved == ("disk", "host"):
            self.metrics.inc("qwen3vl_ray_promotions", tier="host")

    # -- reads ---------------------------------------------------------------------------------
    def _where(self, key: CacheKey) -> str | None:
        if self.host.contains(key):
            return "host"
        if self.disk is not None and self.disk.contains(key):
            return "disk"
        return None

    def contains_many(self, keys: Sequence[CacheKey]) -> list[str | None]:
        return [self._where(k) for k in keys]

    def get_chunks(self, keys: Sequence[CacheKey]) -> list[ChunkRef | None]:
        """Handles for many chunks in one call. Disk hits are promoted into the host tier first (or, if the
        host tier has no room, put as a transient object that lives while the caller holds its handle)."""
        out: list[ChunkRef | None] = []
        for key in keys:
            tier = self._where(key)
            if tier is None:
                self._served["misses"] += 1
                self.cache.lookup(key)  # absent: the store counts the miss and its policies hear it (ghosts)
                out.append(None)
                continue
            if tier == "disk":
                t = self.cache.get(key, promote=True)
                if t is None:  # corrupt or raced away: a miss, never an error
                    self._served["misses"] += 1
                    out.append(None)
                    continue
                e = self.host.entry(key)
                if e is None:
                    # the host tier could not take it: a transient object the caller's handle keeps alive
                    arr, dtype = to_wire(t)
                    try:
                        handle = self.store.put(arr)
                    except Exception:  # noqa: BLE001 - the object store is full: this chunk is a miss, not the batch
                        logger.warning("chunk %s: the object store refused its transient copy; served as a miss",
                                       key.hex()[:12], exc_info=True)
                        self._served["misses"] += 1
                        out.append(None)
                        continue
                    out.append(ChunkRef(handle, 0, arr.nbytes, RAW, dtype, tuple(t.shape), "disk"))
                else:
                    out.append(ChunkRef(e.handle, e.index, e.nbytes, e.codec, e.dtype, e.shape, "disk"))
            else:
                e = self.host.entry(key)
                if e is None:
                    self._served["misses"] += 1
                    out.append(None)
                    continue
                out.append(ChunkRef(e.handle, e.index, e.nbytes, e.codec, e.dtype, e.shape, "host"))
            # qwen3vl_ray_hits/misses are counted in tokens by the worker, which knows what the request reused
            self._served["hits"][tier] = self._served["hits"].get(tier, 0) + 1
            if tier == "host":
                self._touch(key)  # the disk hit's read through the cache counted it already
        return out

    def _touch(self, key: CacheKey) -> None:
        """A host hit served by handle bypasses the cache's read path; tell its policy about the access."""
        self.cache.touch(key)

    def get_tensors(self, keys: Sequence[CacheKey]) -> list[torch.Tensor | None]:
        """Tensors for many chunks, for in-process callers (tests, the benchmark)."""
        return materialize(self.get_chunks(keys), self.store)

    # -- policy hooks (called by the coordinator) ----------------------------------------------
    def pressure(self) -> NodeReport:
        """Fill levels against the watermarks, from the core pressure monitor: a tier whose physical memory or
        disk is short (``system``) counts as over its high watermark even within its own budget.

        Each coordinator pass reads this (every ``period_s``): it is the agent's clock for its periodic work, so
        idle entries are expired first (``expire_idle``) and the report counts what is left."""
        self.expire_idle()
        report = self.monitor.sample()
        tiers = {}
        for tp in report.tiers:
            tier = tiers[tp.name] = TierReport(
                used=tp.used_bytes, capacity=tp.capacity_bytes, entries=len(self.host if tp.name == "host" else self.disk),
                high=tp.high_watermark, low=tp.low_watermark, system=tp.system_pressure)
            self.metrics.set("qwen3vl_ray_bytes_used", tier.used, tier=tp.name)
            self.metrics.set("qwen3vl_ray_bytes_budget", tier.capacity, tier=tp.name)
            self.metrics.set("qwen3vl_ray_entries", tier.entries, tier=tp.name)
        self.metrics.set("qwen3vl_ray_compression_ratio", self.host.stats()["compression_ratio"], tier="host")
        return NodeReport(self.node_id, self.epoch, tiers, (report.host_used_bytes, report.host_total_bytes),
                          dict(report.disk_free_bytes))

    def expire_idle(self, now: float | None = None) -> int:
        """Drop the host and disk entries neither read nor written for ``AgentConfig.idle_ttl_s`` (0: never), when
        a scan is due (``LifetimeManager``: at most every eighth of the TTL). Through the cache's own path: its
        policies hear ``on_delete``, pinned or in-flight entries stay, and each removal is journaled, so the
        coordinator's directory forgets the entry at its next journal sync (later in the same pass when called
        from ``pressure``). A chain's head may expire before a tail read since (a worker held the head); the
        tail then expires in turn unless read with a head again. Returns how many entries went."""
        with self.host.deferred_compaction():  # a slab whose entries all expire is dropped once, not re-packed
            return self.lifetimes.tick(now)

    def _victim_order(self, tier: str, n: int | None = None, nbytes: int | None = None,
                      whole_node: bool = False) -> list[tuple[CacheKey, int]]:
        """``tier``'s entries as ``(key, stored bytes)`` in the order its cache policy gives them up (the order the
        cache's own room-making takes: leaf-first for the default policy), never a chain's parent before its
        children: an entry with a child in ``tier`` (``whole_node``: anywhere on this node, for evictions) waits
        until its last child is listed and then follows it at once, so a chain shrinks from its tail. Removing any
        prefix of the list therefore never leaves a stored chunk without its parent. Stops after ``n`` entries
        or ``nbytes`` bytes."""
        t = self.host if tier == "host" else self.disk
        if t is None:
            return []
        policy = self.cache.policies[self.cache.tier_names.index(tier)]
        scope = [k for tier in ([self.host, self.disk] if whole_node else [t]) if tier is not None for k in tier.keys()]
        children = Counter(p for p in self.cache.parents(scope) if p is not None)
        order: list[tuple[CacheKey, int]] = []
        taken: set = set()
        total = 0

        def free(k: CacheKey) -> bool:
            return k not in taken and not children.get(k) and t.contains(k)

        walk = policy.victims(free)
        try:
            for k in walk:
                while k is not None and free(k):  # k, then its parent if k was the parent's last child
                    size = t.entry_nbytes(k) or 0
                    order.append((k, size))
                    taken.add(k)
                    total += size
                    if (n is not None and len(order) >= n) or (nbytes is not None and total >= nbytes):
                        return order
                    k = self.cache.parents([k])[0]
                    if k is not None:
                        children[k] -= 1
        finally:
            walk.close()  # the policy restores its structures before anything is moved
        return order

    def cold_keys(self, tier: str, n: int) -> list[CacheKey]:
        """The ``n`` entries of ``tier`` its policy would give up first (``_victim_order``)."""
        return [k for k, _ in self._victim_order(tier, n)]

    def demote_cold(self, n_bytes: int) -> dict:
        """Move host entries down to disk, in the host policy's order (a chain's tail before its head), until
        ``n_bytes`` of host memory are free again (the tier compacts slabs left mostly empty, so the bytes
        really return)."""
        if self.disk is None:
            return {"bytes": 0, "entries": 0}
        return self._demote_host(n_bytes)

    def _demote_host(self, n_bytes: int) -> dict:
        start = self.host.used_bytes
        count = 0
        # the survivors of each slab we thin out are re-packed once at the end, so the memory returns
        with self.host.deferred_compaction():
            for key, _ in self._victim_order("host", nbytes=n_bytes):
                if self.cache.demote(key):  # counted by _count_swap
                    count += 1
        return {"bytes": start - self.host.used_bytes, "entries": count}

    def recompress(self, keys: Sequence[CacheKey], codec: str, need_bytes: int | None = None) -> dict:
        """Re-encode the raw host entries in the slabs of ``keys`` with ``codec`` (coldest first, slab by
        slab) until ``need_bytes`` are saved (all if None). Returns bytes saved and entries re-encoded."""
        saved = count = 0
        done: set = set()
        for key in keys:
            if need_bytes is not None and saved >= need_bytes:
                break
            e = self.host.entry(key)
            if e is None or e.slab in done or e.codec != RAW:
                continue
            done.add(e.slab)
            res = self.host.recompress_slabs([key], codec)
            saved += res["bytes"]
            count += res["entries"]
        if saved:
            self.metrics.set("qwen3vl_ray_compression_ratio", self.host.stats()["compression_ratio"], tier="host")
        return {"bytes": saved, "entries": count}

    def value(self, key: CacheKey, recompute_s_per_mib: float, now: float | None = None) -> float:
        """Recompute seconds saved per stored byte x likelihood of reuse (hits and recency)."""
        info = self.cache.entry_info(key)
        hits, last = (0, 0.0) if info is None else (info.hits, info.last_access)
        entry = self.host.entry(key)
        # bytes it would take to recompute: the decoded size; a disk entry's is its stored size (raw by default)
        logical = entry.logical_bytes if entry is not None else 0
        stored = self.host.entry_nbytes(key) or (self.disk.entry_nbytes(key) if self.disk is not None else None) or 1
        now = time.monotonic() if now is None else now
        reuse = (hits + 1) / (hits + 2) * math.exp(-max(0.0, now - last) * math.log(2) / REUSE_HALF_LIFE_S)
        return (logical or stored) / (1 << 20) * recompute_s_per_mib / stored * reuse

    def candidates(self, tier: str, n: int, recompute_s_per_mib: float) -> list[EvictionCandidate]:
        """The first ``n`` entries of ``tier`` in eviction order (key, stored bytes, value): the tier policy's
        order with no chain parent before a child stored anywhere on this node (``_victim_order``). The
        coordinator ranks nodes by these values but takes each node's list only from its front."""
        now = time.monotonic()
        return [EvictionCandidate(k, nb, self.value(k, recompute_s_per_mib, now))
                for k, nb in self._victim_order(tier, n, whole_node=True)]

    def evict(self, keys: Sequence[CacheKey]) -> int:
        """Evict entries of the bottom tier (cluster-wide eviction), in the given order, through the cache's own
        eviction path: its policy hears ``on_evict`` and its counters count it, as for a local eviction. A key
        that is the parent of an entry still stored here, or that left the bottom tier (promoted by a hit since
        the candidates were listed), is kept. Returns how many were evicted."""
        stored = [k for tier in (self.host, self.disk) if tier is not None for k in tier.keys()]
        children = Counter(p for p in self.cache.parents(stored) if p is not None)
        bottom = self.cache.tier_names[-1]
        with self.host.deferred_compaction():  # evictions from a host-only node thin its slabs: re-pack once
            n = self._evict_bottom(keys, children, bottom)
        if n:
            self.metrics.inc("qwen3vl_ray_evictions", n)
        return n

    def _evict_bottom(self, keys: Sequence[CacheKey], children: Counter, bottom: str) -> int:
        n = 0
        for k in keys:
            parent = self.cache.parents([k])[0]
            # demote() out of the last tier is an eviction (the cache's _evict_one drops it there)
            if children.get(k) or self.cache.where(k) != bottom or not self.cache.demote(k):
                continue
            n += 1
            if parent is not None:
                children[parent] -= 1
        return n

    # -- directory sync --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Every key this node holds with its tier code, for a full directory rebuild."""
        entries = [(k, TIER_CODES["host"]) for k in self.host.keys()]
        if self.disk is not None:
            entries += [(k, TIER_CODES["disk"]) for k in self.disk.keys() if not self.host.contains(k)]
        self.journal.drain()  # the snapshot supersedes everything journaled so far
        return {"node_id": self.node_id, "epoch": self.epoch, "entries": entries}

    def drain_journal(self) -> dict:
        events, overflow = self.journal.drain()
        return {"node_id": self.node_id, "epoch": self.epoch, "events": events, "overflow": overflow}

    def stats(self) -> dict:
        s = {"node_id": self.node_id, "epoch": self.epoch, "host": self.host.stats(),
             "served": {"hits": dict(self._served["hits"]), "misses": self._served["misses"]}}
        if self.disk is not None:
            s["disk"] = self.disk.stats()
        try:
            s["cache"] = self.cache.stats()
        except Exception:  # stats are diagnostics; never fail a call for them
            logger.debug("cache stats failed", exc_info=True)
        return s

    def ping(self) -> str:
        return self.epoch

    def close(self) -> None:
        self.cache.close()


@tenant_checked
class NodeAgent:
    """Ray actor wrapper: builds the logic with the real object store and Ray metrics. Thin by design. Every
    method runs only for the agent's tenant (``auth=<tenant key>``: ``actors.tenancy``)."""

    def __init__(self, node_id: str, config: AgentConfig, tenant: Tenant = Tenant()) -> None:
        from actors.config_check import agent_fields
        from actors.metrics import RayMetrics
        from actors.object_store_tier import RayObjectStore

        logging.basicConfig(level=os.environ.get("QWEN3VL_RAY_ACTOR_LOG_LEVEL", "INFO").upper())
        self.tenant = tenant
        self.logic = NodeAgentLogic(node_id, config, RayObjectStore(), RayMetrics(node_id), tenant=tenant)
        self._config_fields = agent_fields(config)

    def put_chunks(self, items):
        return self.logic.put_chunks(items)

    def get_chunks(self, keys):
        return self.logic.get_chunks(keys)

    def contains_many(self, keys):
        return self.logic.contains_many(keys)

    def remove_many(self, keys):
        return self.logic.remove_many(keys)

    def pressure(self):
        return self.logic.pressure()

    def demote_cold(self, n_bytes):
        return self.logic.demote_cold(n_bytes)

    def recompress(self, keys, codec, need_bytes=None):
        return self.logic.recompress(keys, codec, need_bytes)

    def cold_keys(self, tier, n):
        return self.logic.cold_keys(tier, n)

    def candidates(self, tier, n, recompute_s_per_mib):
        return self.logic.candidates(tier, n, recompute_s_per_mib)

    def evict(self, keys):
        return self.logic.evict(keys)

    def snapshot(self):
        return self.logic.snapshot()

    def drain_journal(self):
        return self.logic.drain_journal()

    def stats(self):
        return self.logic.stats()

    def ping(self):
        return self.logic.ping()

    def node_id(self):
        return self.logic.node_id

    def pid(self):
        return os.getpid()

    def config_fields(self):
        """Canonical fields of the config this agent was built with (``actors.config_check``)."""
        return self._config_fields


def agent_options(node_id: str, tenant: Tenant = Tenant()) -> dict:
    """Exactly one agent per node and tenant: pinned to the node, named by node id (and tenant), detached,
    restarted on failure."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return dict(name=agent_name(node_id, tenant), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                max_restarts=-1, max_task_retries=0, num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


def get_or_create_agent(node_id: str, config: AgentConfig, tenant: Tenant = Tenant()):
    """The handle of ``tenant``'s agent on the node, calling with the tenant's key; creates the agent if it does
    not exist (idempotent, race-free by name)."""
    import ray

    from actors.tenancy import with_tenant

    return with_tenant(ray.remote(NodeAgent).options(**agent_options(node_id, tenant)).remote(node_id, config, tenant),
                       tenant)
