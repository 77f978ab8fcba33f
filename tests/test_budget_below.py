"""The device budget over a store whose last tier is the device tier (a Ray worker's): what it pushes out is
handed to the tier below (the node agent) in one batch, session tails included; entries the tier below
already holds are not sent again; one it refuses is counted as lost, never dropped silently. Victims are idle
sessions' entries first, then the device tier policy's own order (leaf-first: a chain keeps its head)."""

from __future__ import annotations

import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.engine.budget import DeviceBudget
from qwen3vl_ray.engine.prefix_kv import is_kv_chunk_shape
from qwen3vl_ray.keys import CacheKey, Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig

KiB = 1 << 10
NS = Namespace(model="budget-below", dtype="float32", layout="test")


class FakeBelow:
    """A tier below that records every batched call; ``refuse`` keys are not taken."""

    def __init__(self, holds=(), refuse=()):
        self.held: dict[CacheKey, tuple[torch.Tensor, CacheKey | None]] = {k: (torch.zeros(1), None) for k in holds}
        self.refuse = set(refuse)
        self.calls: list[tuple[str, int]] = []

    def contains_many(self, keys):
        self.calls.append(("contains_many", len(keys)))
        return [k in self.held for k in keys]

    def put_many(self, items):
        self.calls.append(("put_many", len(items)))
        out = []
        for k, t, p in items:
            if k not in self.refuse:
                self.held[k] = (t.clone(), p)
            out.append(k not in self.refuse)
        return out

    def get_many(self, keys):
        return [self.held[k][0] if k in self.held else None for k in keys]


def chain(n: int, tag: bytes) -> list[CacheKey]:
    keys, parent = [], None
    for i in range(n):
        parent = prefix_key(NS, parent, [i], tag)
        keys.append(parent)
    return keys


def kv(value: float) -> torch.Tensor:
    """A 1 KiB KV chunk ``[layers, 2, kv_heads, tokens, head_dim]``."""
    return torch.full((1, 2, 1, 128, 1), float(value))


def setup(below, idle=()):
    # a 4-entry device tier and nothing under it in the process; each entry is 1 KiB; ``idle``: idle
    # sessions' keys, most idle first
    store = TieredCache(CacheConfig(tiers=[TierConfig("device", 4 * KiB, block_bytes=KiB)], namespace=NS,
                                    prefetch_threads=0))
    budget = DeviceBudget(store, 4 * KiB, lambda: list(idle), below=below, hand_down=is_kv_chunk_shape)
    return store, budget


def put(store, keys, value):
    for i, k in enumerate(keys):
        assert store.put(k, kv(value + i), keys[i - 1] if i else None)


def test_pushed_out_entries_go_below_in_one_batch_and_written_through_ones_are_not_resent():
    full, tail = chain(2, b"s"), chain(3, b"s")[2]
    below = FakeBelow(holds=full)  # the session's full chunks were written through; its tail was not
    store, budget = setup(below, idle=full + [tail])
    put(store, full, 0)
    assert store.put(tail, kv(7.0), full[-1])
    other = chain(1, b"o")
    put(store, other, 10)
    # a request needing 3 KiB: idle session s goes first, all three of its entries leave the device
    assert budget.make_room(3 * KiB)
    assert [store.where(k) for k in full + [tail]] == [None, None, None] and store.where(other[0]) == "device"
    # one contains call and one put of the single entry the tier below lacked, with its chain parent
    assert below.calls == [("contains_many", 3), ("put_many", 1)]
    t, parent = below.held[tail]
    assert parent == full[-1] and torch.equal(t, kv(7.0))
    assert (budget.demoted, budget.spilled, budget.spilled_bytes, budget.lost) == (3, 1, KiB, 0)


def test_an_entry_the_tier_below_refuses_is_counted_lost_and_a_pinned_one_stays():
    keys = chain(3, b"s")
    below = FakeBelow(refuse=[keys[0]])
    store, budget = setup(below, idle=keys)
    put(store, keys, 0)
    with store.pinned([keys[1]]):
        assert budget.make_room(3 * KiB)  # 3 used + 3 needed > 4: two must leave, the pinned one cannot
    assert store.where(keys[1]) == "device"
    assert store.where(keys[0]) is None and store.where(keys[2]) is None
    assert keys[2] in below.held and keys[0] not in below.held
    assert (budget.spilled, budget.lost) == (1, 1)


def test_a_store_with_its_own_lower_tier_demotes_into_it_and_ignores_below():
    below = FakeBelow()
    store = TieredCache(CacheConfig(tiers=[TierConfig("device", 4 * KiB, block_bytes=KiB),
                                           TierConfig("host", 8 * KiB, block_bytes=KiB)], namespace=NS,
                                    prefetch_threads=0))
    keys = chain(3, b"s")
    budget = DeviceBudget(store, 4 * KiB, lambda: keys, below=below)
    put(store, keys, 0)
    assert budget.make_room(3 * KiB)
    assert [store.where(k) for k in keys] == ["host", "host", "device"] and below.calls == []


