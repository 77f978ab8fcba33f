"""The KV connector's blocks on the node agents: vLLM engines anywhere in the Ray cluster share one store.

``TierKVConnector`` (``qwen3vl_ray.serving``) with ``store="ray"`` keeps its blocks here instead of in its own
process: a block saved by an engine goes to the agent the coordinator places it on (its host tier in the Ray
object store, its NVMe tier below), the coordinator's directory learns where it is, and any engine on any
node finds it there: its node's agent first, then the directory, then one object transfer from the holder.
Agent restarts keep what the disk tier held; a failed agent or coordinator call is a miss, never an error.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from actors.cluster_chunks import ClusterChunks
from qwen3vl_ray import settings as settings_mod
from qwen3vl_ray.errors import ClusterError
from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.serving.block_store import BlockStore

logger = logging.getLogger(__name__)


class AgentBlockStore(BlockStore):
    """vLLM blocks held by the node agents, found through ``ClusterChunks``."""

    def __init__(self, chunks: ClusterChunks) -> None:
        super().__init__()
        self.chunks = chunks

    @classmethod
    def from_settings(cls, s: settings_mod.Settings) -> "AgentBlockStore":
        """Attach to the cluster (``RAY_ADDRESS``, else the one running on this machine), make sure this tenant's coordinator and
        agents run with these settings' agent configuration (a running service with another one is refused,
        naming the fields), and connect to them."""
        import ray

        from actors.cluster_chunks import connect
        from actors.config import ServiceConfig
        from actors.service import attach_ray, ensure_service

        if not ray.is_initialized():
            # never a new embedded Ray: an engine's subprocess (vLLM's engine core, its workers) would get a
            # cluster of its own and share nothing. The cluster named by RAY_ADDRESS, else the one on this machine.
            address = os.environ.get("RAY_ADDRESS") or "auto"
            try:
                attach_ray(address)
            except ConnectionError as e:
                raise ClusterError(f"store='ray' keeps blocks on the node agents of a running Ray cluster, and none "
                                   f"answers at {address!r} ({e}): set RAY_ADDRESS, or start one with "
                                   f"`ray start --head`") from None
        config = ServiceConfig.storage_from_settings(s)  # no workers: the engines are vLLM's
        ensure_service(config, num_workers=0)
        logger.info("KV connector on the node agents of tenant %s", config.tenant.id)
        return cls(connect(config.tenant, config.agent))

    def contains_many(self, keys: Sequence[CacheKey]) -> list[bool]:
        return [holder is not None for holder in self.chunks.holders(keys)]

    def _held_prefix(self, keys: Sequence[CacheKey]) -> int:
        return self.chunks.held_prefix(keys)

    def _load(self, keys: Sequence[CacheKey]) -> tuple[list[torch.Tensor | None], list[str | None]]:
        # the scheduler asked for a held prefix: a block missing now (evicted meanwhile) ends it, and vLLM
        # recomputes from there
        tensors, sources = self.chunks.fetch_prefix(keys)
        missing = len(keys) - len(tensors)
        return list(tensors) + [None] * missing, list(sources) + [None] * missing

    def _save(self, items: Sequence[tuple[CacheKey, torch.Tensor, CacheKey | None]]) -> list[bool]:
        return [tier is not None for tier in self.chunks.store_chunks(items)]
