"""Chunks across the cluster: find, fetch and store them by key, from any process attached to Ray.

``ClusterChunks`` is plain Python over ports (this node's agent and the others' through ``agent_for``, the
coordinator, the object store), so the serving worker (``actors.worker``) and vLLM's KV connector
(``actors.kv_block_store``) share one implementation, and tests drive it without Ray:

- ``holders(keys)``: per key, the node whose agent holds it (this node first, then the coordinator's
  directory);
- ``fetch_prefix(keys)``: the longest held prefix as tensors, one batched call per holding node and one
  batched object-store read (a cross-node hit is Ray's object transfer from the holder's store);
- ``store(items)``: new chunks to the agent the coordinator places them on, in one batched call, recorded in
  the directory so that routing and other nodes see them at once.

Agent and coordinator failures turn into misses and unstored chunks: a request never fails because the
cache did.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from actors.metrics import Metrics
from actors.node_agent import ChunkRef, materialize
from actors.object_store_tier import ObjectStore
from actors.wire import WireChunk
from qwen3vl_ray.keys import CacheKey

logger = logging.getLogger(__name__)


class ClusterChunks:
    """See the module docstring. ``node_id`` is the caller's node; ``agent_for(node)`` gives that node's agent."""

    def __init__(self, node_id: str, agent_for: Callable[[str], Any], coordinator: Any, store: ObjectStore,
                 metrics: Metrics) -> None:
        self.node_id, self.agent_for, self.coordinator, self.store = node_id, agent_for, coordinator, store
        self.metrics = metrics
        self.metrics.declare("qwen3vl_ray_cross_node_bytes", tier="host")  # 0 until a cross-node hit, not "no data"

    def holders(self, keys: Sequence[CacheKey]) -> list[str | None]:
        """Per key, the node holding it: this node when its agent has it, else the directory's answer."""
        if not keys:
            return []
        try:
            local = self.agent_for(self.node_id).contains_many(list(keys))
        except Exception:
            logger.warning("local agent unreachable; treating its entries as misses", exc_info=True)
            local = [None] * len(keys)
        if all(local):
            return [self.node_id] * len(keys)
        try:
            remote = self.coordinator.lookup(list(keys))
        except Exception:
            logger.warning("coordinator unreachable; only this node's agent counts as holding", exc_info=True)
            remote = [None] * len(keys)
        return [self.node_id if here else (there[0] if there is not None else None)
                for here, there in zip(local, remote)]

    def held_prefix(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` some agent holds."""
        n = 0
        for holder in self.holders(keys):
            if holder is None:
                break
            n += 1
        return n

    def fetch_prefix(self, keys: Sequence[CacheKey]) -> tuple[list[torch.Tensor], list[str]]:
        """The longest prefix of ``keys`` held by agents, as tensors, and per chunk its source tier
        (``host``/``disk`` on the local agent, ``remote`` for another node's)."""
        if not keys:
            return [], []
        plan: list[str] = []
        for holder in self.holders(keys):
            if holder is None:
                break
            plan.append(holder)
        refs: list[ChunkRef | None] = [None] * len(plan)
        for node in dict.fromkeys(plan):  # one batched call per holding node
            idx = [i for i, n in enumerate(plan) if n == node]
            try:
                got = self.agent_for(node).get_chunks([keys[i] for i in idx])
            except Exception:
                logger.warning("agent of %s unreachable; its chunks are misses", node[:12], exc_info=True)
                got = [None] * len(idx)
            for i, r in zip(idx, got):
                refs[i] = r
        n = next((i for i, r in enumerate(refs) if r is None), len(refs))
        try:
            tensors = materialize(refs[:n], self.store)  # one batched read; remote refs are pulled by Ray
        except Exception:
            logger.warning("fetching %d cached chunks failed; recomputing", n, exc_info=True)
            return [], []
        remote_idx = [i for i in range(n) if plan[i] != self.node_id]
        if remote_idx:
            self.metrics.inc("qwen3vl_ray_cross_node_bytes",
                             sum(tensors[i].numel() * tensors[i].element_size() for i in remote_idx), tier="host")
        sources = ["remote" if plan[i] != self.node_id else refs[i].tier for i in range(n)]
        return tensors, sources

    def store_chunks(self, items: Sequence[tuple[CacheKey, torch.Tensor, CacheKey | None]]) -> list[str | None]:
        """Store ``(key, tensor, parent)`` items on the node the coordinator places them on (one batched call)
        and record them in its directory. Per item the tier it landed in, or None (not stored)."""
        if not items:
            return []
        wire = [WireChunk.of(k, t, p) for k, t, p in items]
        nbytes = sum(c.nbytes for c in wire)
        try:
            target = self.coordinator.place(self.node_id, nbytes)
            tiers = self.agent_for(target).put_chunks(wire)
            self.coordinator.record(target, [c.key for c in wire], tiers)
            return tiers
        except Exception:
            logger.warning("storing %d new chunks failed; they will be recomputed next time", len(items), exc_info=True)
            return [None] * len(items)


def connect(tenant: Any, agent_config: Any, metrics: Metrics | None = None) -> ClusterChunks:
    """``ClusterChunks`` for this Ray process (an actor or a driver): its node's agent (started if missing),
    the other nodes' agents by name, and the coordinator, all of ``tenant`` (calls carry its key)."""
    import ray

    from actors.config import NAMESPACE
    from actors.coordinator import RayAgentPort, coordinator_name
    from actors.metrics import RayMetrics
    from actors.node_agent import agent_name, get_or_create_agent
    from actors.object_store_tier import RayObjectStore
    from actors.tenancy import with_tenant

    node = ray.get_runtime_context().get_node_id()
    ports: dict[str, RayAgentPort] = {node: RayAgentPort(get_or_create_agent(node, agent_config, tenant))}

    def agent_for(node_id: str) -> RayAgentPort:
        port = ports.get(node_id)
        if port is None:
            handle = ray.get_actor(agent_name(node_id, tenant), namespace=NAMESPACE)
            port = ports[node_id] = RayAgentPort(with_tenant(handle, tenant))
        return port

    coordinator = RayAgentPort(with_tenant(ray.get_actor(coordinator_name(tenant), namespace=NAMESPACE), tenant),
                               timeout_s=60)
    return ClusterChunks(node, agent_for, coordinator, RayObjectStore(), metrics or RayMetrics(node))
