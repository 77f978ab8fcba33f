"""Least-recently-used eviction: the baseline every other policy is measured against.

Metadata side only. The recency order is an intrusive doubly-linked list (as vLLM's free block queue):
moving an entry to the most-recent end allocates nothing, and ``victims`` can walk the list while the
cache removes the keys it yields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.policies.base import EvictionPolicy


@dataclass(slots=True, eq=False)
class _Link:
    """One entry's place in the recency list. ``prev is None`` once unlinked."""

    key: CacheKey | None
    prev: "_Link | None" = None
    next: "_Link | None" = None


class RecencyList:
    """Doubly-linked list with a sentinel: head side = least recent, tail side = most recent."""

    __slots__ = ("_root",)

    def __init__(self) -> None:
        root = _Link(None)
        root.prev = root.next = root
        self._root = root

    def push_back(self, link: _Link) -> None:
        root = self._root
        last = root.prev
        link.prev, link.next = last, root
        last.next = root.prev = link

    def unlink(self, link: _Link) -> None:
        link.prev.next = link.next
        link.next.prev = link.prev
        link.prev = link.next = None

    def move_to_back(self, link: _Link) -> None:
        if link.next is not self._root:
            self.unlink(link)
            self.push_back(link)

    def walk(self, evictable: Callable[[CacheKey], bool]) -> Iterator[CacheKey]:
        """Keys from least to most recent, skipping non-evictable ones (they stay where they are).

        Survives the caller removing or touching keys between steps: after a yield the walk continues
        from the yielded link if it is still linked, else from its old successor if that is still
        linked, else from the head again (re-skipping pinned keys, which is rare).
        """
        root = self._root
        link = root.next
        while link is not root:
            nxt = link.next
            if evictable(link.key):
                yield link.key
                if link.prev is not None:
                    nxt = link.next
                elif nxt.prev is None:
                    nxt = root.next
            link = nxt


class LRUPolicy(EvictionPolicy):
    """Evicts the entry whose last insert or access is oldest. O(1) per operation."""

    name = "lru"

    def __init__(self) -> None:
        self._links: dict[CacheKey, _Link] = {}
        self._order = RecencyList()

    def on_insert(self, key: CacheKey, nbytes: int, parent: CacheKey | None = None) -> None:
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _Link(key)
            self._order.push_back(link)
        else:
            self._order.move_to_back(link)

    def on_hit(self, key: CacheKey) -> None:
        link = self._links.get(key)
        if link is not None:
            self._order.move_to_back(link)

    def _forget(self, key: CacheKey) -> None:
        link = self._links.pop(key, None)
        if link is not None:
            self._order.unlink(link)

    def victims(self, evictable: Callable[[CacheKey], bool]) -> Iterator[CacheKey]:
        return self._order.walk(evictable)

    def __len__(self) -> int:
        return len(self._links)

    def __contains__(self, key: object) -> bool:
        return key in self._links
