"""Eviction and admission strategies. Metadata side only: a policy never touches storage.

The store tells a tier's policy what happens to the tier's entries, one event per kind, and asks it for
victims in eviction order. The ways out are kept apart because they mean different things to a policy that
learns: an *eviction* (dropped out of the cache to make room) and a *demotion* (moved to the tier below to
make room) are the policy's own choices, which ghost lists remember to judge them later; a *promotion* (moved
up because it was hit) and a *delete* (removed by a caller, expired, found corrupt, superseded by a new value
in another tier) are not, and remembering them as evictions would teach the policy about choices it never
made. Arrivals are all ``insert`` (a put, a demotion or promotion landing here, a restart's rebuild).

Two ways to drive a policy, one set of decisions:

- **The store's** (``TieredCache``): events carry the entry's record (``EntryRecord``, of the policy's
  ``record_type``), in which the policy keeps its per-entry fields; the store's index is the only map from
  keys to records, so the policy keeps no per-entry map of its own. ``bind`` gives the policy a way to list
  its tier's records (``members``), which only rare paths use (rebuilding a heap, an all-pinned fallback).
- **Standalone** (trace replays, tests): ``on_insert(key, ...)`` and the other ``on_*`` methods, and
  ``victims`` over keys. The policy then keeps its own records, one per key, and drives the same methods.

``parent`` is the key of the previous chunk of the same prefix chain (None for a chain head or for non-chain
entries such as vision features), which lets prefix-aware policies know that a later block is useless once an
earlier block of its chain is gone. ``up`` is its parent's record when the parent is in the same tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable, Iterator

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.policies.record import EntryRecord


class EvictionPolicy(ABC):
    """Orders a tier's entries for eviction. One instance per tier.

    Subclasses implement ``insert``, ``hit``, ``walk`` and ``_forget`` (the bookkeeping every way out shares),
    and name their record class; they override a departure event only to learn from it (``ChainARCPolicy``
    remembers evictions and demotions in its ghost lists)."""

    name: str
    record_type: type[EntryRecord] = EntryRecord  # the class of the records the store makes for this tier

    def __init__(self) -> None:
        self._own: dict[CacheKey, EntryRecord] = {}  # standalone use only: the records of the keys given
        self._members: Callable[[], Iterable[EntryRecord]] = lambda: self._own.values()

    def new_record(self, key: CacheKey, tier: int, parent: CacheKey | None, last_access: float,
                   in_flight: int = 0) -> EntryRecord:
        """The record of ``key``'s next stay in this tier, which ``insert`` will be told of next. A new one of
        ``record_type`` unless the policy kept the record of an earlier stay (see ``PrefixLRUPolicy``)."""
        return self.record_type(key, tier, parent, last_access, in_flight=in_flight)

    def bind(self, members: Callable[[], Iterable[EntryRecord]]) -> None:
        """Used by a store: ``members()`` lists the records of this policy's tier (the store holds them)."""
        self._members = members

    # -- the store's events: records ----------------------------------------------------------------------
    @abstractmethod
    def insert(self, rec: EntryRecord, nbytes: int, up: EntryRecord | None = None) -> None:
        """``rec`` arrived in the tier (a new record: stored, or moved here), or was replaced in place (the same
        record: a use). ``up``: its parent's record, when the parent is in this tier."""

    @abstractmethod
    def hit(self, rec: EntryRecord) -> None:
        """``rec`` was read from this tier (or served from it by reference)."""

    def miss(self, key: CacheKey) -> None:  # noqa: B027 - optional hook
        """``key`` was looked up and this tier does not hold it (absent from the cache, or found in a tier
        below this one); ghost-list policies learn from this."""

    def evict(self, rec: EntryRecord) -> None:
        """``rec`` was dropped out of the cache from this tier to make room (this policy's choice)."""
        self._forget(rec)

    def demote(self, rec: EntryRecord) -> None:
        """``rec`` moved to a tier below to make room here (this policy's choice; it stays cached)."""
        self._forget(rec)

    def promote(self, rec: EntryRecord) -> None:
        """``rec`` moved to a tier above because it was hit (not a choice of this policy)."""
        self._forget(rec)

    def delete(self, rec: EntryRecord) -> None:
        """``rec`` was removed for a reason of its own: a caller's remove, idle expiry, a corrupt read, or a
        new value stored in another tier (not a choice of this policy)."""
        self._forget(rec)

    @abstractmethod
    def _forget(self, rec: EntryRecord) -> None:
        """Let ``rec`` go, whichever way it left (a no-op for a record already gone)."""

    @abstractmethod
    def walk(self, evictable: Callable[[EntryRecord], bool]) -> Iterator[EntryRecord]:
        """Records in the order they should go, skipping those for which ``evictable`` is False (pinned or in
        flight). The store stops iterating once it has found its victim, closes the walk, and then reports
        how the victim left (``evict`` or ``demote``)."""

    def admit(self, key: CacheKey, nbytes: int, parent: CacheKey | None = None) -> bool:
        """Whether a new entry deserves a place (admission control). Default: always."""
        return True

    @abstractmethod
    def __len__(self) -> int:
        """Entries in the tier."""

    # -- standalone: keys ---------------------------------------------------------------------------------
    def on_insert(self, key: CacheKey, nbytes: int, parent: CacheKey | None = None) -> None:
        rec = self._own.get(key)
        if rec is not None:  # replaced in place: same chain position, counts as a use
            self.insert(rec, nbytes)
            return
        rec = self._own[key] = self.new_record(key, 0, parent, 0.0)
        self.insert(rec, nbytes, None if parent is None else self._own.get(parent))

    def on_hit(self, key: CacheKey) -> None:
        rec = self._own.get(key)
        if rec is not None:
            self.hit(rec)

    def on_miss(self, key: CacheKey) -> None:
        self.miss(key)

    def on_evict(self, key: CacheKey) -> None:
        self._leave(key, self.evict)

    def on_demote(self, key: CacheKey) -> None:
        self._leave(key, self.demote)

    def on_promote(self, key: CacheKey) -> None:
        self._leave(key, self.promote)

    def on_delete(self, key: CacheKey) -> None:
        self._leave(key, self.delete)

    def _leave(self, key: CacheKey, event: Callable[[EntryRecord], None]) -> None:
        rec = self._own.get(key)
        if rec is not None:
            event(rec)  # before the record goes: a policy may look its key up while it learns
            del self._own[key]

    def victims(self, evictable: Callable[[CacheKey], bool]) -> Iterator[CacheKey]:
        """``walk`` over keys: the keys in the order they should go (see ``walk``)."""
        walk = self.walk(lambda rec: evictable(rec.key))
        try:
            for rec in walk:
                yield rec.key
        finally:
            close = getattr(walk, "close", None)
            if close is not None:
                close()

    def __contains__(self, key: object) -> bool:
        return key in self._own

    def record_of(self, key: CacheKey) -> EntryRecord | None:
        """Standalone use: the record this policy keeps for ``key`` (None if absent)."""
        return self._own.get(key)
