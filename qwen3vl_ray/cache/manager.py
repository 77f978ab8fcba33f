"""The tier manager: the metadata side of the tiered cache (vLLM's offloading manager, ``vllm/v1/kv_offload``).

It keeps one record per entry (``policies.record.EntryRecord``: tier, chain parent, location in a pooled tier,
recency, hits, in-flight count, plus its tier's policy's fields), the pins, the tiers' policies and counters,
and plans every move: where an entry goes, which victims make room and where they go, what room is held. All
of it under one lock, and none of it copies an entry's bytes: the plans are ``PendingWrite`` records the data
movers (``movers.DataMovers``) carry out outside the lock, handing each metadata step back through the
manager's hooks (``sources_read``, ``rooms_held``, ``writes_done``). ``TieredCache`` is the facade that
encodes, reads and runs the movers around the manager's calls.

Exclusive hierarchy: an entry lives in exactly one tier at a time, so every byte budget counts each entry
once and ``where(key)`` has one answer. A hit below the top is promoted (moved up); making room in a tier
demotes its victims one tier down (further down when that tier cannot make room: its entries are pinned or
being read, or its codec refuses the tensor), and out of the last tier they are dropped.

A move is planned at once: the entry is indexed where it goes, in flight, and its bytes stay where they were
until the movers have copied them (a victim's old record, the write's ``source``, holds its old room until
they read it out; a promotion keeps the value below as its fallback until its copy commits). An entry that is
pinned or in flight is never chosen as a victim, and a victim's old room is freed only after the last read of
it, so a slot is never reused while someone reads or writes it. Readers of an entry on its way are served from
the copy being written or from where its bytes still are.

Two plans are carried out under the lock, by design: a replace of a key in the pooled tier that holds it (it
reuses the old value's blocks, ``_store_now``) and a move into a tier that cannot hold room (``_move``); their
victims are read out at once (``now``), as are victims leaving a tier that is not addressed storage (the Ray
object-store host tier).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Container, Iterable, Iterator, NamedTuple, Sequence

import torch

from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.cache.pending import PendingWrite
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import CacheKey, validate_key
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.policies.record import EntryRecord
from qwen3vl_ray.tiers.base import Placement, Tier

log = logging.getLogger(__name__)

#: rounds a write waits for room being vacated in its tier (victims read out in the next round; another
#: thread may take the room meanwhile, and more victims are staged) before it gives up (a put or a victim then
#: goes on down, a promotion leaves the entry where it was)
ROOM_WAITS = 8
#: seconds a write waits (the lock released) for readers still copying victims' bytes out of the room it needs:
#: a copy out of a tier takes milliseconds, so this only bounds a reader that is stuck
READER_WAIT_S = 2.0

#: ``listener(key, src, dst, nbytes)``: the index moved ``key`` from tier ``src`` to tier ``dst`` (positions in
#: ``TieredCache.tiers``); ``src`` None: it entered the cache, ``dst`` None: it left it; ``nbytes``: the bytes of
#: the tensor that moved (None where the move carries none: a drop, a failed replace's undo, which moves the key
#: back where its old value still is). A replace in place is no move; a new value stored in another tier than the
#: old one is two: the old value leaves, the new one enters (it is no demotion or promotion). Called under the
#: cache's lock, in the order the moves happen: a listener only records (a node agent journals them for the
#: cluster's directory and counts its swaps) and never calls back into the cache.
EntryListener = Callable[[CacheKey, "int | None", "int | None", "int | None"], None]


class EntryInfo(NamedTuple):
    """What the store knows of one entry's use (``TierManager.entry_info``)."""

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


class Load(NamedTuple):
    """A read in progress (``TierManager.begin_load``): the entry is marked in flight until ``end_load`` or
    ``abort_load``."""

    record: EntryRecord  # the entry's record (its tier's)
    tier: int  # where it is indexed
    staged: torch.Tensor | None  # the bytes being written there, if a write is in flight: read these
    source: EntryRecord | None  # else a victim's record where its bytes still are (held for this read)


