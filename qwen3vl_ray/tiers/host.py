"""Host tier: a block pool in process memory, page-locked when CUDA is present (fast async H2D/D2H).

Preallocated so puts and gets run at copy speed: a fresh allocation pays first-touch page faults (~4x
slower on the build machine). The Ray object-store host tier (Ray issue) sits behind the same interface.
"""

from __future__ import annotations

from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.pools.block_pool import pinning_available
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.pooled import PooledTier


def make_host_tier(cfg: TierConfig, namespace: Namespace) -> PooledTier:
    return PooledTier("host", cfg, namespace, "cpu", pin_memory=cfg.pinned and pinning_available())
