"""A put that overflows the host tier demotes into free disk space instead of dropping (issue 10).

Driven the way the KV connector's local store drives the cache (``serving.block_store.LocalBlockStore``): a
host tier and a disk tier, whole prompts saved with ``put_many`` (chained blocks), loads through ``get``
(which promotes a disk hit into host) from another thread while saves go on, a prompt pinned while it is
read, and a clean close that moves host down to disk. The host tier holds 4 blocks, each prompt 8: every
save overflows it, and the 64-block disk tier below always has room, so nothing may be dropped.
"""

import threading

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="store-overflow")
ELEMS = 1024  # float32 -> 4 KiB per block
HOST_BLOCKS, DISK_BLOCKS, PROMPT = 4, 64, 8


def prompt(tag: int) -> tuple[list, list]:
    """One request's blocks: chained keys and ``(key, tensor, parent)`` items, values unique per block."""
    keys, items, parent = [], [], None
    for i in range(PROMPT):
        k = prefix_key(NS, parent, [tag, i])
        items.append((k, torch.arange(ELEMS, dtype=torch.float32) + 1000 * tag + i, parent))
        keys.append(k)
        parent = k
    return keys, items


def connector_store(tmp_path, policy) -> TieredCache:
    tiers = [TierConfig("host", HOST_BLOCKS * ELEMS * 4, block_bytes=512),
             TierConfig("disk", DISK_BLOCKS * (ELEMS * 4 + 512), path=str(tmp_path / "disk"), fsync=False)]
    return TieredCache(CacheConfig(tiers=tiers, policy=policy, namespace=NS, prefetch_threads=0))


def assert_nothing_dropped_and_exact(c: TieredCache, prompts: dict) -> None:
    s = c.stats()
    assert s["dropped"] == 0 and [t["evictions"] for t in s["tiers"]] == [0, 0]
    for t in c.tiers:
        assert 0 <= t.used_bytes <= t.capacity_bytes
    for tag, (keys, items) in prompts.items():
        assert c.longest_prefix(keys) == PROMPT, tag
        for k, t, _ in items:
            assert torch.equal(c.get(k, promote=False), t)


@pytest.mark.parametrize("policy", [None, "lru"])  # None: the default (prefix-lru, leaf first)
def test_saves_overflowing_host_while_another_thread_loads_go_down_to_disk(tmp_path, policy):
    with connector_store(tmp_path, policy) as c:
        prompts = {1: prompt(1)}
        assert c.put_many(prompts[1][1]) == [True] * PROMPT
        stop, wrong = threading.Event(), []

        def loader():
            # loads of prompt 1 promote its disk blocks into host, pushing others down, while saves run
            keys, items = prompts[1]
            while not stop.is_set():
                for k, (_, t, _) in zip(keys, items):
                    got = c.get(k)
                    if got is None or not torch.equal(got, t):
                        wrong.append(k)

        th = threading.Thread(target=loader)
        th.start()
        try:
            for tag in range(2, 7):
                # a save of 8 blocks into a 4-block host tier: every one is kept
                prompts[tag] = prompt(tag)
                assert c.put_many(prompts[tag][1]) == [True] * PROMPT
        finally:
            stop.set()
            th.join(30)
        assert wrong == []
        # 6 prompts of 8 blocks: 4 in host, the other 44 on disk
        assert [t["entries"] for t in c.stats()["tiers"]] == [HOST_BLOCKS, 6 * PROMPT - HOST_BLOCKS]
        assert_nothing_dropped_and_exact(c, prompts)


@pytest.mark.parametrize("policy", [None, "lru"])
def test_a_put_whose_room_another_thread_takes_before_its_write_goes_on_to_disk(tmp_path, policy):
    """The race the threaded test above hits about once in 15 runs, made deterministic: a put into a full host
    tier plans room (a victim staged, its bytes read out in the write rounds), and between that victim's
    read-out and the put's room being held another thread takes the freed room and pins what is left in host
    (as its loads' promotions in flight do). The put goes on to disk, as a tier's refusal at planning time
    sends it: it is stored, not returned False."""
    with connector_store(tmp_path, policy) as c:
        prompts = {1: prompt(1)}
        assert c.put_many(prompts[1][1]) == [True] * PROMPT
        other_keys, other_items = prompt(2)
        late_key, late_item = other_keys[0], other_items[0]
        taker_key, taker = prefix_key(NS, None, [99, 0]), torch.full((ELEMS,), -1.0)
        sources_read, took = c._movers._sources_read, []

        def then_another_thread_takes_the_room(writes):
            sources_read(writes)  # the victim's host room is free again
            if not took:
                took.append(True)
                assert c.put(taker_key, taker)  # takes the free host block
                assert c.where(taker_key) == "host"
                for k in [k for k in prompts[1][0] + [taker_key] if c.where(k) == "host"]:
                    assert c.pin(k)

        c._movers._sources_read = then_another_thread_takes_the_room
        assert c.put_many([late_item]) == [True]
        assert took and c.where(late_key) == "disk"
        assert torch.equal(c.get(late_key, promote=False), late_item[1])
        assert torch.equal(c.get(taker_key, promote=False), taker)
        assert c.stats()["dropped"] == 0
        assert_nothing_dropped_and_exact(c, prompts)


