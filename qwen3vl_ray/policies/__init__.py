"""Eviction/admission policies by name. Metadata side only: policies never touch storage.

``make_policy(name)`` builds a fresh policy (one per tier). ``DEFAULT_POLICY`` is ``prefix-lru`` (leaf-first LRU,
as SGLang's radix cache): never below LRU on the benchmark traces (``python -m benchmarks.policy``), and it keeps
whole chat sessions resumable under pressure (0.91-0.98 of the physical limit in ``benchmarks.capacity``).
``chain-arc`` reaches higher hit ratios on shared-prefix traces (Mooncake, Zipf with scans) but spreads its
evictions over many chains, breaking more sessions than the bytes it frees (0.61 of the limit with the device
tier alone), so it is opt-in; ``prefix-2q`` stays registered for comparison. ``prefix-return`` (opt-in) is
``chain-arc`` with hot chains ranked by their predicted return gap as well (``docs/policies.md``).
"""

from __future__ import annotations

from typing import Callable

from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.policies.chain import ChainARCPolicy
from qwen3vl_ray.policies.doorkeeper import Doorkeeper
from qwen3vl_ray.policies.lru import LRUPolicy
from qwen3vl_ray.policies.prefix import Prefix2QPolicy, PrefixLRUPolicy
from qwen3vl_ray.policies.return_time import PrefixReturnPolicy

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    PrefixLRUPolicy.name: PrefixLRUPolicy,
    Prefix2QPolicy.name: Prefix2QPolicy,
    ChainARCPolicy.name: ChainARCPolicy,
    PrefixReturnPolicy.name: PrefixReturnPolicy,
}
"""Policy factories by name."""

DEFAULT_POLICY = PrefixLRUPolicy.name


def make_policy(name: str) -> EvictionPolicy:
    """A new policy instance for ``name``; raises ``ConfigError`` naming the valid ones."""
    factory = POLICIES.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"unknown eviction policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    return factory()


__all__ = [
    "ChainARCPolicy", "DEFAULT_POLICY", "POLICIES", "Doorkeeper", "EvictionPolicy", "LRUPolicy", "Prefix2QPolicy",
    "PrefixLRUPolicy", "PrefixReturnPolicy", "make_policy",
]
