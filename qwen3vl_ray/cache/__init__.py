"""The tiered cache and the services that act on it (pressure, idle expiry: ``lifetimes``)."""

from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.cache.tiered_cache import TieredCache

__all__ = ["CacheConfig", "TieredCache"]
