"""``prefix-return``: chain-arc with hot chains ranked by predicted return gap. Scripted event sequences through
the policy API and through a real TieredCache; the registry."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.policy import ENTRY_BYTES, block_key, replay, replay_store, store_request
from qwen3vl_ray.policies import DEFAULT_POLICY, POLICIES, ChainARCPolicy, PrefixReturnPolicy, make_policy

from helpers_policies import ALL, drain, k, names


def insert(policy, *names_, first_parent=None):
    parent = first_parent
    for name in names_:
        policy.on_insert(k(name), 1, parent)
        parent = k(name)


def request(policy, *names_):
    """A request on a cached chain: every block is hit, first block first."""
    for name in names_:
        policy.on_hit(k(name))


def fixed(cls=PrefixReturnPolicy, **kw):
    """A policy whose cold penalty does not adapt (16 x entries), so a scripted order is exact."""
    return cls(penalty=16.0, max_penalty=16.0, step=0.0, **kw)


# -- registry -----------------------------------------------------------------------------------------

def test_registry_lists_prefix_return_and_keeps_the_default():
    assert "prefix-return" in POLICIES
    p = make_policy("prefix-return")
    assert isinstance(p, PrefixReturnPolicy) and p.name == "prefix-return" and len(p) == 0
    assert make_policy("prefix-return") is not p
    assert DEFAULT_POLICY == "prefix-lru"


@pytest.mark.parametrize("kw", [{"weight": -1}, {"free": -0.5}, {"history_factor": -1}, {"alpha": 0}, {"alpha": 1.5},
                                {"penalty": -1}])
def test_bad_parameters_are_refused(kw):
    with pytest.raises(ValueError):
        PrefixReturnPolicy(**kw)


# -- return-gap estimates -----------------------------------------------------------------------------

def test_a_chain_measures_its_gaps_at_its_first_block():
    p = PrefixReturnPolicy(alpha=0.5)
    insert(p, "a1", "a2", "a3")  # clock 1..3
    chain = p.chain_of(k("a1"))
    assert chain is p.chain_of(k("a3")) and chain.returns == 0 and chain.gap is None and not chain.hot
    request(p, "a1", "a2", "a3")  # the head at clock 4: one return, gap 3; the other blocks are the same request
    assert chain.returns == 1 and chain.gap == pytest.approx(3) and chain.hot
    insert(p, "x")  # clock 7
    request(p, "a1", "a2")  # clock 8: gap 4; the mean is taken in log space
    assert chain.returns == 2 and chain.gap == pytest.approx(math.exp((math.log(3) + math.log(4)) / 2))
    insert(p, "a4", first_parent=k("a3"))  # the tail a new turn appends continues the chain
    assert p.chain_of(k("a4")) is chain and p.chains == 2  # a and x


def test_a_branch_starts_its_own_chain():
    p = PrefixReturnPolicy()
    insert(p, "s", "x1")
    insert(p, "y1", "y2", first_parent=k("s"))  # s already has a cached child: y is a conversation of its own
    assert p.chain_of(k("x1")) is p.chain_of(k("s"))
    assert p.chain_of(k("y1")) is p.chain_of(k("y2")) is not p.chain_of(k("s"))
    assert p.chains == 2


def test_a_chain_that_returns_at_short_gaps_outlives_a_later_one_with_long_gaps():
    # b is inserted first; a comes back twice at gap 2; ten one-shot prompts; b comes back after 18 accesses.
    # b was used last, but its next request is predicted ~18 accesses away and a's ~2: b's tail goes first.
    def play(policy):
        insert(policy, "b1", "b2")
        insert(policy, "a1", "a2")
        request(policy, "a1", "a2")
        request(policy, "a1", "a2")
        for i in range(10):
            insert(policy, f"f{i}")
        request(policy, "b1", "b2")
        return policy

    p = play(fixed(weight=1.0))
    assert p.chain_of(k("a1")).gap == pytest.approx(2) and p.chain_of(k("b1")).gap == pytest.approx(18)
    order = names(drain(p))
    assert sorted(order[:10]) == sorted(f"f{i}" for i in range(10))  # one-shot (cold) chains first
    assert order[10:] == ["b2", "b1", "a2", "a1"]  # leaf-first, the long-gap chain before the short-gap one
    # chain-arc ranks the two hot chains by recency alone and drops a first
    assert names(drain(play(fixed(ChainARCPolicy))))[10:] == ["a2", "a1", "b2", "b1"]


def test_a_returning_chain_outlives_a_one_shot_chain_of_the_same_recency():
    p = fixed(weight=1.0)
    insert(p, "a1", "a2")
    request(p, "a1", "a2")  # a came back (gap 2)
    insert(p, "n1", "n2")  # a new chain, used after a
    assert names(drain(p)) == ["n2", "n1", "a2", "a1"]


def test_the_gap_term_never_ranks_a_hot_chain_below_a_cold_one():
    # a's gap (~500 accesses) is far beyond the cold penalty (16 x entries): it is capped there, so cold chains
    # used after a still go first
    p = fixed(weight=1.0)
    insert(p, "a1")
    for i in range(500):
        insert(p, f"f{i}")
        p.on_evict(k(f"f{i}"))
    request(p, "a1")
    insert(p, "n1")
    insert(p, "m1")
    assert p.chain_of(k("a1")).gap > 16 * 3
    order = names(drain(p))
    assert sorted(order[:2]) == ["m1", "n1"] and order[2] == "a1"


# -- leaf-first, pins, bounded state ------------------------------------------------------------------

def test_a_chain_shrinks_from_its_tail():
    p = fixed(weight=1.0)
    insert(p, "a", "b", "c")
    request(p, "a", "b", "c")
    insert(p, "s", "x")
    insert(p, "y", first_parent=k("s"))
    request(p, "s", "y")
    order = names(drain(p))
    for before, after in (("c", "b"), ("b", "a"), ("x", "s"), ("y", "s")):
        assert order.index(before) < order.index(after), order


def test_victims_skip_keys_that_are_not_evictable():
    p = fixed(weight=1.0)
    insert(p, "a1", "a2")
    request(p, "a1", "a2")
    insert(p, "n1", "n2")
    pinned = {k("n2"), k("a1")}
    # n2 (the lowest leaf) is pinned and skipped; then a2; then the interior fallback: n1, not the pinned a1
    assert names(drain(p, lambda key: key not in pinned, remove=False)) == ["a2", "n1"]
    assert len(p) == 4  # a walk that removes nothing loses nothing
    assert sorted(names(drain(p))) == ["a1", "a2", "n1", "n2"]


def test_a_chain_record_lives_as_long_as_its_first_block():
    p = PrefixReturnPolicy()
    insert(p, "a1", "a2")
    insert(p, "b1", "b2")
    insert(p, "c1")
    assert p.chains == 3 and p.history == 0
    p.on_delete(k("b2"))
    assert p.chains == 3  # a tail leaving keeps the record
    p.on_delete(k("b1"))  # removed by a caller: the record goes with it
    p.on_promote(k("c1"))  # moved up a tier: the same
    assert p.chains == 1 and p.history == 0
    p.on_evict(k("a2"))
    p.on_evict(k("a1"))  # evicted by this tier: the record moves to the history table
    assert p.chains == 0 and p.history == 1
    insert(p, "a1")  # the chain comes back after its blocks were evicted: its gap is measured
    chain = p.chain_of(k("a1"))
    assert p.history == 0 and p.chains == 1 and chain.returns == 1 and chain.hot and chain.gap > 1


def test_the_history_table_is_bounded():
    p = PrefixReturnPolicy(history_factor=4.0)
    for i in range(3000):
        insert(p, f"h{i}")
        p.on_evict(k(f"h{i}"))
    assert p.chains == 0 and p.history == 1024  # the floor: max(1024, 4 x live chains)
    assert len(p) == 0


# -- through a real TieredCache ------------------------------------------------------------------------

def _store_run(policy, trace, capacity):
    data = torch.zeros(ENTRY_BYTES, dtype=torch.uint8)
    out = torch.empty_like(data)
    cache = replay_store(policy, capacity)
    try:
        for req in trace:
            store_request(cache, [block_key(b) for b in req], data, out)
        return {b for b in (1, 2, 3, 4, 5) if cache.contains(block_key(b))}
    finally:
        cache.close()


def test_in_the_store_the_long_gap_chain_makes_room():
    # blocks 1 -> 2 (chain b), 3 -> 4 (chain a), room for 4. b, then a twelve times, then b again (its gap
    # ~26 accesses, a's 2), then a one-block prompt 5 needs a slot
    trace = [[1, 2]] + [[3, 4]] * 12 + [[1, 2], [5]]
    assert _store_run(make_policy("prefix-return"), trace, 4) == {1, 3, 4, 5}  # b's tail went
    assert _store_run(make_policy("chain-arc"), trace, 4) == {1, 2, 3, 5}  # recency: a's tail went
    # a comes back next: its whole prefix is still there
    assert replay(make_policy("prefix-return"), trace + [[3, 4]], 4) > replay(make_policy("chain-arc"),
                                                                              trace + [[3, 4]], 4)


def test_in_the_store_a_requests_own_blocks_are_never_victims():
    # with 2 slots a 3-block request finds nothing evictable for its last block (its first two are pinned)
    assert replay(make_policy("prefix-return"), [[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(2 / 6)
