"""Eviction and admission strategies. Metadata side only: a policy never touches storage.

The cache tells a tier's policy what happens to the tier's entries, one event per kind, and asks it for
victims in eviction order. The ways out are kept apart because they mean different things to a policy that
learns: an *eviction* (dropped out of the cache to make room) and a *demotion* (moved to the tier below to
make room) are the policy's own choices, which ghost lists remember to judge them later; a *promotion* (moved
up because it was hit) and a *delete* (removed by a caller, expired, found corrupt, superseded by a new value
in another tier) are not, and remembering them as evictions would teach the policy about choices it never
made. Arrivals are all ``on_insert`` (a put, a demotion or promotion landing here, a restart's rebuild).

``parent`` is the key of the previous chunk of the same prefix chain (None for a chain head or for non-chain
entries such as vision features), which lets prefix-aware policies know that a later block is useless once an
earlier block of its chain is gone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator

from qwen3vl_ray.keys import CacheKey


class EvictionPolicy(ABC):
    """Orders a tier's entries for eviction. One instance per tier.

    Subclasses implement ``on_insert``, ``on_hit``, ``victims`` and ``_forget`` (the bookkeeping every way out
    shares); they override a departure event only to learn from it (``ChainARCPolicy`` remembers evictions and
    demotions in its ghost lists)."""

    name: str

    # -- arrivals and lookups ----------------------------------------------------------------------------
    @abstractmethod
    def on_insert(self, key: CacheKey, nbytes: int, parent: CacheKey | None = None) -> None:
        """``key`` arrived in the tier (stored, or moved here), or was replaced in place (a use)."""

    @abstractmethod
    def on_hit(self, key: CacheKey) -> None:
        """``key`` was read from this tier (or served from it by reference)."""

    def on_miss(self, key: CacheKey) -> None:  # noqa: B027 - optional hook
        """``key`` was looked up and this tier does not hold it (absent from the cache, or found in a tier
        below this one); ghost-list policies learn from this."""

    # -- departures ------------------------------------------------------------------------------------
    def on_evict(self, key: CacheKey) -> None:
        """``key`` was dropped out of the cache from this tier to make room (this policy's choice)."""
        self._forget(key)

    def on_demote(self, key: CacheKey) -> None:
        """``key`` moved to a tier below to make room here (this policy's choice; it stays cached)."""
        self._forget(key)

    def on_promote(self, key: CacheKey) -> None:
        """``key`` moved to a tier above because it was hit (not a choice of this policy)."""
        self._forget(key)

    def on_delete(self, key: CacheKey) -> None:
        """``key`` was removed for a reason of its own: a caller's remove, idle expiry, a corrupt read, or a
        new value stored in another tier (not a choice of this policy)."""
        self._forget(key)

    @abstractmethod
    def _forget(self, key: CacheKey) -> None:
        """Drop ``key``'s record, whichever way it left (a no-op for an unknown key)."""

    # -- decisions -------------------------------------------------------------------------------------
    @abstractmethod
    def victims(self, evictable: Callable[[CacheKey], bool]) -> Iterator[CacheKey]:
        """Keys in the order they should go, skipping those for which ``evictable`` is False (pinned or in
        flight). The cache stops iterating once it has found its victim, closes the walk, and then reports
        how the victim left (``on_evict`` or ``on_demote``)."""

    def admit(self, key: CacheKey, nbytes: int, parent: CacheKey | None = None) -> bool:
        """Whether a new entry deserves a place (admission control). Default: always."""
        return True

    def __len__(self) -> int:
        return 0