class TierManager:
    """The metadata side of ``TieredCache`` (see the module docstring). Its public methods take its lock;
    the facade calls them around the byte work, and the movers call its hooks.

    Args:
        config: tiers, policy and namespace (the namespace and idle TTL are read here).
        tiers: the tier objects, top first (storage: the manager asks them for room and locations).
        policies: one policy per tier.
    """

    def __init__(self, config: CacheConfig, tiers: Sequence[Tier], policies: Sequence[EvictionPolicy]) -> None:
        self.config = config
        self.tiers: list[Tier] = list(tiers)
        self.policies: list[EvictionPolicy] = list(policies)
        if len(self.policies) != len(self.tiers):
            raise ConfigError(f"{len(self.policies)} policies given for {len(self.tiers)} tiers")
        self._lock = threading.RLock()
        self._freed = threading.Condition(self._lock)  # a victim's old room freed by its last reader
        self._clock = _CoarseClock()
        # key -> the record of the entry's current stay (a record of the tier's policy's ``record_type``, which
        # holds the policy's fields too: one record per entry for store and policy)
        self._index: dict[CacheKey, EntryRecord] = {}
        self._pins: dict[CacheKey, int] = {}  # pinned keys -> pin count (``pin``; transient pins while moving)
        self._staged: dict[CacheKey, torch.Tensor] = {}  # bytes of entries whose write is in flight (few at a time)
        # victims whose bytes are still in the tier they leave, to be read out by the write rounds (their
        # ``source``), and sources the rounds are done with that a reader still reads (its last read frees them)
        self._unread: dict[CacheKey, PendingWrite] = {}
        self._retired: dict[int, EntryRecord] = {}
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

    def read(self, rec: EntryRecord, out: torch.Tensor | None = None) -> torch.Tensor | None:
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

    def _release_source(self, source: EntryRecord) -> None:
        """Drop one hold on a demoted victim's bytes in the tier it left (lock held): a reader's, or the write
        rounds' once they have read them out (``_retire``). The last hold after the rounds' frees them."""
        source.in_flight -= 1
        if not source.in_flight and self._retired.pop(id(source), None) is source:
            self._free(source)
            self._freed.notify_all()

    def _wait_for_readers(self, i: int, nbytes: int) -> None:
        """Wait, the lock released, while readers still hold victims' old room in tier ``i`` that ``nbytes``
        needs (lock held; at most ``READER_WAIT_S``): the movers are done with that room, and freeing it is
        only a reader's memcpy away."""
        tier, deadline = self.tiers[i], time.monotonic() + READER_WAIT_S
        while tier.free_bytes < nbytes:
            if not any(r.tier == i for r in self._retired.values()):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._freed.wait(left)

    def _retire(self, w: PendingWrite) -> None:
        """The write rounds are done with ``w``'s source (read out, or never to be): it is freed now, or by its
        last reader (lock held)."""
        source, w.source = w.source, None
        if self._unread.get(w.key) is w:
            del self._unread[w.key]
        if source is not None:
            self._retired[id(source)] = source
            self._release_source(source)

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

    def _moved(self, key: CacheKey, src: int | None, dst: int | None, tensor: torch.Tensor | None = None,
               nbytes: int | None = None) -> None:
        if tensor is not None:
            nbytes = tensor.numel() * tensor.element_size()
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


    # ------------------------------------------------------------------ the facade's calls (each takes the lock)
    def tier_of(self, key: CacheKey) -> int | None:
        """The position of the tier ``key`` is indexed in, or None if absent."""
        e = self._index.get(key)
        return None if e is None else e.tier

    def count_rejected(self, i: int) -> None:
        """A store tier ``i``'s policy would not admit."""
        with self._lock:
            self._counters[i].rejected += 1

    def plan_store(self, i: int, cands: list, batch: list, results: list[bool],
                   writes: list[PendingWrite]) -> list[int]:
        """Plan a batch's candidates ``(j, prepared)``, encoded for tier ``i``, into it (``_store_into``): each is
        indexed in flight with its room held (or held by the movers once victims are read out), its write
        queued in ``writes``; returns the positions that go on to the tier below."""
        with self._lock:
            return self._store_into(i, cands, batch, results, writes)

    def begin_load(self, key: CacheKey) -> Load | None:
        """Mark ``key`` in flight for a read and say where its bytes are; None on a miss (counted: a miss in
        every tier's policy)."""
        with self._lock:
            e = self._index.get(key)
            if e is None:
                self._misses += 1
                for policy in self.policies:  # absent from every tier: a miss in each
                    policy.miss(key)
                return None
            e.in_flight += 1
            staged = self._staged.get(key)
            # a victim whose bytes the movers have not read out yet is read where they still are
            source = u.source if staged is None and (u := self._unread.get(key)) is not None else None
            if source is not None:
                source.in_flight += 1
            return Load(e, e.tier, staged, source)

    def abort_load(self, load: Load) -> None:
        """Release a read that failed with an exception."""
        with self._lock:
            load.record.in_flight -= 1
            if load.source is not None:
                self._release_source(load.source)

    def end_load(self, key: CacheKey, load: Load, tensor: torch.Tensor | None, promote: bool, prepared,
                 writes: list[PendingWrite]) -> str | None:
        """Finish a read: count the hit (the tier name returned) or, where the tier lost the bytes or found them
        corrupt (``tensor`` None), forget the entry and count a miss (None). ``promote``: stage a hit below the
        top for the top tier, ``prepared`` being its bytes encoded for it (None: none was, it cannot go there).
        Releasing the in-flight mark and promoting are one critical section: in between, another thread
        could demote the entry, and a promotion from the stale tier would leave two copies."""
        e, src, source = load.record, load.tier, load.source
        with self._lock:
            e.in_flight -= 1
            if source is not None:
                self._release_source(source)
            current = self._index.get(key) is e and e.tier == src and source is None
            if tensor is None:
                # Only an entry still indexed where we read it is forgotten, and through its tier too, so the
                # index and the tiers never disagree about who holds it: a miss, never wrong data.
                if current:
                    self._drop(key, e, count_eviction=False)
                self._misses += 1
                return None
            e.last_access = self._clock()
            e.hits += 1
            self._counters[src].hits += 1
            if current:
                for policy in self.policies[:src]:  # a hit below is a miss in each tier above it
                    policy.miss(key)
                self.policies[src].hit(e)
                # Never move an entry another reader is still copying out of ``src`` (its read would find
                # the bytes gone and report a false miss), nor one being written.
                if promote and src > 0 and not e.in_flight:
                    if prepared is not None:
                        self._stage_promotion(key, e, src, tensor, prepared, writes)
                    elif not self.tiers[0].holds_room:
                        self._move(key, e, src, 0, tensor, writes)
            return self.tiers[src].name

    def remove_entry(self, key: CacheKey) -> bool:
        """Forget ``key`` and free its bytes (durable at the tiers' next ``sync``). False if absent, or being
        read or written (the reader's copy stays valid; try again later)."""
        with self._lock:
            e = self._index.get(key)
            if e is None or e.in_flight:
                return False
            self._drop(key, e, count_eviction=False)
            return True

    def plan_demote(self, key: CacheKey, writes: list[PendingWrite]) -> bool:
        """Plan ``key``'s move one tier down, or further (``_evict_one``). False if absent, pinned or in flight."""
        with self._lock:
            e = self._index.get(key)
            if e is None or key in self._pins or e.in_flight:
                return False
            self._evict_one(key, e, writes)
            return True

    def plan_relieve(self, i: int, target_bytes: int, writes: list[PendingWrite]) -> int:
        """Plan moving tier ``i``'s victims down until it uses <= ``target_bytes``; its use before."""
        tier = self.tiers[i]
        with self._lock:
            before = tier.used_bytes
            self._make_room(i, max(0, tier.capacity_bytes - max(0, target_bytes)), writes)
            return before

    def expire(self, ttl: float, now: float) -> int:
        """Drop the entries idle for longer than ``ttl`` at ``now`` (neither pinned nor in flight); how many."""
        n = 0
        with self._lock:
            for key, e in list(self._index.items()):
                if now - e.last_access > ttl and key not in self._pins and not e.in_flight:
                    self._drop(key, e, count_eviction=False)
                    self._expired += 1
                    n += 1
        return n

    # ------------------------------------------------------------------ store plans (lock held)
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
        vacating = self._make_room(i, want, writes)[1]
        room = tier.free_bytes + vacating  # what is free once the victims are read out
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
            fallback = self._fallback(key, old)
            if res is None and old is not None and fallback is None:
                # its room is still being vacated (held in the write rounds), but the value it replaces has no
                # bytes of its own to fall back to should that fail (a queued demotion's staged copy): it goes
                # on to the tier below, as where there is no room
                counters.rejected += 1
                down.append(j)
                continue
            # res None: its room is still being vacated (victims read out in the write rounds, which hold it then)
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
            stored = (self._room_within_reach(i, need) >= need and self._make_room(i, need, writes, now=True)[0]
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

    # ------------------------------------------------------------------ uses, pins
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

    def victims(self, tier_name: str, nbytes: int, skip: Container[CacheKey] = ()) -> list[CacheKey]:
        """The entries of the first tier named ``tier_name`` that its policy would move out first to free
        ``nbytes`` (evictable ones, less ``skip``), in that order; nothing moves. A caller that moves them out
        of the store itself (the device budget handing a Ray worker's entries to its node agent) asks here so
        the order is the policy's, the same as the store's own evictions."""
        i = self.tier_index(tier_name)
        with self._lock:
            return self._dry_walk(i, nbytes, skip)[0]

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
    def tier_index(self, name: str) -> int:
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

    def _make_room(self, i: int, nbytes: int, writes: list[PendingWrite], now: bool = False) -> tuple[bool, int]:
        """Demote tier ``i``'s victims until ``nbytes`` fit: (whether they do: False if pinned/in-flight entries
        prevent it; how many bytes of this call's victims are still being vacated). Victims whose bytes are
        read out of the tier in the write rounds (``_stage_demotion``) keep their room until then, so the
        caller holds its room there (a put's, a promotion's) once a round has released them. ``now``: victims
        are read out now, under the lock, and their room is free on return (for a caller that stores under
        the lock). Victims' writes are queued in ``writes`` (the caller runs them after the lock)."""
        tier = self.tiers[i]
        dead = 0  # bytes of this call's victims the tier may still count (see Tier.reclaim)
        vacating = 0  # bytes of this call's victims still to be read out
        while tier.free_bytes + vacating < nbytes:
            if dead >= nbytes - tier.free_bytes - vacating and tier.reclaim():
                dead = 0
                continue
            victim = self._next_victim(i)
            if victim is None:  # only pinned / in-flight entries left
                return bool(tier.reclaim()) and tier.free_bytes + vacating >= nbytes, vacating
            held = tier.entry_nbytes(victim) or 0
            if self._evict_one(victim, self._index[victim], writes, now=now):
                vacating += held
            else:
                dead += held
        return True, vacating

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

    def _evict_one(self, key: CacheKey, e: EntryRecord, writes: list[PendingWrite], now: bool = False) -> bool:
        """Demote ``key`` to the nearest tier below that takes it; drop it only if none does (or from the last).

        The next tier down may be unable to take it: its entries all pinned or being read (e.g. a prompt
        longer than the host tier, pinned while it loads, whose promotions push other entries out of the
        device tier), or its codec refuses the tensor. The victim then skips that tier instead of being lost
        while a tier below has room.

        True when the victim's room is still being vacated: its bytes stay in ``src`` until the write rounds
        read them out, outside the lock (an addressed tier's victim, unless ``now``); the room is free on
        return otherwise."""
        src = e.tier
        if src + 1 < len(self.tiers):
            later = not now and self.tiers[src].addressed
            tensor = None if later else self.read(e)
            if later or tensor is not None:
                for dst in range(src + 1, len(self.tiers)):
                    if self.tiers[dst].holds_room:
                        # read (where ``later``), encoded, given room and written after the lock
                        # (``movers.DataMovers``); if no room can be made there then, it goes on down from there
                        self._stage_demotion(key, e, src, dst, tensor, writes)
                        return later
                    if tensor is None:
                        tensor = self.read(e)  # a tier without held room: the victim moves now
                        if tensor is None:
                            break
                    if self._move(key, e, src, dst, tensor, writes):
                        return False
        self._drop(key, e, count_eviction=True)
        return False

    def _stage_demotion(self, key: CacheKey, e: EntryRecord, src: int, dst: int, tensor: torch.Tensor | None,
                        writes: list[PendingWrite]) -> None:
        """Queue the victim's write into ``dst`` and index it there. Its room in ``src``: freed now when its bytes
        are in ``tensor``; with ``tensor`` None they stay there, held by ``e`` (the write's ``source``), until the
        write rounds have read them out (``_release_source``), and readers meanwhile read them there."""
        if tensor is None:
            e.in_flight += 1  # the write's hold on its source: never freed while its bytes are to be read
            nbytes = self.tiers[src].value_nbytes(e)
        else:
            self._free(e)
            nbytes = tensor.numel() * tensor.element_size()
        self.policies[src].demote(e)
        # ``dst``'s policy hears the arrival now, as the index places the entry there: a write called off or
        # failed later is a departure of a key it holds, and when room is made for it the victim is one of the
        # candidates (nbytes: the raw tensor's; the victim is encoded later)
        rec = self._rehome(e, dst)
        self.policies[dst].insert(rec, nbytes, self._up(dst, rec.parent))
        self._moved(key, src, dst, nbytes=nbytes)
        rec.in_flight += 1
        w = PendingWrite(key, rec, dst, tensor, src=src)
        if tensor is None:
            w.source = e
            self._unread[key] = w
        else:
            self._staged[key] = tensor
        writes.append(w)
        if dst == len(self.tiers) - 1:
            self._queued[key] = w  # evictable until its write starts (see ``_evictable``)

    def _stage_promotion(self, key: CacheKey, e: EntryRecord, src: int, tensor: torch.Tensor, prepared,
                         writes: list[PendingWrite]) -> None:
        """Promote ``key`` as a put is stored (lock held; the reader holds its bytes in ``tensor``, encoded for the
        top tier outside the lock in ``prepared``): room is made in the top tier (its victims staged) and held,
        the entry is indexed there in flight and its bytes are written in the write rounds, outside the lock.
        They stay in ``src`` until that write commits, kept as the value to fall back to: a failed write leaves
        the entry where it was (``_finish``). No promotion where no room can be made (pinned or in-flight
        entries in the way), as a ``_move`` that finds no room. Room still being vacated (victims read out in
        the rounds) is held there."""
        tier = self.tiers[0]
        self._pin(key)  # making room above cannot pick this very entry (a tier without held room moves victims now)
        try:
            if not self._make_room(0, prepared.nbytes, writes)[0]:
                return
            res = tier.allocate(prepared)  # None: the room is still being vacated
        finally:
            self._unpin(key)
        self._fallbacks[key] = e  # listed by ``src``'s policy meanwhile (never a victim: not the current record)
        rec = self._rehome(e, 0)
        rec.in_flight = 1
        self.policies[0].insert(rec, prepared.nbytes, self._up(0, rec.parent))
        self._moved(key, src, 0, tensor)
        self._staged[key] = tensor
        writes.append(PendingWrite(key, rec, 0, tensor, src=src, prepared=prepared, res=res, replaced=e))

    def _rehome(self, e: EntryRecord, dst: int) -> EntryRecord:
        """A new record for ``e``'s entry in tier ``dst`` (its stay there), with what the store knows of it; the
        index points at it from now on. Never for an entry being read or written (never moved then), except a
        staged victim or put passed on down (``_pass_down``): its readers read the staged bytes, not the tier's."""
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
                      and self._make_room(dst, prepared.nbytes, writes, now=True)[0]
                      and self._store(dst, prepared, None))
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
        if w.tensor is not None and self._staged.get(key) is w.tensor:
            del self._staged[key]
        self._retire(w)  # a victim never read out: its room in the tier it left goes back
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

    # ------------------------------------------------------------------ the movers' hooks (``movers.py``)
    def sources_read(self, writes: Sequence[PendingWrite]) -> None:
        """Victims read out of the tiers they leave: readers get the copy from now on, and the old room goes
        back (now, or at its last reader's release)."""
        with self._lock:
            for w in writes:
                if w.tensor is not None and not w.cancelled:
                    self._staged[w.key] = w.tensor
                self._retire(w)

    def rooms_held(self, writes: Sequence[PendingWrite], later: list[PendingWrite]) -> None:
        """Hold room for each of a round's writes that has none yet. A write whose room is still being vacated
        (victims staged now, read out in the next round) waits for the next round, at most ``ROOM_WAITS``
        times; a victim or a new value's put its tier cannot take goes on down (``_pass_down``): both go to
        ``later``, as do the victims staged to make room. The others cannot be called off any more: their bytes
        are written next."""
        with self._lock:
            # puts and promotions first: the room being vacated was made for them; victims make their own
            for w in sorted(writes, key=lambda w: w.src is not None and not w.is_promotion):
                if w.res is not None or w.cancelled or w.tensor is None:
                    continue
                waiting = w.prepared is not None and self._hold_room(w, later)
                if w.res is not None or w.cancelled:
                    continue
                if waiting and w.waits < ROOM_WAITS:
                    w.waits += 1  # its room is on its way: held in the next round
                elif not self._pass_down(w):
                    continue  # not written: ``_finish`` settles it
                later.append(w)
            going_on = {id(w) for w in later}
            for w in writes:
                if id(w) not in going_on and self._queued.get(w.key) is w:
                    del self._queued[w.key]

    def writes_done(self, writes: Sequence[PendingWrite]) -> None:
        """Commit what was written, one batch per tier, and publish or give up each entry."""
        with self._lock:
            try:
                for i, tier in enumerate(self.tiers):
                    done = [w for w in writes if w.ok and w.dst == i]
                    if done and tier.addressed:  # the location goes into the entry's record
                        tier.commit_into([(w.res, w.entry) for w in done])
                    elif done:
                        tier.commit_many([w.res for w in done])
            finally:
                for w in writes:
                    if not w.cancelled:
                        self._finish(w)

    def _hold_room(self, w: PendingWrite, later: list[PendingWrite]) -> bool:
        """Room in ``w.dst`` for a write that has none yet (lock held): a staged victim, or a put or promotion
        whose room was still being vacated. Above the last tier, room is made as for a put: that tier's victims
        are staged for ``later``; True when it is on its way (those victims' bytes are read out in the next
        round: try again then). In the last tier its victims leave the cache; its policy has held this victim
        since it was staged and may give the victim itself up first (a chain's tail whose parent would have to
        go for it): its write is then called off instead of making room. Where no room can be made (only
        pinned or in-flight entries in the way) ``w.res`` stays None."""
        tier, need = self.tiers[w.dst], w.prepared.nbytes
        if w.dst < len(self.tiers) - 1:
            self._wait_for_readers(w.dst, need)
            fits, _ = self._make_room(w.dst, need, later)
            if fits and tier.free_bytes < need:
                return True
        elif self._room_within_reach(w.dst, need) >= need:
            staged = len(later)
            while tier.free_bytes < need and not w.cancelled:
                victim = self._next_victim(w.dst)
                if victim is None:
                    break
                self._evict_one(victim, self._index[victim], later)
            assert len(later) == staged, "victims of the last tier are dropped, never moved"
        if not w.cancelled and tier.free_bytes >= need:
            w.res = tier.allocate(w.prepared)
        return False

    def _pass_down(self, w: PendingWrite) -> bool:
        """Send a write that ``w.dst`` could not take (no room could be made: its entries pinned or being read
        or written, as by another thread's loads promoting into it; or its codec refused the tensor) on to the
        next tier below that holds room, to be written in the next round (lock held): a staged victim, as
        ``_evict_one`` would have sent it there, or a put of a new value, as ``put_many`` sends on what a tier
        refuses. False for a promotion (the entry stays below), for a put that replaces a value it would fall
        back to (that value stays, the put returns False: two stays of one key in a tier are not tracked), and
        below the last tier that holds room (a victim leaves the cache, a put returns False): ``_finish``
        settles those."""
        if w.is_promotion or w.replaced is not None or self._index.get(w.key) is not w.entry:
            return False
        dst = next((d for d in range(w.dst + 1, len(self.tiers)) if self.tiers[d].holds_room), None)
        if dst is None:
            return False
        e = w.entry
        if w.src is None:  # a put: it never landed here, which is no choice of this tier's policy
            self.policies[w.dst].delete(e)
            self._counters[w.dst].rejected += 1
        else:
            self.policies[w.dst].demote(e)
        # the write's in-flight mark moves to the new record; a reader of the staged bytes still holds ``e``
        # and releases its own mark there (so a policy that keeps ``e`` for a later stay sees it held until then)
        e.in_flight -= 1
        rec = self._rehome(e, dst)
        rec.in_flight = 1
        self.policies[dst].insert(rec, w.tensor.numel() * w.tensor.element_size(), self._up(dst, rec.parent))
        self._moved(w.key, w.dst, dst, w.tensor)
        w.entry, w.dst, w.prepared, w.waits = rec, dst, None, 0
        if dst == len(self.tiers) - 1:
            self._queued[w.key] = w
        return True

    def _finish(self, w: PendingWrite) -> None:
        """Count a written (and committed) entry, or let it go (lock held)."""
        e, tier = w.entry, self.tiers[w.dst]
        if self._queued.get(w.key) is w:  # the rounds stopped early (an exception)
            del self._queued[w.key]
        e.in_flight -= 1
        if w.tensor is not None and self._staged.get(w.key) is w.tensor:
            del self._staged[w.key]
        self._retire(w)  # a victim's bytes never read out (the rounds stopped early): their room goes back
        old = w.replaced
        if old is not None and self._fallbacks.get(w.key) is old:
            del self._fallbacks[w.key]  # settled below: deleted on success, back in the index on failure
        if w.ok:  # committed by the caller, one batch per tier
            if w.is_promotion:
                self._counters[w.dst].promotions_in += 1
                if self._index.get(w.key) is not old:
                    self._free(old)  # the bytes it was promoted from
                    self.policies[old.tier].promote(old)
                return
            if w.src is not None:
                self._counters[w.dst].demotions_in += 1
            if old is not None and old.tier != w.dst and self._index.get(w.key) is not old:
                # the value it replaced, kept in another tier until now
                self._delete_from(old)
            return
        if w.res is not None and w.ok is None:
            tier.abort(w.res)  # room held but never written (an exception stopped the rounds)
        if old is not None and self._index.get(w.key) is e:
            # a failed replace or promotion: the old value is still whole where it was, so it stays (the put
            # returns False); a replace in its own tier kept its record all along
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
