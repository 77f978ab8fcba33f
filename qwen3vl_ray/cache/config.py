"""Configuration of the tiered cache."""

from __future__ import annotations

from dataclasses import dataclass

from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.settings import default
from qwen3vl_ray.tiers.config import TierConfig


@dataclass
class CacheConfig:
    """A hierarchy of tiers and the strategy that orders each tier's entries.

    Attributes:
        tiers: top (fastest) to bottom; kinds may repeat only for tests. At least one.
        policy: eviction/admission strategy name per tier (``qwen3vl_ray.policies.make_policy``); default the
            settings' ``policy`` (the project default, never worse than LRU on the Mooncake trace); ``None`` means
            the same.
        namespace: what the entries are valid for (model fingerprint, dtype, layout, codec, tenant).
            Required: disk files are kept per namespace, so two models or tenants never read each other's
            entries, and a shared default would silently pool them.
        promote_on_hit: move an entry to the top tier when ``get`` finds it lower (default True).
        idle_ttl_s: entries not accessed for this many seconds are dropped by ``expire_idle``
            (``None``: never). Seconds.
        prefetch_threads: background threads serving ``prefetch`` (default 1; 0 = synchronous).
    """

    tiers: list[TierConfig]
    policy: str | None = default("policy")
    namespace: Namespace | None = None
    promote_on_hit: bool = True
    idle_ttl_s: float | None = None
    prefetch_threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, Namespace):
            raise ConfigError(f"CacheConfig.namespace must be a keys.Namespace naming the model (and dtype, layout, "
                              f"codec, tenant) the entries belong to, got {self.namespace!r}")
        if not self.tiers:
            raise ConfigError("a cache needs at least one tier")
        for t in self.tiers:
            if not isinstance(t, TierConfig):
                raise ConfigError(f"tiers must be TierConfig objects, got {type(t).__name__}")
        if self.idle_ttl_s is not None and self.idle_ttl_s <= 0:
            raise ConfigError(f"idle_ttl_s must be > 0 or None, got {self.idle_ttl_s}")
        if self.prefetch_threads < 0:
            raise ConfigError(f"prefetch_threads must be >= 0, got {self.prefetch_threads}")
