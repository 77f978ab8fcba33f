"""The tiered cache: tiers are storage, policies order them, this class moves entries between them.

Exclusive hierarchy: an entry lives in exactly one tier at a time, so every byte budget counts each entry
once and ``where(key)`` has one answer. A hit below the top is promoted (moved up); making room in a tier
demotes its victims one tier down (further down when that tier cannot make room: its entries are pinned or
being read), and out of the last tier they are dropped.

Concurrency: one lock guards the index (metadata); bytes move outside it. Reads are two-phase: the entry is
marked in flight under the lock, its bytes are copied out without the lock, then the lock is taken again to
finish. Stores are too, in tiers that hold room (``Tier.holds_room``): under the lock the entry is indexed,
marked in flight and room is held for it; the copy (host) or the file write and fsync (disk) run without
the lock; the entry is published under it (``pending.PendingWrite``). A victim demoted into the disk tier
leaves its tier at once and is written the same way, so no lookup or host put waits on disk I/O. Meanwhile
readers of an entry in flight are served from the bytes being written. An entry that is pinned or in
flight is never chosen as a victim, so a slot is never reused while someone reads or writes it. Every
public call finishes its own writes before it returns: the class stays a synchronous facade.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Container, Iterable, Iterator, NamedTuple, Sequence

import torch

from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.cache.pending import PendingWrite
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import CacheKey, validate_key
from qwen3vl_ray.policies import DEFAULT_POLICY, make_policy
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.policies.record import EntryRecord
from qwen3vl_ray.tiers.base import Placement, Tier

log = logging.getLogger(__name__)

#: ``listener(key, src, dst, nbytes)``: the index moved ``key`` from tier ``src`` to tier ``dst`` (positions in
#: ``TieredCache.tiers``); ``src`` None: it entered the cache, ``dst`` None: it left it; ``nbytes``: the bytes of
#: the tensor that moved (None where the move carries none: a drop, a failed replace's undo, which moves the key
#: back where its old value still is). A replace in place is no move; a new value stored in another tier than the
#: old one is two: the old value leaves, the new one enters (it is no demotion or promotion). Called under the
#: cache's lock, in the order the moves happen: a listener only records (a node agent journals them for the
#: cluster's directory and counts its swaps) and never calls back into the cache.
EntryListener = Callable[[CacheKey, "int | None", "int | None", "int | None"], None]


class EntryInfo(NamedTuple):
    """What the store knows of one entry's use (``TieredCache.entry_info``)."""

    tier: str  # the tier it is in
    parent: CacheKey | None  # the chunk before it in its chain (None: a chain's head, or not a chain)
    last_access: float  # ``time.monotonic()`` of its last store or read, in whole seconds
    hits: int  # reads of this value since it was stored


