"""The cluster directory: which node and tier hold each key. Metadata side, lives in the coordinator.

Choice: one central directory in the coordinator, not sharded over the agents. A prefix lookup for routing
touches every chunk of a prompt, and a central table answers it in one process without a fan-out; agents stay
the source of truth (the directory is rebuilt from them after a restart, and a stale location is only a
miss, never wrong data, because the agent that is asked checks its own tiers).

Compact form: ``dict[bytes(16) -> int]`` where the int packs ``node_index << 2 | tier_code``. Codes below 256
are CPython's cached small ints, so an entry costs the dict slot plus one 16-byte ``bytes`` object, about
100-130 B (measured by ``benchmarks.cluster``; target <= 256 B). Limit: ~10 M entries per GiB of coordinator
memory; each cached entry is a whole KV chunk (MiBs), so 10 M entries stand for tens of TB of cache. Past that,
shard the table over the agents by key hash (the API below is per key and would not change).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from qwen3vl_ray.keys import CacheKey

TIER_CODES = {"host": 1, "disk": 2}
TIER_NAMES = {v: k for k, v in TIER_CODES.items()}


def tier_code(tier: str) -> int:
    try:
        return TIER_CODES[tier]
    except KeyError:
        raise ValueError(f"unknown tier {tier!r}; the directory tracks: {', '.join(TIER_CODES)}") from None


class Directory:
    """key -> (node id, tier). Not thread-safe; the coordinator serialises access."""

    def __init__(self) -> None:
        self._loc: dict[bytes, int] = {}
        self._nodes: list[str | None] = []  # index -> node id (None once forgotten; indexes are not reused)
        self._index: dict[str, int] = {}

    def _node_index(self, node_id: str) -> int:
        idx = self._index.get(node_id)
        if idx is None:
            idx = len(self._nodes)
            self._nodes.append(node_id)
            self._index[node_id] = idx
        return idx

    def __len__(self) -> int:
        return len(self._loc)

    def set_many(self, node_id: str, keys: Iterable[CacheKey], tier: str) -> None:
        code = self._node_index(node_id) << 2 | tier_code(tier)
        loc = self._loc
        for k in keys:
            loc[k] = code

    def apply_events(self, node_id: str, events: Iterable[tuple[bytes, int, bool]]) -> None:
        """Replay an agent's journal: ``(key, tier_code, added)`` in order. A removal only clears the key if
        the directory still places it at that node and tier (a newer copy elsewhere wins)."""
        base = self._node_index(node_id) << 2
        loc = self._loc
        for key, code, added in events:
            if added:
                loc[key] = base | code
            elif loc.get(key) == base | code:
                del loc[key]

    def remove_many(self, node_id: str, keys: Iterable[CacheKey]) -> int:
        idx = self._index.get(node_id)
        if idx is None:
            return 0
        n = 0
        for k in keys:
            code = self._loc.get(k)
            if code is not None and code >> 2 == idx:
                del self._loc[k]
                n += 1
        return n

    def get(self, key: CacheKey) -> tuple[str, str] | None:
        code = self._loc.get(key)
        if code is None:
            return None
        node = self._nodes[code >> 2]
        return None if node is None else (node, TIER_NAMES[code & 3])

    def get_many(self, keys: Sequence[CacheKey]) -> list[tuple[str, str] | None]:
        return [self.get(k) for k in keys]

    def longest_prefix(self, keys: Sequence[CacheKey]) -> list[str]:
        """Node ids holding each leading key, up to the first key held nowhere."""
        nodes = []
        for k in keys:
            loc = self.get(k)
            if loc is None:
                break
            nodes.append(loc[0])
        return nodes

    def forget_node(self, node_id: str) -> int:
        """Drop every entry of ``node_id`` (agent restarted or node died). Returns how many."""
        idx = self._index.pop(node_id, None)
        if idx is None:
            return 0
        self._nodes[idx] = None
        doomed = [k for k, c in self._loc.items() if c >> 2 == idx]
        for k in doomed:
            del self._loc[k]
        return len(doomed)

    def count_by_node(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for code in self._loc.values():
            node = self._nodes[code >> 2]
            if node is not None:
                per = out.setdefault(node, {"host": 0, "disk": 0})
                per[TIER_NAMES[code & 3]] += 1
        return out

    def nodes(self) -> list[str]:
        return [n for n in self._nodes if n is not None]
