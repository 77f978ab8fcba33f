"""Eviction/admission policies by name. Metadata side only: policies never touch storage.

``make_policy(name)`` builds a fresh policy (one per tier). ``DEFAULT_POLICY`` (``chain-arc``) is the measured
best on prefix-shaped KV reuse and is never below LRU on the benchmark traces (``python -m benchmarks.policy``);
``prefix-2q`` and ``prefix-lru`` stay registered for comparison and for tiers that want them.
"""

from __future__ import annotations

from typing import Callable

from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.policies.chain import ChainARCPolicy
from qwen3vl_ray.policies.doorkeeper import Doorkeeper
from qwen3vl_ray.policies.lru import LRUPolicy
from qwen3vl_ray.policies.prefix import Prefix2QPolicy, PrefixLRUPolicy

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    PrefixLRUPolicy.name: PrefixLRUPolicy,
    Prefix2QPolicy.name: Prefix2QPolicy,
    ChainARCPolicy.name: ChainARCPolicy,
}
"""Policy factories by name."""

DEFAULT_POLICY = ChainARCPolicy.name


def make_policy(name: str) -> EvictionPolicy:
    """A new policy instance for ``name``; raises ``ConfigError`` naming the valid ones."""
    factory = POLICIES.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"unknown eviction policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    return factory()


__all__ = [
    "ChainARCPolicy", "DEFAULT_POLICY", "POLICIES", "Doorkeeper", "EvictionPolicy", "LRUPolicy", "Prefix2QPolicy",
    "PrefixLRUPolicy", "make_policy",
]
