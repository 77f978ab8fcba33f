"""Prefix-aware eviction: leaf-first over the chain tree, by recency (``prefix-lru``) or by recency with
first-time blocks ranked lower by an adaptive margin (``prefix-2q``).

Metadata side only. KV blocks form chains (``parent`` = the previous block of the same prefix), and a
block is only usable while every block before it is cached: a prefix hit stops at the first missing
block. Plain LRU gets this backwards. A request touches a chain head-to-tail, so the head is the *least*
recent block of its chain and LRU evicts it first, which leaves the rest of the chain cached but useless.
Here only *leaves* (entries with no cached child) are eviction candidates, as in SGLang's radix cache
(``RadixCache.evict``: a heap of leaves by last access; a parent becomes a candidate when its last child
goes). A chain therefore shrinks from its tail and what stays is always a usable prefix.

Bookkeeping per entry: four fields in the store's record of it (``PrefixRecord``: parent link, child count,
priority, the priority it is queued with; the policies that rank by class add it: ``ClassedPrefixRecord``); no
map of its own. The heap holds records themselves, each
at most once, ordered by the priority they were queued with: a use that raises a record's priority leaves it
where it waits, and it is re-queued when it surfaces with a stale one; a use that lowers it (rare) re-queues it
at once, so the order is always that of the current priorities (no tuple per use; the per-entry metadata budget
is 256 B, store and tier records included). Every operation is O(log n) amortized.

Children may arrive before their parent (a tier below receives a chain's tail first when the tier above
evicts leaf-first); such an orphan waits on its parent's key and is linked when the parent arrives.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Iterator

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.policies.doorkeeper import Doorkeeper
from qwen3vl_ray.policies.record import EntryRecord


class PrefixRecord(EntryRecord):
    """An entry's record with its place in the chain tree and the leaf heap."""

    __slots__ = ("up", "children", "prio", "queued")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A linked parent record, the parent's key while waiting for it to arrive, or None (chain head).
        self.up: PrefixRecord | CacheKey | None = None
        self.children = 0  # cached children in this tier
        # Rank: lower is evicted sooner. None before the record arrives and from the moment it leaves (a departed
        # record can stay on the heap or as a child's ``up`` until it surfaces; this is how it is recognised).
        self.prio: int | None = None
        # The priority this record is on the heap with (fixed while it is there: the heap's order), None when off.
        self.queued: int | None = None

    def __lt__(self, other: "PrefixRecord") -> bool:  # heap order: queued priority, then key (equal ones are rare)
        return (self.queued, self.key) < (other.queued, other.key)