def test_a_head_read_while_its_put_goes_down_and_promoted_back_before_the_read_ends_stays_evictable(tmp_path):
    """The race above with a reader and a chain: a block's child waits in host, the block's own put loses its
    room and goes on to disk while a reader copies the staged bytes, and a later read promotes the block back
    into host before the first reader finishes. The default policy keeps a departed head's record for its next
    stay (its child stays linked); the reader still holds that record, so the new stay must get its own: else
    the reader's release lands on the new stay (its in-flight count at -1: never evictable, never removable)."""
    with connector_store(tmp_path, None) as c:
        prompts = {1: prompt(1)}
        assert c.put_many(prompts[1][1]) == [True] * PROMPT
        head, child = prefix_key(NS, None, [7, 0]), prefix_key(NS, prefix_key(NS, None, [7, 0]), [7, 1])
        head_t, child_t = torch.full((ELEMS,), 7.0), torch.full((ELEMS,), 8.0)
        assert c.put_many([(child, child_t, head)]) == [True]  # the child first: it waits on its head's key
        assert c.where(child) == "host"
        taker_key, taker = prefix_key(NS, None, [99, 0]), torch.full((ELEMS,), -1.0)
        sources_read, held, reads = c._movers._sources_read, [], []

        def then_another_thread_takes_the_room_and_a_reader_starts(writes):
            sources_read(writes)
            if not held:
                assert c.put(taker_key, taker)
                held.extend(k for k in prompts[1][0] + [taker_key, child] if c.where(k) == "host")
                for k in held:
                    assert c.pin(k)
                reads.append(c.manager.begin_load(head))  # a reader of the head's staged bytes

        c._movers._sources_read = then_another_thread_takes_the_room_and_a_reader_starts
        assert c.put_many([(head, head_t, None)]) == [True]
        c._movers._sources_read = sources_read
        assert c.where(head) == "disk" and reads and reads[0] is not None
        for k in held:
            assert c.unpin(k)
        assert torch.equal(c.get(head), head_t) and c.where(head) == "host"  # promoted back
        assert c.manager.end_load(head, reads[0], head_t.clone(), False, None, []) is not None  # the first read ends
        assert c.longest_prefix([head, child]) == 2
        assert c.demote(head)  # evictable: nothing holds its new stay
        assert c.where(head) == "disk" and torch.equal(c.get(head, promote=False), head_t)
        assert c.stats()["dropped"] == 0


@pytest.mark.parametrize("policy", [None, "lru"])
def test_a_save_while_a_prompt_is_pinned_in_host_lands_on_disk(tmp_path, policy):
    with connector_store(tmp_path, policy) as c:
        prompts = {1: prompt(1), 2: prompt(2)}
        assert c.put_many(prompts[1][1]) == [True] * PROMPT
        held = [k for k in prompts[1][0] if c.where(k) == "host"]
        assert len(held) == HOST_BLOCKS
        # the loaded prompt's host blocks are pinned (a load in progress): host cannot make room, the
        # whole new save goes to the disk tier instead of being refused or dropped
        with c.pinned(held):
            assert c.put_many(prompts[2][1]) == [True] * PROMPT
            assert [c.where(k) for k in prompts[2][0]] == ["disk"] * PROMPT
        assert_nothing_dropped_and_exact(c, prompts)


def test_close_moves_every_host_block_down_to_disk_and_a_new_store_serves_them(tmp_path):
    prompts = {1: prompt(1), 2: prompt(2)}
    with connector_store(tmp_path, None) as c:
        for _, items in prompts.values():
            assert c.put_many(items) == [True] * PROMPT
        # what the connector's store does at a clean exit: host memory dies with the process
        assert c.relieve("host", 0) == HOST_BLOCKS * ELEMS * 4
        assert [t["entries"] for t in c.stats()["tiers"]] == [0, 2 * PROMPT]
        assert c.stats()["dropped"] == 0
    with connector_store(tmp_path, None) as again:
        assert_nothing_dropped_and_exact(again, prompts)