def test_a_device_tier_smaller_than_the_budget_keeps_room_for_what_the_request_stores():
    # budget 64 KiB, device tier 4 KiB: the budget alone never pushes anything out, but the request will
    # store 3 KiB of KV and the tier's own eviction would drop the session's entries (nothing under it)
    below = FakeBelow()
    store, _ = setup(below)
    keys = chain(3, b"s")
    budget = DeviceBudget(store, 64 * KiB, lambda: keys, below=below)
    put(store, keys, 0)
    prompt = chain(1, b"p")
    put(store, prompt, 20)  # the request's staged prefix: protected, and not stored again
    assert budget.make_room(4 * KiB, protect=prompt)
    # 4 used, 3 KiB to store (4 needed - 1 staged): three entries go down, the staged prefix stays
    assert store.where(prompt[0]) == "device" and [store.where(k) for k in keys] == [None] * 3
    assert set(below.held) == set(keys) and budget.lost == 0


def test_an_entry_that_is_no_kv_chunk_is_dropped_not_handed_down():
    # vision features ([1 + deepstack, tokens, hidden]): nothing reads them back from below
    below = FakeBelow()
    store, budget = setup(below)
    features = prefix_key(NS, None, [99], b"vision")
    assert store.put(features, torch.zeros(1, 256, 1))
    keys = chain(3, b"s")
    put(store, keys, 0)
    # 4 used + 2 needed > 4: the device tier policy's first two victims leave, leaf-first by recency: the
    # features, then the chain's tail (its head and middle stay: what is left is still a usable prefix)
    assert budget.make_room(2 * KiB)
    assert store.where(features) is None and store.where(keys[2]) is None
    assert [store.where(k) for k in keys[:2]] == ["device", "device"]
    assert set(below.held) == {keys[2]} and below.held[keys[2]][1] == keys[1]  # with its chain parent
    assert below.calls == [("contains_many", 1), ("put_many", 1)]
    assert (budget.demoted, budget.spilled, budget.lost) == (2, 1, 0)


def test_without_idle_sessions_victims_follow_the_device_policy_and_never_take_a_head_before_its_tail():
    below = FakeBelow()
    store, budget = setup(below)
    a, b = chain(2, b"a"), chain(2, b"b")
    put(store, a, 0)
    put(store, b, 10)
    store.get(a[0])  # the head of chain a is the most recent entry; plain LRU would take it first
    assert budget.make_room(3 * KiB)  # 4 used + 3 needed > 4: three leave
    # leaf-first LRU: the tails (a's is older), then b's head once it is a leaf, before a's more recent head
    assert [store.where(k) for k in a + b] == ["device", None, None, None]
    assert set(below.held) == {a[1], b[0], b[1]}
    assert below.held[a[1]][1] == a[0] and below.held[b[1]][1] == b[0] and below.held[b[0]][1] is None
    assert (budget.demoted, budget.spilled, budget.lost) == (3, 3, 0)


def test_idle_sessions_give_up_their_chunks_tail_first_and_keep_what_an_active_session_shares():
    import time

    from qwen3vl_ray.engine.sessions import Session, Sessions

    shared = chain(1, b"system")  # a system prompt both chats start with
    old, new, busy = (shared + chain(2, tag) for tag in (b"old", b"new", b"busy"))
    sessions = Sessions(store=None, prefix=None, idle_s=10.0)
    now = time.monotonic()
    for sid, keys, used in (("old", old, now - 100), ("new", new, now - 50), ("busy", busy, now)):
        sessions._sessions[sid] = Session(sid, chunk_keys=keys[:-1], tail_key=keys[-1], last_used=used)
    assert sessions.idle_order() == ["old", "new"]
    # most idle first, each from its tail; the shared head stays: the active chat still holds it
    assert list(sessions.idle_keys()) == [old[2], old[1], new[2], new[1]]


def test_idle_sessions_sharing_a_prefix_give_it_up_after_every_ones_own_chunks():
    from qwen3vl_ray.engine.sessions import Session, Sessions

    shared = chain(1, b"system")
    first, second = (shared + chain(1, tag) for tag in (b"first", b"second"))
    sessions = Sessions(store=None, prefix=None, idle_s=0.0)
    for sid, keys, used in (("first", first, 1.0), ("second", second, 2.0)):
        sessions._sessions[sid] = Session(sid, chunk_keys=keys[:-1], tail_key=keys[-1], last_used=used)
    # both idle, "first" the most: its own tail, then the other's tail, and the shared head last
    assert list(sessions.idle_keys()) == [first[1], second[1], shared[0]]


class KeepsTheHead(FakeBelow):
    """A last tier with room for ``room`` entries: it keeps a batch's head (``TieredCache``'s last-tier rule)."""

    def __init__(self, room):
        super().__init__()
        self.room = room
        self.order: list[CacheKey] = []

    def put_many(self, items):
        self.order += [k for k, _, _ in items]
        took = super().put_many(items[: self.room])
        return took + [False] * (len(items) - self.room)


def test_a_chain_goes_below_head_first_so_a_tier_that_takes_part_of_it_keeps_its_head():
    below = KeepsTheHead(room=2)
    keys = chain(3, b"s")
    store, budget = setup(below, idle=list(reversed(keys)))  # idle sessions' keys come tail first
    put(store, keys, 0)
    assert budget.make_room(4 * KiB)  # every entry must leave the device
    assert below.order == keys  # parents before children
    assert set(below.held) == set(keys[:2]) and budget.lost == 1  # the head and the next chunk stay usable