class ClassedPrefixRecord(PrefixRecord):
    """A prefix record with the class the policies that rank by class keep (``ClassedPrefixPolicy``). The plain
    leaf-first LRU has no use for it, and two fields fewer keep its record in a smaller allocation class."""

    __slots__ = ("heat",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # prefix-2q / chain-arc: 0 = cold, >= 1 = hot; prefix-return: the chain's shared record (truthy when hot)
        self.heat: Any = 0


def _live(node: PrefixRecord) -> bool:
    return node.prio is not None


class PrefixLRUPolicy(EvictionPolicy):
    """Leaf-first LRU over the chain tree (SGLang's radix-tree LRU).

    Eviction order: among entries with no cached child, the least recently used first. O(log n).
    Subclasses change ``_priority`` (lower = evicted sooner) and use the ``_on_new`` / ``_on_gone`` hooks.
    """

    name = "prefix-lru"
    record_type = PrefixRecord

    def __init__(self) -> None:
        super().__init__()
        self._count = 0
        # Children whose parent key is not (yet) here: parent key -> one record or a list of them.
        self._waiting: dict[CacheKey, PrefixRecord | list[PrefixRecord]] = {}
        # Parents that left while children of theirs stayed (a head demoted or deleted alone): key -> the departed
        # record the children still point at. The parent's next stay here reuses it (``new_record``), so the
        # children are its children again and it is no leaf before them.
        self._departed: dict[CacheKey, PrefixRecord] = {}
        self._heap: list[PrefixRecord] = []  # leaves by queued priority, lazily invalidated (see _surface)
        self._clock = 0

    # -- priority ------------------------------------------------------------------------------------
    def _priority(self, node: PrefixRecord) -> int:
        return self._clock

    def _touch(self, node: PrefixRecord) -> None:
        self._clock += 1
        node.prio = self._priority(node)
        if node.queued is not None and node.prio < node.queued:
            # Lowered (prefix-2q, chain-arc: a cold entry replaced in place after their penalty rose): it
            # must surface sooner than where it waits. Rare, so an O(n) removal is fine.
            self._heap.remove(node)
            heapq.heapify(self._heap)
            node.queued = None
        if node.children == 0:
            self._push(node)

    # -- heap ----------------------------------------------------------------------------------------
    def _push(self, node: PrefixRecord) -> None:
        """Queue a leaf, unless it is queued already (with an older priority: ``_surface`` requeues it)."""
        if node.queued is None:
            node.queued = node.prio
            heapq.heappush(self._heap, node)
            if len(self._heap) > 2 * self._count + 64:
                self._rebuild()

    def _rebuild(self) -> None:
        # Departed records left on the heap outnumber live ones: start over with the live leaves.
        for n in self._heap:
            n.queued = None
        self._heap = [n for n in self._members() if _live(n) and n.children == 0]  # type: ignore[misc]
        for n in self._heap:
            n.queued = n.prio
        heapq.heapify(self._heap)

    def _surface(self) -> PrefixRecord | None:
        """Pop the least-priority live leaf off the heap (None when it is empty). Departed and interior records
        are dropped (a record is queued again when it becomes a leaf); one queued with an older priority than
        its own goes back with its own and the walk goes on."""
        while self._heap:  # re-read each time: requeueing a stale node may rebuild the heap as a new list
            node = heapq.heappop(self._heap)
            queued, node.queued = node.queued, None
            if node.children or not _live(node):
                continue
            if node.prio != queued:
                self._push(node)
                continue
            return node
        return None

    # -- events --------------------------------------------------------------------------------------
    def new_record(self, key: CacheKey, tier: int, parent: CacheKey | None, last_access: float,
                   in_flight: int = 0) -> EntryRecord:
        node = self._departed.pop(key, None)
        if node is not None and (node.in_flight or node.loc is not None):
            # The earlier stay is still held where it was: a reader copying it, or the bytes of a victim the
            # store has not read out yet (its in-flight mark, its location). Reinitialising it would hand their
            # release to the new stay (a count that goes negative, the new stay's bytes freed), so the new stay
            # gets a record of its own and the children wait on the key, to link to it as it arrives.
            self._unlink_children(node)
            node = None
        if node is None:
            return super().new_record(key, tier, parent, last_access, in_flight)
        # the store's fields start afresh; the child count (children still here) and the heap mark stay: a stale
        # heap place is requeued or dropped when it surfaces, as for any record
        EntryRecord.__init__(node, key, tier, parent, last_access, in_flight=in_flight)
        node.up = None
        return node

    def insert(self, rec: EntryRecord, nbytes: int, up: EntryRecord | None = None) -> None:
        node: PrefixRecord = rec  # type: ignore[assignment]
        if _live(node):
            self._touch(node)  # replaced in place: same chain position, counts as a use
            return
        if isinstance(up, PrefixRecord) and _live(up):
            node.up = up
            up.children += 1
        elif node.parent is not None:
            node.up = node.parent
            self._wait(node.parent, node)
        self._count += 1
        waiting = self._waiting.pop(node.key, None)
        if waiting is not None:
            for child in waiting if isinstance(waiting, list) else (waiting,):
                child.up = node
                node.children += 1
        self._on_new(node)
        self._touch(node)

    def _on_new(self, node: PrefixRecord) -> None:
        """Hook for subclasses: ``node`` just arrived (before its first ``_touch``)."""

    def hit(self, rec: EntryRecord) -> None:
        node: PrefixRecord = rec  # type: ignore[assignment]
        if _live(node):
            self._on_hit(node)
            self._touch(node)

    def _on_hit(self, node: PrefixRecord) -> None:
        """Hook for subclasses: ``node`` was read (before its ``_touch``)."""

    def _forget(self, rec: EntryRecord) -> None:
        node: PrefixRecord = rec  # type: ignore[assignment]
        if not _live(node):
            return
        node.prio = None
        self._count -= 1
        up = node.up
        if isinstance(up, PrefixRecord):
            up.children -= 1
            if up.children == 0:
                if _live(up):
                    self._push(up)  # the parent is a leaf now, with the priority of its own last use
                elif self._departed.get(up.key) is up:
                    del self._departed[up.key]  # a departed parent's last child went: nothing to relink
        elif up is not None:
            self._unwait(up, node)
        if node.children:
            # Children stay and point at this record: if the entry comes back, it comes back as this record.
            self._departed[node.key] = node
        self._on_gone(node)

    def _on_gone(self, node: PrefixRecord) -> None:
        """Hook for subclasses: ``node`` left the tier."""

    def _unlink_children(self, node: PrefixRecord) -> None:
        """Make the children still linked to the departed ``node`` wait on its key instead. O(n) over the tier's
        records: only for a departed record still held when its key comes back (``new_record``), which is rare."""
        for child in list(self._members()):
            if child.up is node:
                child.up = node.key
                self._wait(node.key, child)
        node.children = 0

    def _wait(self, parent: CacheKey, node: PrefixRecord) -> None:
        have = self._waiting.get(parent)
        if have is None:
            self._waiting[parent] = node
        elif isinstance(have, list):
            have.append(node)
        else:
            self._waiting[parent] = [have, node]

    def _unwait(self, parent: CacheKey, node: PrefixRecord) -> None:
        have = self._waiting.get(parent)
        if have is node:
            del self._waiting[parent]
        elif isinstance(have, list):
            have.remove(node)
            if not have:
                del self._waiting[parent]

    # -- eviction order ------------------------------------------------------------------------------
    def walk(self, evictable: Callable[[EntryRecord], bool]) -> Iterator[EntryRecord]:
        """Leaves by priority, each one yielded counted as gone for the rest of the walk (the caller takes it,
        or plans to: a dry walk that lists what would go to free some bytes): a parent joins, by its own
        priority, as soon as all its children have been yielded, so even a long walk never names a chain's
        head before its tail. If every leaf is pinned, interior entries follow in priority order (a rare,
        O(n log n) fallback) so the cache can still make room. Skipped and unremoved entries go back on the
        heap when the walk ends."""
        kept: list[PrefixRecord] = []  # surfaced leaves, off the heap until the walk ends
        yielded: set[int] = set()  # ids of the records yielded (records hash by identity: one stay each)
        freed: list[tuple[int, CacheKey, PrefixRecord]] = []  # parents whose children were all yielded
        gone: dict[int, list[PrefixRecord]] = {}  # children yielded so far, per parent's id
        pending: PrefixRecord | None = None  # the heap's next leaf, surfaced, waiting to be compared with ``freed``
        heap_done = False
        try:
            while True:
                if pending is None and not heap_done:
                    pending = self._surface()
                    if pending is None:
                        heap_done = True
                    else:
                        kept.append(pending)
                if freed and (pending is None or (freed[0][0], freed[0][1]) < (pending.prio, pending.key)):
                    node = heapq.heappop(freed)[2]
                    if not _live(node):
                        continue
                elif pending is not None:
                    node, pending = pending, None
                else:
                    break
                if id(node) in yielded or not evictable(node):  # yielded: requeued by a use during this walk
                    continue
                yielded.add(id(node))
                up = node.up
                if isinstance(up, PrefixRecord) and _live(up):
                    # against the children still cached: a caller that takes what it is given (and removes it)
                    # lowers ``up.children`` as it goes, so only yielded children still here count
                    mine = gone.setdefault(id(up), [])
                    mine.append(node)
                    if sum(_live(c) for c in mine) >= up.children:
                        heapq.heappush(freed, (up.prio, up.key, up))
                yield node
            rest = sorted((n for n in self._members() if _live(n) and n.children > 0),  # type: ignore[misc]
                          key=lambda n: n.prio)
            for node in rest:
                if _live(node) and id(node) not in yielded and evictable(node):
                    yielded.add(id(node))
                    yield node
        finally:
            for node in kept:
                if node.children == 0 and _live(node):
                    self._push(node)  # a no-op for one a use during the walk queued again

    def __len__(self) -> int:
        return self._count


class ClassedPrefixPolicy(PrefixLRUPolicy):
    """Leaf-first, ranking by a class kept in each record (``ClassedPrefixRecord.heat``); a hit makes a block
    hot. The base of ``prefix-2q`` and ``chain-arc``."""

    record_type = ClassedPrefixRecord

    def _on_hit(self, node: PrefixRecord) -> None:
        node.heat += 1  # type: ignore[attr-defined]


class Prefix2QPolicy(ClassedPrefixPolicy):
    """Leaf-first LRU in which blocks seen for the first time count as older, by an adaptive margin.

    Most first-time KV blocks are one-shot prompts (58% of the Mooncake trace's blocks are never used
    again), and each long one-shot prompt flushes an LRU of the chains that do come back. The idea is 2Q's
    (Johnson & Shasha, VLDB 1994): a first-time entry stays on probation and only an entry that comes back
    earns a full place. Three changes for prefix KV:

    - "Came back" is asked of TinyLFU's doorkeeper (``Doorkeeper``; Einziger et al., ACM ToS 2017), a
      Bloom filter over the last ``window_factor`` x entries .. twice that many arrivals: a few bytes per
      entry instead of 2Q's ghost list of keys, and a memory long enough for KV reuse, which returns
      after minutes (on the Mooncake trace a block's first reuse comes a median ~560 requests later).
    - Probation is soft: a first-time entry is ranked as if last used ``penalty`` x entries accesses
      earlier than it was (strict 2Q-style "probation first" lost up to 14 points of hit ratio on multi-turn
      chats, whose new tail blocks are reused one turn later).
    - ``penalty`` adapts, ARC-style (Megiddo & Modha, FAST 2003): a hit on a first-time entry says new
      blocks do get reused soon and lowers it; the re-insert of a block the doorkeeper has seen says the
      cache dropped something that came back and raises it; it stays in [0, ``max_penalty``]. At 0 the
      policy is exactly leaf-first LRU.

    Order within that ranking is leaf-first (``PrefixLRUPolicy``), so a kept chain is always a usable
    prefix. ``python -m benchmarks.policy`` compares it with LRU and Belady on the Mooncake trace and on
    synthetic Zipf / scan / multi-turn traces.
    """

    name = "prefix-2q"

    def __init__(self, window_factor: float = 4.0, penalty: float = 0.5, max_penalty: float = 1.0,
                 step: float = 1.0) -> None:
        if not window_factor > 0:
            raise ValueError(f"window_factor must be > 0 (multiple of the entry count), got {window_factor}")
        if not 0.0 <= penalty <= max_penalty:
            raise ValueError(f"need 0 <= penalty <= max_penalty, got penalty={penalty}, max_penalty={max_penalty}")
        if not step >= 0:
            raise ValueError(f"step must be >= 0 (entries of penalty per event), got {step}")
        super().__init__()
        self._window_factor = window_factor
        self.penalty = penalty
        self._max_penalty = max_penalty
        self._step = step
        self._doorkeeper = Doorkeeper(self._window())

    def _window(self) -> int:
        return max(1024, int(self._window_factor * self._count))

    def _priority(self, node: PrefixRecord) -> int:
        if node.heat:
            return self._clock
        return self._clock - int(self.penalty * self._count)

    def _on_new(self, node: PrefixRecord) -> None:
        # "Seen" counts arrivals, not misses: a tier below hears every miss of the cache, but a block it receives
        # later by demotion has not come back to it (counting its miss would rank every demoted block as returning)
        seen = self._doorkeeper.seen_then_add(node.key, self._window())
        # heat is the class: 0 = first time (on probation), >= 1 = came back or was hit.
        node.heat = 1 if seen else 0
        if seen:
            self.penalty = min(self._max_penalty, self.penalty + self._step / self._count)

    def hit(self, rec: EntryRecord) -> None:
        if _live(rec) and rec.heat == 0:  # type: ignore[arg-type, attr-defined]
            self.penalty = max(0.0, self.penalty - self._step / self._count)
        super().hit(rec)

    @property
    def doorkeeper_nbytes(self) -> int:
        """Bytes of the doorkeeper's bit arrays."""
        return self._doorkeeper.nbytes
