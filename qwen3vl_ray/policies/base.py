"""Eviction and admission strategies. Metadata side only: a policy never touches storage.

The cache tells a policy what happens to a tier's entries (``on_insert``/``on_access``/``on_remove``) and
asks it for victims in eviction order. ``parent`` is the key of the previous chunk of the same prefix chain
(None for a chain head or for non-chain entries such as vision features), which lets prefix-aware policies
know that a later block is useless once an earlier block of its chain is gone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator

from qwen3vl_ray.keys import CacheKey


class EvictionPolicy(ABC):
    """Orders a tier's entries for eviction. One instance per tier."""

    name: str

    @abstractmethod
    def on_insert(self, key: CacheKey, nbytes: int, parent: CacheKey | None = None) -> None:
        """``key`` was stored (or replaced) in the tier."""

    @abstractmethod
    def on_access(self, key: CacheKey) -> None:
        """``key`` was read (a hit in this tier)."""

    @abstractmethod
    def on_remove(self, key: CacheKey) -> None:
        """``key`` left the tier (evicted, demoted, removed or expired)."""

    @abstractmethod
    def victims(self, evictable: Callable[[CacheKey], bool]) -> Iterator[CacheKey]:
        """Keys in the order they should go, skipping those for which ``evictable`` is False (pinned or in
        flight). The cache stops iterating once it has made enough room and calls ``on_remove`` itself."""

    def admit(self, key: CacheKey, nbytes: int, parent: CacheKey | None = None) -> bool:
        """Whether a new entry deserves a place (admission control). Default: always."""
        return True

    def on_miss(self, key: CacheKey) -> None:  # noqa: B027 - optional hook
        """``key`` was looked up and absent; ghost-list policies learn from this."""

    def __len__(self) -> int:
        return 0
