"""``TieredCache.add_listener``: every move of an entry between tiers, into and out of the cache, is heard in
order, so a replay of the events always agrees with the index (``where``). A node agent journals these events
for the cluster's directory; a missed or misordered one would route readers to a tier that lost the entry.

Driven through every way an entry moves: puts and batched puts that overflow the host tier (demotions into
disk, newest on top), hits below that promote, explicit demotes, evictions out of the last tier, removes,
replaces in place and in another tier, idle expiry, and a disk write that fails.
"""

import random

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="store-listeners")
ELEMS = 256  # float32 -> 1 KiB per entry


class Replay:
    """The listener under test: replays moves into key -> tier name, checking each leaves where it was."""

    def __init__(self, cache: TieredCache) -> None:
        self.names = cache.tier_names
        self.where: dict[bytes, str] = {k: cache.where(k) for k in cache.keys()}
        self.events: list[tuple] = []
        cache.add_listener(self)

    def __call__(self, key, src, dst, nbytes) -> None:
        self.events.append((key, src, dst))
        assert nbytes == (None if dst is None else ELEMS * 4) or (nbytes is None and src is not None), \
            "a move into a tier carries the tensor's bytes"
        assert self.where.get(key) == (None if src is None else self.names[src]), "a move from where it was not"
        assert src != dst
        if dst is None:
            del self.where[key]
        else:
            self.where[key] = self.names[dst]


def store(tmp_path, policy=None) -> TieredCache:
    tiers = [TierConfig("host", 6 * ELEMS * 4, block_bytes=256),
             TierConfig("disk", 12 * (ELEMS * 4 + 512), path=str(tmp_path / "disk"), fsync=False)]
    return TieredCache(CacheConfig(tiers=tiers, policy=policy, namespace=NS, prefetch_threads=0))


def agrees(cache: TieredCache, replay: Replay) -> None:
    assert replay.where == {k: cache.where(k) for k in cache.keys()}


@pytest.mark.parametrize("policy", [None, "lru"])  # None: the default (prefix-lru, leaf first)
def test_a_replay_of_the_events_always_agrees_with_the_index(tmp_path, policy):
    rng = random.Random(7)
    with store(tmp_path, policy) as c:
        replay = Replay(c)
        keys = [prefix_key(NS, None, [i]) for i in range(40)]
        for step in range(400):
            op = rng.choice(["put", "batch", "get", "demote", "remove", "expire"])
            k = rng.choice(keys)
            if op == "put":
                c.put(k, torch.full((ELEMS,), float(step)))
            elif op == "batch":
                chain = rng.sample(keys, rng.randint(2, 9))  # up to 9 KiB: more than the host tier holds
                c.put_many([(x, torch.full((ELEMS,), float(step)), p) for p, x in zip([None, *chain], chain)])
            elif op == "get":
                c.get(k, promote=rng.random() < 0.8)
            elif op == "demote":
                c.demote(k)
            elif op == "remove":
                c.remove(k)
            else:
                c.expire_idle(ttl_s=0, now=10**12) if rng.random() < 0.05 else None
            agrees(c, replay)
        kinds = {(src is None, dst is None, (src or 0) < (dst or 0)) for _, src, dst in replay.events}
        # entries entered, left, went down and came up again: every kind of move was exercised
        assert {(True, False, True), (False, True, False), (False, False, True), (False, False, False)} <= kinds


def test_a_failed_disk_write_is_heard_as_the_entry_leaving(tmp_path, monkeypatch):
    with store(tmp_path) as c:
        replay = Replay(c)
        disk = c.tiers[1]
        monkeypatch.setattr(disk, "write", lambda res: (disk.abort(res), False)[1])  # an I/O error: nothing stored
        keys = [prefix_key(NS, None, [i]) for i in range(10)]
        c.put_many([(k, torch.full((ELEMS,), float(i)), None) for i, k in enumerate(keys)])
        agrees(c, replay)
        # newest on top: the 6 newest fill the host tier, the 4 oldest went to disk and their writes failed
        assert [c.where(k) for k in keys] == [None] * 4 + ["host"] * 6
        assert [(k, src, dst) for k, src, dst in replay.events if dst is None] == [(k, 1, None) for k in keys[:4]]


def test_a_listener_added_late_starts_from_the_keys_and_hears_later_moves_only(tmp_path):
    with store(tmp_path) as c:
        first = prefix_key(NS, None, [0])
        c.put(first, torch.zeros(ELEMS))
        replay = Replay(c)  # seeded from keys(): what was stored before it
        assert replay.events == [] and replay.where == {first: "host"}
        c.demote(first)
        assert replay.events == [(first, 0, 1)]
        c.put(first, torch.ones(ELEMS))  # a new value stored on top: the disk copy leaves, the new value enters
        assert replay.events[1:] == [(first, 1, None), (first, None, 0)]
        c.put(first, torch.full((ELEMS,), 2.0))  # replaced in place: not a move
        assert len(replay.events) == 3
        c.remove(first)
        assert replay.events[-1] == (first, 0, None)
        agrees(c, replay)