class _CoarseClock:
    """``time.monotonic()`` rounded to whole seconds, one float object per second (idle TTLs are minutes)."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = float(int(time.monotonic()))

    def __call__(self) -> float:
        now = int(time.monotonic())
        if now != self._value:
            self._value = float(now)
        return self._value


@dataclass(slots=True)
class _TierCounters:
    hits: int = 0
    promotions_in: int = 0
    demotions_in: int = 0
    evictions: int = 0
    rejected: int = 0


class TieredCache:
    """Public entry point of the store. See the module docstring for the invariants.

    Args:
        config: tiers, policy and namespace.
        tiers: optional ready-made tier objects (one per ``config.tiers`` entry, same order). The Ray layer
            injects its object-store host tier this way; by default tiers are built from the config.
        policies: optional policy objects, one per tier (tests use this to script eviction).
    """

    def __init__(
        self,
        config: CacheConfig,
        tiers: Sequence[Tier] | None = None,
        policies: Sequence[EvictionPolicy] | None = None,
    ) -> None:
        self.config = config
        if tiers is None:
            from qwen3vl_ray.tiers.factory import make_tier

            tiers = [make_tier(tc, config.namespace) for tc in config.tiers]
        if len(tiers) != len(config.tiers):
            raise ConfigError(f"{len(tiers)} tier objects given for {len(config.tiers)} tier configs")
        self.tiers: list[Tier] = list(tiers)
        self.policies: list[EvictionPolicy] = (
            list(policies) if policies is not None else [make_policy(config.policy or DEFAULT_POLICY) for _ in self.tiers]
        )
        if len(self.policies) != len(self.tiers):
            raise ConfigError(f"{len(self.policies)} policies given for {len(self.tiers)} tiers")
        self._lock = threading.RLock()
        self._clock = _CoarseClock()
        # key -> the record of the entry's current stay (a record of the tier's policy's ``record_type``, which
        # holds the policy's fields too: one record per entry for store and policy)
        self._index: dict[CacheKey, EntryRecord] = {}
        self._pins: dict[CacheKey, int] = {}  # pinned keys -> pin count (``pin``; transient pins while moving)
        self._staged: dict[CacheKey, torch.Tensor] = {}  # bytes of entries whose write is in flight (few at a time)
        self._queued: dict[CacheKey, PendingWrite] = {}  # writes into the last tier not started yet (evictable)
        # While a put's write is pending, the value it replaces may stay in its own tier to fall back to: that
        # record is live in its tier's policy but not in the index (which names the new one). Kept here so the
        # tier's policy still lists it and a child stored meanwhile links to it.
        self._fallbacks: dict[CacheKey, EntryRecord] = {}
        self._counters = [_TierCounters() for _ in self.tiers]
        self._listeners: list[EntryListener] = []
        self._misses = 0
        self._dropped = 0
        self._expired = 0
        self._prefetch_pool = (
            ThreadPoolExecutor(config.prefetch_threads, thread_name_prefix="qwen3vl-prefetch")
            if config.prefetch_threads
            else None
        )
        for i, policy in enumerate(self.policies):
            policy.bind(lambda i=i: self._members(i))
        # Entries already in a tier (the disk tier rebuilds its index after a restart; a pooled tier filled
        # before it was given to the store) are indexed; an addressed tier hands its records over and from then
        # on finds its entries' locations in the store's records.
        for i, tier in enumerate(self.tiers):
            held = tier.attach(lambda key, i=i: self._placed(i, key), lambda i=i: self._placed_keys(i)) \
                if tier.addressed else None
            for key in list(held) if held is not None else list(tier.keys()):
                nbytes = tier.stored_nbytes(held[key]) if held is not None else tier.entry_nbytes(key)
                if nbytes is None or key in self._index:
                    if held is not None:
                        tier.free(held[key])  # a second copy of a key a tier above holds
                    continue
                rec = self._index[key] = self._record(i, key, None)
                if held is not None:
                    rec.loc, rec.spec = held[key].loc, held[key].spec
                self.policies[i].insert(rec, nbytes)

    def _record(self, i: int, key: CacheKey, parent: CacheKey | None, in_flight: int = 0) -> EntryRecord:
        """A new record of ``key``'s stay in tier ``i``, of that tier's policy's class."""
        return self.policies[i].new_record(key, i, parent, self._clock(), in_flight=in_flight)

    def _members(self, i: int) -> list[EntryRecord]:
        """The records tier ``i``'s policy holds: the index's in that tier and the fallbacks kept there."""
        recs = [r for r in self._index.values() if r.tier == i]
        return recs + [r for r in self._fallbacks.values() if r.tier == i and self._index.get(r.key) is not r]

    def _placed(self, i: int, key: CacheKey) -> EntryRecord | None:
        """The record of ``key``'s value in tier ``i``: its current one, or the one a pending put falls back to
        (an addressed tier finds its locations here). Safe without the lock (two dict reads)."""
        rec = self._index.get(key)
        if rec is None or rec.tier != i:
            rec = self._fallbacks.get(key)
        return rec if rec is not None and rec.tier == i else None

    def _placed_keys(self, i: int) -> list[CacheKey]:
        """The keys whose bytes tier ``i`` holds (an addressed tier's ``keys``; from any thread)."""
        with self._lock:
            return [r.key for r in self._members(i) if r.loc is not None]

    def _read(self, rec: EntryRecord, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The bytes of ``rec``'s value from its tier (None: gone or corrupt). Lock not needed: a value being
        read is never moved or freed (``in_flight``), and the tier copies under its own lock."""
        tier = self.tiers[rec.tier]
        return tier.read(rec, out) if tier.addressed else tier.get(rec.key, out=out)

    def _free(self, rec: EntryRecord) -> None:
        """Take the bytes of ``rec``'s value out of its tier (durable at the tier's next ``sync``)."""
        tier = self.tiers[rec.tier]
        if tier.addressed:
            tier.free(rec)
        else:
            tier.discard(rec.key)

    def _store(self, i: int, prepared, place: EntryRecord | None) -> EntryRecord | Placement | bool:
        """Store ``prepared`` in tier ``i`` now (lock held), replacing the value at ``place`` (its record in
        that tier) or as a new value; what holds its location (``place``, or a ``Placement`` for ``_adopt`` to
        hand to the record the caller makes), or False if there is no room."""
        tier = self.tiers[i]
        if not tier.addressed:
            return tier.complete_store(prepared)
        target = place if place is not None else Placement()
        return target if tier.store_into(prepared, target) else False

    def _adopt(self, rec: EntryRecord, placed: EntryRecord | Placement | bool) -> None:
        """``rec`` takes the location ``_store`` placed a value at (lock held); a value ``rec`` held before goes."""
        if isinstance(placed, Placement):
            if rec.loc is not None:
                self.tiers[rec.tier].free(rec)
            rec.spec = placed.spec  # before the location: a reader that sees the location sees its spec
            rec.loc = placed.loc

    def _up(self, i: int, parent: CacheKey | None) -> EntryRecord | None:
        """The record of ``parent`` in tier ``i``, if it has one there (its policy links chains within the tier):
        its current record, or the value a pending put of it would fall back to."""
        return None if parent is None else self._placed(i, parent)

    def add_listener(self, listener: EntryListener) -> None:
        """Hear every later move of an entry between tiers, into and out of the cache (``EntryListener``).
        Entries indexed before (found on disk at start) were never announced: a listener starts from ``keys``."""
        with self._lock:
            self._listeners.append(listener)

    def _moved(self, key: CacheKey, src: int | None, dst: int | None, tensor: torch.Tensor | None = None) -> None:
        nbytes = None if tensor is None else tensor.numel() * tensor.element_size()
        for listener in self._listeners:
            listener(key, src, dst, nbytes)

    # ------------------------------------------------------------------ queries
    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def __len__(self) -> int:
        return len(self._index)

    def contains(self, key: CacheKey) -> bool:
        return validate_key(key) in self._index

    def contains_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def where(self, key: CacheKey) -> str | None:
        e = self._index.get(validate_key(key))
        return None if e is None else self.tiers[e.tier].name

    def entry_info(self, key: CacheKey) -> EntryInfo | None:
        """Where ``key`` is and how it has been used; None if absent."""
        with self._lock:
            e = self._index.get(validate_key(key))
            return None if e is None else EntryInfo(self.tiers[e.tier].name, e.parent, e.last_access, e.hits)

    def parents(self, keys: Iterable[CacheKey]) -> list[CacheKey | None]:
        """Each key's chain parent (None: a chain's head, not a chain, or absent), under one lock round."""
        with self._lock:
            index = self._index
            return [None if (e := index.get(k)) is None else e.parent for k in keys]

    def longest_prefix(self, keys: Sequence[CacheKey]) -> int:
        """Number of leading ``keys`` present in any tier (a prefix hit stops at the first gap)."""
        n = 0
        for k in keys:
            if k not in self._index:
                break
            n += 1
        return n

    def keys(self) -> Iterator[CacheKey]:
        return iter(list(self._index))

    # ------------------------------------------------------------------ store
    def put(self, key: CacheKey, tensor: torch.Tensor, parent: CacheKey | None = None) -> bool:
        """Store ``tensor`` in the highest tier that admits it. False if there is no room (counted);
        nothing already stored is lost by a failed put. A tier that cannot hold it (too big, or its codec refuses
        the tensor) passes it to the tiers below; raises CapacityError (too big for every tier) or CodecError
        (refused by some tier's codec, too big for the others) if no tier could ever hold it."""
        return self.put_many([(key, tensor, parent)])[0]

    def put_many(self, items: Sequence[tuple]) -> list[bool]:
        """Batched ``put``: items are ``(key, tensor)`` or ``(key, tensor, parent)``; per item, whether it is stored.

        One lock round per tier for the whole batch, one make-room for its total, the copies outside the lock.
        Newest on top: when the batch is larger than a tier, its leading items go straight to the tier below
        (a sequence of puts would write them there and demote them at once)."""
        batch = [self._checked(item) for item in items]
        if len({k for k, _, _ in batch}) != len(batch):
            # the same key twice: each later one replaces the earlier, as in a sequence of puts
            return [self.put_many([item])[0] for item in batch]
        results = [False] * len(batch)
        refusals: list[list[ValueError]] = [[] for _ in batch]  # per item, each tier's reason it cannot hold it
        writes: list[PendingWrite] = []
        pending = list(range(len(batch)))
        try:
            for i, (tier, policy) in enumerate(zip(self.tiers, self.policies)):
                if not pending:
                    break
                down, cands = [], []
                for j in pending:  # encode outside the lock
                    key, tensor, parent = batch[j]
                    try:
                        prepared = tier.prepare_store(key, tensor)
                    except (CapacityError, CodecError) as exc:
                        # too big for this tier, or its codec refuses the tensor (NaN under int8, a vision feature
                        # under a KV codec): the tiers below may still take it
                        refusals[j].append(exc)
                        down.append(j)
                        continue
                    if not policy.admit(key, prepared.nbytes, parent):
                        self._counters[i].rejected += 1
                        down.append(j)
                        continue
                    cands.append((j, prepared))
                if cands:
                    with self._lock:
                        down += self._store_into(i, cands, batch, results, writes)
                pending = sorted(down)
        finally:
            self._finish_writes(writes)
        for w in writes:
            if w.item is not None and not w.ok:
                results[w.item] = False
        for j, errors in enumerate(refusals):
            if len(errors) == len(self.tiers):
                # no tier can ever hold it: the caller's mistake, named (what the batch stored stays stored)
                tensor = batch[j][1]
                kind = CapacityError if all(isinstance(e, CapacityError) for e in errors) else CodecError
                raise kind(f"entry {tuple(tensor.shape)} {tensor.dtype} fits no tier: "
                           + "; ".join(f"{t.name}: {e}" for t, e in zip(self.tiers, errors)))
        return results

    @staticmethod
    def _checked(item: tuple) -> tuple[CacheKey, torch.Tensor, CacheKey | None]:
        key, tensor, parent = (*item, None) if len(item) == 2 else item
        key = validate_key(key)
        if parent is not None:
            parent = validate_key(parent)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put expects a torch.Tensor, got {type(tensor).__name__}")
        return key, tensor, parent

    def _store_into(self, i: int, cands: list, batch: list, results: list[bool],
                    writes: list[PendingWrite]) -> list[int]:
        """Place the batch's candidates ``(j, prepared)`` in tier ``i`` (lock held). Returns the positions that
        go on to the tier below; an item whose key is being read stays False and goes nowhere."""
        tier, counters = self.tiers[i], self._counters[i]
        down: list[int] = []
        held: list[tuple[int, object]] = []  # to store with held room: bytes copied outside the lock
        for j, prepared in cands:
            key, tensor, parent = batch[j]
            old = self._index.get(key)
            if old is not None and not self._replaceable(key, old):
                # Replacing an entry someone is reading would tear it; keep the old one.
                counters.rejected += 1
                continue
            if not tier.holds_room or (old is not None and old.tier == i and tier.replaces_in_place):
                # a tier that cannot hold room, or a replace in a pooled tier (it reuses the old entry's blocks)
                if self._store_now(i, key, tensor, prepared, parent, old, writes):
                    results[j] = True
                else:
                    counters.rejected += 1
                    down.append(j)
                continue
            held.append((j, prepared))
        if not held:
            return down
        want = min(sum(p.nbytes for _, p in held), tier.capacity_bytes)
        reach = self._room_within_reach(i, want)
        if reach < want:  # the last tier: room only for the head of the batch that can really be placed
            want = 0
            for _, p in held:
                if want + p.nbytes > reach:
                    break
                want += p.nbytes
        self._make_room(i, want, writes)
        room = tier.free_bytes
        if i < len(self.tiers) - 1:
            # newest on top: the longest tail of the batch that fits stays here, the items before it go below
            first = len(held)
            while first and held[first - 1][1].nbytes <= room:
                first -= 1
                room -= held[first][1].nbytes
            refused, held = held[:first], held[first:]
        else:
            # the last tier keeps the batch's head: a chain's later blocks are of no use without it
            last = 0
            while last < len(held) and held[last][1].nbytes <= room:
                room -= held[last][1].nbytes
                last += 1
            held, refused = held[:last], held[last:]
        for j, _ in refused:
            counters.rejected += 1
            down.append(j)
        going = []
        for j, prepared in held:
            # making room may have demoted the old entry of this very key (a queued write: still replaceable)
            old = self._index.get(batch[j][0])
            if old is not None and not self._replaceable(batch[j][0], old):
                counters.rejected += 1
                continue
            going.append((j, prepared, old))
        for (j, prepared, old), res in zip(going, tier.allocate_many([p for _, p, _ in going])):
            key, tensor, parent = batch[j]
            if res is None:  # free_bytes promised the room under this lock
                counters.rejected += 1
                down.append(j)
                continue
            fallback = self._fallback(key, old)
            if old is not None:
                self._call_off(key, old)  # the new value supersedes what a queued write of it would write
                if old.tier != i and (fallback is None or fallback.tier != old.tier):
                    # nothing of it to fall back to there: it goes now (readers get the staged bytes)
                    self._delete_from(old)
            # a replace in the same tier (a disk replace, or of the value a called-off put kept there): the old
            # value stays whole in the tier until the new one's commit
            same = old if old is not None and old.tier == i else fallback if fallback is not None \
                and fallback.tier == i else None
            e = self._index_value(i, key, parent, prepared.nbytes, same, in_flight=1)
            self._announce_store(key, old, i, tensor)
            self._staged[key] = tensor
            w = PendingWrite(key, e, i, tensor, item=j, prepared=prepared, res=res, replaced=fallback)
            if fallback is not None and fallback is not e:
                self._fallbacks[key] = fallback
            writes.append(w)
            if i == len(self.tiers) - 1:
                self._queued[key] = w
            results[j] = True
        return down

    def _fallback(self, key: CacheKey, old: EntryRecord | None) -> EntryRecord | None:
        """The record of the value a put of ``key`` falls back to if its write fails (lock held): ``old`` when
        its bytes are committed in its tier (tiers write aside and publish on success, so they stay whole
        until the new value's commit), or what a still queued put of the key would itself have fallen back
        to. None when the old value's only bytes are a queued demotion's staged copy, or there is none."""
        if old is None:
            return None
        if not old.in_flight:
            return old
        w = self._queued.get(key)
        return w.replaced if w is not None and w.entry is old else None

    def _replaceable(self, key: CacheKey, old: EntryRecord) -> bool:
        """Whether a put may replace ``old`` (lock held): not pinned, not being read or written, except for a
        demotion of it queued and not started, which the put calls off where the new value is placed. Only
        there: a put that goes on to a lower tier (with the lock released in between) or fails must leave the
        old value readable, so nothing is called off before the new one is in."""
        return self._evictable(key)

    def _store_now(self, i: int, key: CacheKey, tensor: torch.Tensor, prepared, parent: CacheKey | None,
                   old: EntryRecord | None, writes: list[PendingWrite]) -> bool:
        """Store under the lock (tiers without held room, and in-place replaces). False if there is no room."""
        tier = self.tiers[i]
        if old is not None:
            self._pin(key)  # keep the old value until the new one is in: a failed put loses nothing
        # A replace in the same tier frees the old entry's bytes as it lands (pooled tiers reuse them).
        same = old if old is not None and old.tier == i else None
        freed = (tier.entry_nbytes(key) or 0) if same is not None else 0
        try:
            need = prepared.nbytes - freed
            stored = (self._room_within_reach(i, need) >= need and self._make_room(i, need, writes)
                      and self._store(i, prepared, same))
        finally:
            if old is not None:
                self._unpin(key)
        if not stored:
            return False
        if old is not None:
            # replaceable was checked under this same lock hold: this succeeds; what a queued put of the key
            # would have fallen back to goes too, unless it is what this store just replaced in place
            kept = self._call_off_with_fallback(key, old, keep_tier=i)
        else:
            kept = None
        if old is not None and old.tier != i:
            self._delete_from(old)
        self._announce_store(key, old, i, tensor)
        self._adopt(self._index_value(i, key, parent, prepared.nbytes, same if same is not None else kept), stored)
        return True

    def _index_value(self, i: int, key: CacheKey, parent: CacheKey | None, nbytes: int, same: EntryRecord | None,
                     in_flight: int = 0) -> EntryRecord:
        """Index a new value of ``key`` in tier ``i`` and tell the tier's policy (lock held). ``same``: the record
        the entry already has in that tier (its own, or the one a called-off put kept there), which it keeps:
        the policy sees a use and keeps the links to the entry's cached children (remove + insert would orphan
        them). Else a new record. ``in_flight``: a write of it still to come."""
        if same is not None:
            self._index[key] = same
            same.parent, same.last_access, same.hits = parent, self._clock(), 0
            same.in_flight += in_flight
            self.policies[i].insert(same, nbytes)
            return same
        rec = self._index[key] = self._record(i, key, parent, in_flight=in_flight)
        self.policies[i].insert(rec, nbytes, self._up(i, parent))
        return rec

    def _announce_store(self, key: CacheKey, old: EntryRecord | None, i: int, tensor: torch.Tensor) -> None:
        """Tell listeners a new value of ``key`` is indexed in tier ``i`` (lock held). A value replacing one in
        another tier is no move of that value: the old one leaves and the new one enters (a node agent would
        count a move down as a demotion, one up as a promotion). A replace in place is no move at all."""
        if old is not None and old.tier != i:
            self._moved(key, old.tier, None)
        if old is None or old.tier != i:
            self._moved(key, None, i, tensor)

    # ------------------------------------------------------------------ load
    def get(self, key: CacheKey, promote: bool | None = None, device: torch.device | str | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.lookup(key, promote=promote, device=device, out=out)[0]

    def lookup(
        self, key: CacheKey, promote: bool | None = None, device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, str | None]:
        """``(tensor, tier name it was found in)`` or ``(None, None)``. Promotes a lower hit to the top.

        ``out``: a tensor of the entry's dtype and shape to read into (returned on a hit) instead of a new one:
        a caller reading many entries reuses one buffer and skips a fresh allocation's page faults per read.
        A mismatched ``out`` raises ``ValueError`` from the tier, nothing moved."""
        key = validate_key(key)
        promote = self.config.promote_on_hit if promote is None else promote
        with self._lock:
            e = self._index.get(key)
            if e is None:
                self._misses += 1
                for policy in self.policies:  # absent from every tier: a miss in each
                    policy.miss(key)
                return None, None
            e.in_flight += 1
            src = e.tier
            staged = self._staged.get(key)
        try:
            # bytes move outside the lock (two-phase load); an entry being written is read from its bytes
            tensor = self._read(e, out) if staged is None else self._copy_staged(src, staged, out)
        except BaseException:
            with self._lock:
                e.in_flight -= 1
            raise
        writes: list[PendingWrite] = []
        # Release the in-flight mark and finish in one critical section: in between, another thread could
        # demote the entry, and a promotion from the stale ``src`` would leave two copies.
        with self._lock:
            e.in_flight -= 1
            current = self._index.get(key) is e and e.tier == src
            if tensor is None:
                # The tier found it corrupt (and removed it) or lost it: a miss, never wrong data. Only an
                # entry still indexed where we read it is forgotten, and through its tier too, so the index
                # and the tiers never disagree about who holds it.
                if current:
                    self._drop(key, e, count_eviction=False)
                self._misses += 1
                tier_name = None
            else:
                e.last_access = self._clock()
                e.hits += 1
                self._counters[src].hits += 1
                tier_name = self.tiers[src].name
                if current:
                    for policy in self.policies[:src]:  # a hit below is a miss in each tier above it
                        policy.miss(key)
                    self.policies[src].hit(e)
                    # Never move an entry another reader is still copying out of ``src`` (its read would find
                    # the bytes gone and report a false miss), nor one being written.
                    if promote and src > 0 and not e.in_flight:
                        self._move(key, e, src, 0, tensor, writes)
        self._finish_writes(writes)
        if tensor is None:
            return None, None
        return (tensor.to(device) if device is not None else tensor), tier_name

    def _copy_staged(self, src: int, staged: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """A reader's copy of an entry whose write is in flight, as the tier would hand it out."""
        if out is not None:
            if tuple(out.shape) != tuple(staged.shape) or out.dtype != staged.dtype:
                raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, "
                                 f"entry is {staged.dtype} {tuple(staged.shape)}")
            return out.copy_(staged)
        device = getattr(self.tiers[src], "device", None) or torch.device("cpu")
        return staged.detach().to(device, copy=True)

    def touch(self, key: CacheKey) -> bool:
        """Record a hit served without copying through the cache (e.g. the Ray agent hands out an object-store
        reference): the entry's policy and idle clock see the access. False if absent."""
        key = validate_key(key)
        with self._lock:
            e = self._index.get(key)
            if e is None:
                return False
            e.last_access = self._clock()
            e.hits += 1
            self._counters[e.tier].hits += 1
            self.policies[e.tier].hit(e)
            return True

    def get_many(self, keys: Sequence[CacheKey], promote: bool | None = None) -> list[torch.Tensor | None]:
        return [self.get(k, promote=promote) for k in keys]

    def prefetch(self, keys: Sequence[CacheKey]) -> Future:
        """Bring entries to the top tier without blocking the caller. The future yields how many moved."""
        keys = [validate_key(k) for k in keys]
        if self._prefetch_pool is None:
            fut: Future = Future()
            fut.set_result(self._promote_all(keys))
            return fut
        return self._prefetch_pool.submit(self._promote_all, keys)

    def _promote_all(self, keys: Sequence[CacheKey]) -> int:
        moved = 0
        for k in keys:
            e = self._index.get(k)
            if e is not None and e.tier > 0 and self.get(k, promote=True) is not None:
                moved += 1
        return moved

    # ------------------------------------------------------------------ lifecycle of entries
    def remove(self, key: CacheKey) -> bool:
        key = validate_key(key)
        with self._lock:
            e = self._index.get(key)
            if e is None:
                return False
            if e.in_flight:
                return False  # being read or written; the reader's copy stays valid, try again later
            self._drop(key, e, count_eviction=False)
        self._finish_writes([])
        return True

    def remove_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return [self.remove(k) for k in keys]

    def pin(self, key: CacheKey) -> bool:
        """Protect ``key`` from eviction and demotion until ``unpin``. False if absent."""
        with self._lock:
            key = validate_key(key)
            if key not in self._index:
                return False
            self._pin(key)
            return True

    def unpin(self, key: CacheKey) -> bool:
        with self._lock:
            key = validate_key(key)
            if key not in self._index or key not in self._pins:
                return False
            self._unpin(key)
            return True

    def _pin(self, key: CacheKey) -> None:
        """One more pin on ``key`` (lock held): never a victim while pinned. Pins are by key, so they hold across
        the entry's moves, and few keys are pinned at once: a small dict, not a field in every record."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def _unpin(self, key: CacheKey) -> None:
        n = self._pins.get(key, 0)
        if n > 1:
            self._pins[key] = n - 1
        else:
            self._pins.pop(key, None)

    @contextmanager
    def pinned(self, keys: Iterable[CacheKey]):
        held = [k for k in keys if self.pin(k)]
        try:
            yield held
        finally:
            for k in held:
                self.unpin(k)

    def demote(self, key: CacheKey) -> bool:
        """Move ``key`` one tier down, or further if that tier cannot make room (out of the cache from the last
        tier, or when no tier below can take it). False if pinned/absent."""
        key = validate_key(key)
        writes: list[PendingWrite] = []
        with self._lock:
            e = self._index.get(key)
            if e is None or key in self._pins or e.in_flight:
                return False
            self._evict_one(key, e, writes)
        self._finish_writes(writes)
        return True

    def victims(self, tier_name: str, nbytes: int, skip: Container[CacheKey] = ()) -> list[CacheKey]:
        """The entries of the first tier named ``tier_name`` that its policy would move out first to free
        ``nbytes`` (evictable ones, less ``skip``), in that order; nothing moves. A caller that moves them out
        of the store itself (the device budget handing a Ray worker's entries to its node agent) asks here so
        the order is the policy's, the same as the store's own evictions."""
        i = self._tier_index(tier_name)
        with self._lock:
            return self._dry_walk(i, nbytes, skip)[0]

    def relieve(self, tier_name: str, target_bytes: int) -> int:
        """Demote victims of the first tier named ``tier_name`` until it uses <= ``target_bytes``.
        Returns bytes freed. The pressure monitor calls this above a high watermark."""
        i = self._tier_index(tier_name)
        tier = self.tiers[i]
        writes: list[PendingWrite] = []
        with self._lock:
            before = tier.used_bytes
            self._make_room(i, max(0, tier.capacity_bytes - max(0, target_bytes)), writes)
            freed = before - tier.used_bytes
        self._finish_writes(writes)
        return freed

    def expire_idle(self, ttl_s: float | None = None, now: float | None = None) -> int:
        """Drop entries idle for longer than ``ttl_s`` (default ``config.idle_ttl_s``). Returns how many."""
        ttl = self.config.idle_ttl_s if ttl_s is None else ttl_s
        if ttl is None:
            return 0
        now = time.monotonic() if now is None else now
        n = 0
        with self._lock:
            for key, e in list(self._index.items()):
                if now - e.last_access > ttl and key not in self._pins and not e.in_flight:
                    self._drop(key, e, count_eviction=False)
                    self._expired += 1
                    n += 1
        self._finish_writes([])
        return n

    def close(self) -> None:
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=True)
        for t in self.tiers:
            t.close()

    def __enter__(self) -> "TieredCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        with self._lock:
            tiers = []
            for t, c, p in zip(self.tiers, self._counters, self.policies):
                s = dict(t.stats())
                s.update(
                    name=t.name,
                    capacity_bytes=t.capacity_bytes,
                    used_bytes=t.used_bytes,
                    entries=sum(1 for e in self._index.values() if self.tiers[e.tier] is t),
                    hits=c.hits,
                    promotions_in=c.promotions_in,
                    demotions_in=c.demotions_in,
                    evictions=c.evictions,
                    rejected=c.rejected,
                    policy=getattr(p, "name", type(p).__name__),
                )
                tiers.append(s)
            hits = sum(c.hits for c in self._counters)
            lookups = hits + self._misses
            return {
                "namespace": self.config.namespace.hex,
                "entries": len(self._index),
                "hits": hits,
                "misses": self._misses,
                "hit_ratio": hits / lookups if lookups else 0.0,
                "dropped": self._dropped,
                "expired": self._expired,
                "pinned": len(self._pins),
                "tiers": tiers,
            }

    # ------------------------------------------------------------------ internals (lock held)
    def _tier_index(self, name: str) -> int:
        for i, t in enumerate(self.tiers):
            if t.name == name:
                return i
        raise ConfigError(f"unknown tier {name!r}; this cache has: {', '.join(self.tier_names)}")

    def _current(self, rec: EntryRecord, i: int) -> bool:
        """Whether ``rec`` is its key's current record, in tier ``i`` (a policy also holds, for a while, the
        record of a value a put keeps to fall back to, which is no victim: it goes with the put's outcome)."""
        return self._index.get(rec.key) is rec and rec.tier == i

    def _evictable(self, key: CacheKey) -> bool:
        e = self._index.get(key)
        if e is None or key in self._pins:
            return False
        # in flight only for a write into the last tier that has not started (nobody reads it): evicting it
        # cancels the write, which is what the policy would do to it a moment later
        return not e.in_flight or (e.in_flight == 1 and key in self._queued)

    def _room_within_reach(self, i: int, nbytes: int) -> int:
        """How much of ``nbytes`` tier ``i`` can have free (lock held): all of it above the last tier, whose
        victims move down; in the last tier, whose victims leave the cache, what its free bytes and evictable
        entries (a dry walk of its policy's order, stopped once ``nbytes`` is reached) add up to. Room is only
        made for what will be stored: evicting for a put that is then refused anyway would lose entries for
        nothing (``put``: nothing already stored is lost by a failed put).

        Estimates: a tier whose freed bytes lag its entries' (the Ray object-store tier returns a slab's memory
        when it is compacted) can be over-counted, and then evicts as before this check; a queued replace counts
        only its held room, not the old file its eviction also frees."""
        short = nbytes - self.tiers[i].free_bytes
        if short <= 0 or i < len(self.tiers) - 1:
            return nbytes
        return nbytes - max(0, short - self._dry_walk(i, short, ())[1])

    def _dry_walk(self, i: int, nbytes: int, skip: Container[CacheKey]) -> tuple[list[CacheKey], int]:
        """(the evictable entries of tier ``i`` less ``skip``, in its policy's order, until they hold
        ``nbytes``; the bytes they hold) without moving anything (lock held).

        Cost: when more must go than the tier's leaves hold, the prefix policies' walk goes on to their sorted
        interior entries (O(n log n), under the lock; a chain per conversation keeps leaves plentiful)."""
        tier = self.tiers[i]
        keys: list[CacheKey] = []
        counted: set[CacheKey] = set()
        held = 0

        def fresh(rec: EntryRecord) -> bool:
            key = rec.key
            return key not in counted and key not in skip and self._current(rec, i) and self._evictable(key)

        if nbytes <= 0:
            return keys, held
        walk = iter(self.policies[i].walk(fresh))
        try:
            for rec in walk:
                key = rec.key
                counted.add(key)
                keys.append(key)
                w = self._queued.get(key)  # a write not started: evicting it gives back the room held for it
                held += (w.prepared.nbytes if w is not None and w.res is not None else tier.entry_nbytes(key)) or 0
                if held >= nbytes:
                    break
            return keys, held
        finally:
            close = getattr(walk, "close", None)
            if close is not None:
                close()

    def _make_room(self, i: int, nbytes: int, writes: list[PendingWrite]) -> bool:
        """Demote tier ``i``'s victims until ``nbytes`` fit. False if pinned/in-flight entries prevent it.
        Victims bound for the disk tier are queued in ``writes`` (the caller writes them after the lock)."""
        tier = self.tiers[i]
        dead = 0  # bytes of this call's victims the tier may still count (see Tier.reclaim)
        while tier.free_bytes < nbytes:
            if dead >= nbytes - tier.free_bytes and tier.reclaim():
                dead = 0
                continue
            victim = self._next_victim(i)
            if victim is None:
                return bool(tier.reclaim()) and tier.free_bytes >= nbytes  # only pinned / in-flight entries left
            dead += tier.entry_nbytes(victim) or 0
            self._evict_one(victim, self._index[victim], writes)
        return True

    def _next_victim(self, i: int) -> CacheKey | None:
        """The policy's first evictable entry of tier ``i``. One per walk: an eviction changes the order (a
        parent becomes a leaf), so a list taken before several evictions would break leaf-first order; and the
        walk ends before anything is evicted, so the policy's structure is never mutated under it."""
        walk = iter(self.policies[i].walk(lambda rec: self._current(rec, i) and self._evictable(rec.key)))
        try:
            for rec in walk:
                if self._current(rec, i) and self._evictable(rec.key):
                    return rec.key
            return None
        finally:
            close = getattr(walk, "close", None)  # a generator puts back what it set aside (prefix policies)
            if close is not None:
                close()

    def _evict_one(self, key: CacheKey, e: EntryRecord, writes: list[PendingWrite]) -> None:
        """Demote ``key`` to the nearest tier below that takes it; drop it only if none does (or from the last).

        The next tier down may be unable to take it: its entries all pinned or being read (e.g. a prompt
        longer than the host tier, pinned while it loads, whose promotions push other entries out of the
        device tier), or its codec refuses the tensor. The victim then skips that tier instead of being lost
        while a tier below has room."""
        src = e.tier
        if src + 1 < len(self.tiers):
            tensor = self._read(e)
            if tensor is not None:
                for dst in range(src + 1, len(self.tiers)):
                    if self._writes_later(dst):
                        self._stage_demotion(key, e, src, dst, tensor, writes)
                        return
                    if self._move(key, e, src, dst, tensor, writes):
                        return
        self._drop(key, e, count_eviction=True)

    def _writes_later(self, dst: int) -> bool:
        """Victims bound for ``dst`` are written after the lock is released: a slow tier that holds room, and
        the last one (a write that fails there has nowhere further to go, so the victim is dropped then, as
        it would have been now)."""
        tier = self.tiers[dst]
        return tier.slow_writes and tier.holds_room and dst == len(self.tiers) - 1

    def _stage_demotion(self, key: CacheKey, e: EntryRecord, src: int, dst: int, tensor: torch.Tensor,
                        writes: list[PendingWrite]) -> None:
        """Free the victim's room in ``src`` now (its bytes are in ``tensor``) and queue its write into ``dst``."""
        self._free(e)
        self.policies[src].demote(e)
        # ``dst``'s policy hears the arrival now, as the index places the entry there: a write called off or
        # failed later is a departure of a key it holds, and when room is made for it the victim is one of the
        # candidates (nbytes: the raw tensor's; the victim is encoded later)
        e = self._rehome(e, dst)
        self.policies[dst].insert(e, tensor.numel() * tensor.element_size(), self._up(dst, e.parent))
        self._moved(key, src, dst, tensor)
        e.in_flight += 1
        self._staged[key] = tensor
        w = PendingWrite(key, e, dst, tensor, src=src)
        writes.append(w)
        self._queued[key] = w

    def _rehome(self, e: EntryRecord, dst: int) -> EntryRecord:
        """A new record for ``e``'s entry in tier ``dst`` (its stay there), with what the store knows of it; the
        index points at it from now on. Never for an entry being read or written (never moved then)."""
        rec = self._record(dst, e.key, e.parent)
        rec.last_access, rec.hits = e.last_access, e.hits
        self._index[e.key] = rec
        return rec

    def _move(self, key: CacheKey, e: EntryRecord, src: int, dst: int, tensor: torch.Tensor,
              writes: list[PendingWrite]) -> bool:
        """Copy ``tensor`` into tier ``dst`` (making room there), then release it from ``src``."""
        try:
            prepared = self.tiers[dst].prepare_store(key, tensor)
        except (CapacityError, CodecError) as exc:
            # Too big for that tier, or its codec refuses this tensor (a KV-layout codec and a vision
            # feature; NaN under int8): the entry cannot move there, which must not fail the caller's put.
            log.debug("entry %s cannot move to tier %s: %s", key.hex()[:8], self.tiers[dst].name, exc)
            return False
        # Pin while we make room below so the recursive demotions cannot pick this very entry.
        self._pin(key)
        try:
            placed = (self._room_within_reach(dst, prepared.nbytes) >= prepared.nbytes
                      and self._make_room(dst, prepared.nbytes, writes) and self._store(dst, prepared, None))
            if not placed:
                return False
        finally:
            self._unpin(key)
        self._free(e)
        if dst < src:
            self.policies[src].promote(e)
        else:
            self.policies[src].demote(e)
        e = self._rehome(e, dst)
        self._adopt(e, placed)
        self._moved(key, src, dst, tensor)
        self.policies[dst].insert(e, prepared.nbytes, self._up(dst, e.parent))
        c = self._counters[dst]
        if dst < src:
            c.promotions_in += 1
        else:
            c.demotions_in += 1
        return True

    def _drop(self, key: CacheKey, e: EntryRecord, count_eviction: bool) -> None:
        # evicted before its write started: the write is called off, and the value it would have fallen back
        # to goes with the key (in its own tier here, or below)
        self._call_off_with_fallback(key, e, keep_tier=e.tier)
        self._free(e)
        self._forget(key, e, evicted=count_eviction)
        if count_eviction:
            self._counters[e.tier].evictions += 1
            self._dropped += 1

    def _delete_from(self, rec: EntryRecord) -> None:
        """Take the bytes of ``rec``'s stay out of its tier and tell its policy, for a reason not its own
        (``delete``): a value superseded there, or a fallback no longer needed (lock held; the index is the
        caller's)."""
        self._free(rec)
        self.policies[rec.tier].delete(rec)

    def _call_off_with_fallback(self, key: CacheKey, e: EntryRecord, keep_tier: int) -> EntryRecord | None:
        """``_call_off``, and if that cancels a put that had kept the key's earlier value in another tier than
        ``keep_tier`` (``_fallback``), that value is discarded there too: nothing will fall back to it. Returns
        such a value kept in ``keep_tier`` itself (the caller's to take back), else None."""
        w = self._queued.get(key)
        self._call_off(key, e)
        old = w.replaced if w is not None and w.cancelled else None
        if old is not None and old.tier != keep_tier:
            self._delete_from(old)
            return None
        return old

    def _call_off(self, key: CacheKey, e: EntryRecord) -> bool:
        """Cancel ``key``'s queued write into the last tier if it has not started (lock held). True if the
        entry is then free of it: no write, or one called off."""
        w = self._queued.get(key)
        if w is None or w.entry is not e:
            return True
        if e.in_flight != 1:
            return False  # someone reads its staged bytes
        del self._queued[key]
        w.cancelled = True
        if w.replaced is not None and self._fallbacks.get(key) is w.replaced:
            del self._fallbacks[key]  # the caller settles what becomes of it
        if w.res is not None:
            self.tiers[w.dst].abort(w.res)
            w.res = None
        e.in_flight -= 1
        if self._staged.get(key) is w.tensor:
            del self._staged[key]
        return True

    def _forget(self, key: CacheKey, e: EntryRecord, evicted: bool) -> None:
        """Unindex ``key``; its tier's policy hears an eviction (room-making dropped it) or a delete."""
        if evicted:
            self.policies[e.tier].evict(e)
        else:
            self.policies[e.tier].delete(e)
        del self._index[key]
        self._pins.pop(key, None)  # a pinned entry that leaves (``remove``) takes its pins with it
        self._moved(key, e.tier, None)

    # ------------------------------------------------------------------ writes (lock released)
    def _finish_writes(self, writes: list[PendingWrite]) -> None:
        """Run queued writes in rounds, holding the lock only between them: encode victims, hold room for them,
        write every entry, publish or give up. Then make this call's discards durable. Lock not held."""
        try:
            if writes:
                self._write_rounds(writes)
        finally:
            for tier in self.tiers:
                tier.sync()

    def _write_rounds(self, writes: list[PendingWrite]) -> None:
        try:
            for w in writes:  # a victim's encode for its new tier (a codec may take a while)
                if w.prepared is None:
                    try:
                        w.prepared = self.tiers[w.dst].prepare_store(w.key, w.tensor)
                    except (CapacityError, CodecError) as exc:
                        log.debug("entry %s cannot move to tier %s: %s", w.key.hex()[:8], self.tiers[w.dst].name, exc)
            with self._lock:
                for w in writes:
                    if w.res is None and w.prepared is not None and not w.cancelled:
                        self._hold_room(w)
                # from here on the writes run: none of them can be called off any more
                for w in writes:
                    if self._queued.get(w.key) is w:
                        del self._queued[w.key]
            # the bytes: memcpys, file writes and fsyncs, one batch per tier (a tier may move a batch at once:
            # the Ray object-store tier puts it as one object)
            for i, tier in enumerate(self.tiers):
                going = [w for w in writes if w.dst == i and w.res is not None and not w.cancelled]
                if going:
                    for w, ok in zip(going, tier.write_many([w.res for w in going])):
                        w.ok = ok  # recorded as each lands: an exception later still commits what was written
        finally:
            with self._lock:
                for i, tier in enumerate(self.tiers):
                    done = [w for w in writes if w.ok and w.dst == i]
                    if done and tier.addressed:  # the location goes into the entry's record
                        tier.commit_into([(w.res, w.entry) for w in done])
                    elif done:
                        tier.commit_many([w.res for w in done])
                for w in writes:
                    if not w.cancelled:
                        self._finish(w)

    def _hold_room(self, w: PendingWrite) -> None:
        """Room in ``w.dst`` for a victim (lock held). The destination is the last tier: its victims leave
        the cache, so making room there queues no further writes. Its policy has held the victim since it was
        staged and may give the victim itself up first (a chain's tail whose parent would have to go for it):
        its write is then called off instead of making room."""
        more: list[PendingWrite] = []
        tier = self.tiers[w.dst]
        if self._room_within_reach(w.dst, w.prepared.nbytes) < w.prepared.nbytes:
            return  # only pinned / in-flight entries in the way: the victim is not written (``_finish``)
        while tier.free_bytes < w.prepared.nbytes and not w.cancelled:
            victim = self._next_victim(w.dst)
            if victim is None:
                break  # only pinned / in-flight entries left: the victim is not written (``_finish``)
            self._evict_one(victim, self._index[victim], more)
        if not w.cancelled and tier.free_bytes >= w.prepared.nbytes:
            w.res = tier.allocate(w.prepared)
        assert not more, "victims of the last tier are dropped, never moved"

    def _finish(self, w: PendingWrite) -> None:
        """Count a written (and committed) entry, or let it go (lock held)."""
        e, tier = w.entry, self.tiers[w.dst]
        if self._queued.get(w.key) is w:  # the rounds stopped early (an exception)
            del self._queued[w.key]
        e.in_flight -= 1
        if self._staged.get(w.key) is w.tensor:
            del self._staged[w.key]
        old = w.replaced
        if old is not None and self._fallbacks.get(w.key) is old:
            del self._fallbacks[w.key]  # settled below: deleted on success, back in the index on failure
        if w.ok:  # committed by the caller, one batch per tier
            if w.src is not None:
                self._counters[w.dst].demotions_in += 1
            if old is not None and old.tier != w.dst and self._index.get(w.key) is not old:
                # the value it replaced, kept in another tier until now
                self._delete_from(old)
            return
        if w.res is not None and w.ok is None:
            tier.abort(w.res)  # room held but never written (an exception stopped the rounds)
        if old is not None and self._index.get(w.key) is e:
            # a failed replace: the old value is still whole where it was, so it stays (the put returns False);
            # a replace in its own tier kept its record all along
            if old is not e:
                self._index[w.key] = old
                if old.tier != w.dst:
                    self._delete_from(e)
                    self._moved(w.key, w.dst, old.tier)
            self._counters[w.dst].rejected += 1
            return
        # Its bytes are nowhere but in the staged tensor: the entry leaves the cache. A victim's loss is an
        # eviction from the last tier (it could not keep it); a put's is its False result.
        if self._index.get(w.key) is e:
            self._free(e)  # whatever the tier may hold of it goes with it
            self._forget(w.key, e, evicted=w.src is not None)
            if w.src is not None:
                self._counters[w.dst].evictions += 1
                self._dropped += 1
            else:
                self._counters[w.dst].rejected += 1
