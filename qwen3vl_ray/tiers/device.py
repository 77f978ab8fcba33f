"""Device tier: a block pool on the model's device (CUDA when present, else CPU)."""

from __future__ import annotations

from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.pools.block_pool import resolve_device
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.pooled import PooledTier


def make_device_tier(cfg: TierConfig, namespace: Namespace) -> PooledTier:
    """``cfg.device``: ``"auto"`` (CUDA if present, else CPU), ``"cpu"`` or ``"cuda:N"``."""
    return PooledTier("device", cfg, namespace, resolve_device(cfg.device))
