"""Build a tier from its config: the one place tier kinds map to classes."""

from __future__ import annotations

from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.tiers.base import Tier
from qwen3vl_ray.tiers.config import TIER_KINDS, TierConfig
from qwen3vl_ray.tiers.device import make_device_tier
from qwen3vl_ray.tiers.disk import DiskTier
from qwen3vl_ray.tiers.host import make_host_tier


def make_tier(cfg: TierConfig, namespace: Namespace) -> Tier:
    """A device, host or disk tier for ``cfg`` under ``namespace``."""
    if not isinstance(cfg, TierConfig):
        raise TypeError(f"make_tier needs a TierConfig, got {type(cfg).__name__}")
    if not isinstance(namespace, Namespace):
        raise TypeError(f"make_tier needs a Namespace, got {type(namespace).__name__}")
    if cfg.kind == "device":
        return make_device_tier(cfg, namespace)
    if cfg.kind == "host":
        return make_host_tier(cfg, namespace)
    if cfg.kind == "disk":
        return DiskTier(cfg, namespace)
    raise ValueError(f"unknown tier kind {cfg.kind!r}; allowed: {', '.join(TIER_KINDS)}")
