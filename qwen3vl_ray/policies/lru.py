"""Least-recently-used eviction: the baseline every other policy is measured against.

Metadata side only. The recency order is an intrusive doubly-linked list threaded through the entries' own
records (as vLLM's free block queue is through its blocks): moving an entry to the most-recent end allocates
nothing, and ``walk`` can follow the list while the store removes the records it yields.
"""

from __future__ import annotations

from typing import Callable, Iterator

from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.policies.record import EntryRecord


class LRURecord(EntryRecord):
    """An entry's record with its place in the recency list. ``prev is None`` once unlinked."""

    __slots__ = ("prev", "next")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prev: LRURecord | None = None
        self.next: LRURecord | None = None


class _Root:
    """The list's sentinel (not an entry)."""

    __slots__ = ("prev", "next")

    def __init__(self) -> None:
        self.prev = self.next = self


class RecencyList:
    """Doubly-linked list with a sentinel: head side = least recent, tail side = most recent."""

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root = _Root()

    def push_back(self, link: LRURecord) -> None:
        root = self._root
        last = root.prev
        link.prev, link.next = last, root
        last.next = root.prev = link

    def unlink(self, link: LRURecord) -> None:
        link.prev.next = link.next
        link.next.prev = link.prev
        link.prev = link.next = None

    def move_to_back(self, link: LRURecord) -> None:
        if link.next is not self._root:
            self.unlink(link)
            self.push_back(link)

    def walk(self, evictable: Callable[[EntryRecord], bool]) -> Iterator[LRURecord]:
        """Records from least to most recent, skipping non-evictable ones (they stay where they are).

        Survives the caller removing or touching records between steps: after a yield the walk continues
        from the yielded record if it is still linked, else from its old successor if that is still
        linked, else from the head again (re-skipping pinned records, which is rare).
        """
        root = self._root
        link = root.next
        while link is not root:
            nxt = link.next
            if evictable(link):
                yield link
                if link.prev is not None:
                    nxt = link.next
                elif nxt.prev is None:
                    nxt = root.next
            link = nxt


class LRUPolicy(EvictionPolicy):
    """Evicts the entry whose last insert or access is oldest. O(1) per operation."""

    name = "lru"
    record_type = LRURecord

    def __init__(self) -> None:
        super().__init__()
        self._order = RecencyList()
        self._count = 0

    def insert(self, rec: EntryRecord, nbytes: int, up: EntryRecord | None = None) -> None:
        if rec.prev is None:  # type: ignore[attr-defined]
            self._order.push_back(rec)  # type: ignore[arg-type]
            self._count += 1
        else:
            self._order.move_to_back(rec)  # type: ignore[arg-type]

    def hit(self, rec: EntryRecord) -> None:
        if rec.prev is not None:  # type: ignore[attr-defined]
            self._order.move_to_back(rec)  # type: ignore[arg-type]

    def _forget(self, rec: EntryRecord) -> None:
        if rec.prev is not None:  # type: ignore[attr-defined]
            self._order.unlink(rec)  # type: ignore[arg-type]
            self._count -= 1

    def walk(self, evictable: Callable[[EntryRecord], bool]) -> Iterator[EntryRecord]:
        return self._order.walk(evictable)

    def __len__(self) -> int:
        return self._count
