import os

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig

ENTRY = 1024  # float32 elements -> 4 KiB per entry
BLOCK = 512
NS = Namespace(model="test-model")


def key(i: int):
    return prefix_key(NS, None, [i])


def tensor(i: int) -> torch.Tensor:
    return torch.full((ENTRY,), float(i)) + torch.arange(ENTRY, dtype=torch.float32)


def make_cache(tmp_path, host_entries=3, disk_entries=None, policy="lru", ns=NS, **kw) -> TieredCache:
    tiers = [TierConfig("host", host_entries * ENTRY * 4, block_bytes=BLOCK)]
    if disk_entries:
        # a disk entry is its payload plus a small header; leave room for exactly disk_entries
        tiers.append(TierConfig("disk", disk_entries * (ENTRY * 4 + 512), path=str(tmp_path / "disk")))
    return TieredCache(CacheConfig(tiers=tiers, policy=policy, namespace=ns, **kw))


def test_put_get_roundtrip_and_where(tmp_path):
    with make_cache(tmp_path) as c:
        assert c.put(key(1), tensor(1))
        assert c.where(key(1)) == "host" and c.contains(key(1))
        assert torch.equal(c.get(key(1)), tensor(1))
        assert c.get(key(2)) is None
        s = c.stats()
        assert (s["hits"], s["misses"], s["entries"]) == (1, 1, 1)


def test_full_top_tier_demotes_lru_victim_and_hit_promotes_it_back(tmp_path):
    with make_cache(tmp_path, host_entries=3, disk_entries=10) as c:
        for i in range(3):
            assert c.put(key(i), tensor(i))
        c.get(key(0))  # 0 is now most recent; 1 is the LRU entry
        # put a 4th entry into a 3-slot host tier -> the LRU one (1) is demoted to disk
        assert c.put(key(3), tensor(3))
        assert [c.where(key(i)) for i in range(4)] == ["host", "disk", "host", "host"]
        # a hit on disk promotes it to host, which demotes host's LRU entry (2)
        t, tier = c.lookup(key(1))
        assert tier == "disk" and torch.equal(t, tensor(1))
        assert c.where(key(1)) == "host" and c.where(key(2)) == "disk"
        tiers = c.stats()["tiers"]
        assert tiers[0]["promotions_in"] == 1 and tiers[1]["demotions_in"] == 2


def test_last_tier_drops_and_counts(tmp_path):
    with make_cache(tmp_path, host_entries=2) as c:
        for i in range(3):
            c.put(key(i), tensor(i))
        assert c.where(key(0)) is None and len(c) == 2
        assert c.stats()["dropped"] == 1 and c.stats()["tiers"][0]["evictions"] == 1


def test_pinned_entries_are_never_evicted_and_failed_put_loses_nothing(tmp_path):
    with make_cache(tmp_path, host_entries=2) as c:
        c.put(key(0), tensor(0))
        c.put(key(1), tensor(1))
        assert c.pin(key(0)) and c.pin(key(1))
        # everything is pinned: no room is a normal outcome, and both old entries survive
        assert c.put(key(2), tensor(2)) is False
        assert torch.equal(c.get(key(0)), tensor(0)) and torch.equal(c.get(key(1)), tensor(1))
        c.unpin(key(0))
        assert c.put(key(2), tensor(2))
        assert c.where(key(0)) is None and c.where(key(1)) == "host"


def test_replacing_a_key_keeps_one_copy(tmp_path):
    with make_cache(tmp_path, host_entries=2, disk_entries=4) as c:
        c.put(key(0), tensor(0))
        c.demote(key(0))
        assert c.where(key(0)) == "disk"
        assert c.put(key(0), tensor(5))
        assert c.where(key(0)) == "host" and len(c) == 1
        assert torch.equal(c.get(key(0)), tensor(5))
        assert c.stats()["tiers"][1]["entries"] == 0


def test_bad_calls_raise_clear_errors(tmp_path):
    with make_cache(tmp_path, host_entries=1) as c:
        with pytest.raises(CapacityError):
            c.put(key(0), torch.zeros(ENTRY * 4))  # 4x larger than the only tier
        with pytest.raises(TypeError, match="bytes"):
            c.put("not-a-key", tensor(0))
        with pytest.raises(TypeError, match="Tensor"):
            c.put(key(0), [1, 2, 3])
        with pytest.raises(ConfigError, match="unknown tier"):
            c.relieve("gpu9", 0)
    with pytest.raises(ConfigError, match="capacity_bytes"):
        TierConfig("host", 0)
    with pytest.raises(ConfigError, match="unknown tier kind"):
        TierConfig("ssd", 10)
    with pytest.raises(ConfigError):
        make_cache(tmp_path, policy="no-such-policy")
    with pytest.raises(ConfigError, match="at least one tier"):
        CacheConfig(tiers=[], namespace=NS)
    with pytest.raises(ConfigError, match="namespace must be a keys.Namespace"):
        CacheConfig(tiers=[TierConfig("host", 1 << 20)])


def test_prefetch_moves_entries_up_without_blocking(tmp_path):
    with make_cache(tmp_path, host_entries=3, disk_entries=10) as c:
        for i in range(6):
            c.put(key(i), tensor(i))
        on_disk = [key(i) for i in range(6) if c.where(key(i)) == "disk"]
        assert len(on_disk) == 3
        fut = c.prefetch(on_disk[:2])
        assert fut.result(timeout=30) == 2
        assert [c.where(k) for k in on_disk[:2]] == ["host", "host"]
        for i in range(6):
            assert torch.equal(c.get(key(i), promote=False), tensor(i))


def test_longest_prefix_stops_at_first_gap(tmp_path):
    with make_cache(tmp_path, host_entries=3) as c:
        chain = [key(i) for i in range(4)]
        c.put(chain[0], tensor(0))
        c.put(chain[1], tensor(1), parent=chain[0])
        c.put(chain[3], tensor(3), parent=chain[2])
        assert c.longest_prefix(chain) == 2


def test_disk_entries_survive_restart_and_namespaces_are_isolated(tmp_path):
    with make_cache(tmp_path, host_entries=1, disk_entries=10) as c:
        for i in range(4):
            c.put(key(i), tensor(i))
        on_disk = [i for i in range(4) if c.where(key(i)) == "disk"]
    assert len(on_disk) == 3
    with make_cache(tmp_path, host_entries=1, disk_entries=10) as c2:
        for i in on_disk:
            assert torch.equal(c2.get(key(i)), tensor(i))
    other = Namespace(model="another-model")
    with make_cache(tmp_path, host_entries=1, disk_entries=10, ns=other) as c3:
        assert len(c3) == 0 and all(c3.get(key(i)) is None for i in range(4))


def test_corrupt_disk_entry_is_a_miss_not_data(tmp_path):
    with make_cache(tmp_path, host_entries=1, disk_entries=10) as c:
        c.put(key(0), tensor(0))
        c.put(key(1), tensor(1))
        assert c.where(key(0)) == "disk"
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "disk") for f in fs]
    assert len(files) == 1
    with open(files[0], "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff" * 10)
    with make_cache(tmp_path, host_entries=1, disk_entries=10) as c2:
        assert c2.get(key(0)) is None
        assert c2.where(key(0)) is None


def test_expire_idle_drops_only_idle_unpinned(tmp_path):
    with make_cache(tmp_path, host_entries=3, idle_ttl_s=10.0) as c:
        c.put(key(0), tensor(0))
        c.put(key(1), tensor(1))
        c.pin(key(1))
        import time

        assert c.expire_idle(now=time.monotonic() + 5) == 0
        assert c.expire_idle(now=time.monotonic() + 20) == 1
        assert c.where(key(0)) is None and c.where(key(1)) == "host"


def test_relieve_drains_to_target(tmp_path):
    with make_cache(tmp_path, host_entries=4, disk_entries=10) as c:
        for i in range(4):
            c.put(key(i), tensor(i))
        freed = c.relieve("host", 2 * ENTRY * 4)
        assert freed == 2 * ENTRY * 4
        assert sum(c.where(key(i)) == "disk" for i in range(4)) == 2


def test_victims_name_what_the_policy_would_move_out_first_and_move_nothing(tmp_path):
    with make_cache(tmp_path, host_entries=5, disk_entries=10, policy="prefix-lru") as c:
        c.put(key(9), tensor(9))  # a lone entry, the oldest
        for i in range(4):  # one chain: 0 <- 1 <- 2 <- 3
            c.put(key(i), tensor(i), parent=key(i - 1) if i else None)
        one = ENTRY * 4
        assert c.victims("host", 0) == []
        assert c.victims("host", 2 * one) == [key(9), key(3)]
        # leaf-first even in a long walk: a parent comes once all its children were named, never a head first
        assert c.victims("host", 100 * one) == [key(9), key(3), key(2), key(1), key(0)]
        assert c.victims("host", 2 * one, skip={key(9)}) == [key(3), key(2)]
        with c.pinned([key(3)]):  # not evictable: left out, and its chain with it while a leaf is left
            assert c.victims("host", one) == [key(9)]
        assert [c.where(k) for k in (key(9), key(0), key(1), key(2), key(3))] == ["host"] * 5  # nothing moved
        with pytest.raises(ConfigError, match="unknown tier 'nvme'"):
            c.victims("nvme", one)


def test_touch_counts_a_hit_and_refreshes_recency(tmp_path):
    with make_cache(tmp_path, host_entries=3, disk_entries=10) as c:
        for i in range(3):
            c.put(key(i), tensor(i))
        # a hit served outside the copy path (an object-store handle) still counts as the latest use of 0
        assert c.touch(key(0)) and not c.touch(key(9))
        c.put(key(3), tensor(3))
        assert c.where(key(0)) == "host" and c.where(key(1)) == "disk"
        assert c.stats()["tiers"][0]["hits"] == 1


def test_compressing_host_and_disk_tiers_read_back_within_bound(tmp_path):
    from qwen3vl_ray.codecs import make_codec

    # host int8, disk int8+zstd: entries demoted through both come back within the codecs' declared bound
    cfg = CacheConfig(tiers=[
        TierConfig("host", 2 * ENTRY * 4, block_bytes=BLOCK, codec="int8"),
        TierConfig("disk", 1 << 20, path=str(tmp_path / "disk"), codec="int8+zstd"),
    ], policy="lru", namespace=NS)
    x = {i: torch.randn(4, ENTRY // 4) * (i + 1) for i in range(8)}
    with TieredCache(cfg) as c:
        for i, t in x.items():
            assert c.put(key(i), t)
        # int8 payloads are ~1/4 of fp32, so the host tier holds more entries than its raw size allows
        assert sum(c.where(key(i)) == "host" for i in x) > 2
        assert any(c.where(key(i)) == "disk" for i in x)
        bound = make_codec("int8").error_bound
        for i, t in x.items():
            got = c.get(key(i), promote=False)
            assert got.shape == t.shape and got.dtype == t.dtype
            rel = float((got - t).norm() / t.norm())
            # demoted entries were quantized twice at most (host int8, then disk int8 of the dequantized copy)
            assert rel <= 2 * bound(t) + 1e-6, (i, rel)


def test_concurrent_readers_and_writers_keep_one_copy_and_exact_values(tmp_path):
    import threading

    # readers promote from disk while writers demote: every entry stays in exactly one tier, the tiers'
    # byte accounting matches the index, and every value read is exactly what was put under its key
    with make_cache(tmp_path, host_entries=3, disk_entries=40) as c:
        for i in range(12):
            c.put(key(i), tensor(i))
        errors = []

        def reader(seed):
            import random

            rng = random.Random(seed)
            for _ in range(150):
                i = rng.randrange(12)
                got = c.get(key(i))
                if got is not None and not torch.equal(got, tensor(i)):
                    errors.append(i)

        def writer():
            for n in range(150):
                c.demote(key(n % 12))

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for i in range(12):
            holders = [t.name for t in c.tiers if t.contains(key(i))]
            assert holders == ([c.where(key(i))] if c.where(key(i)) else []), (i, holders)
        for t in c.tiers:
            assert t.used_bytes == sum(t.entry_nbytes(k) for k in list(t.keys()))
            assert t.used_bytes <= t.capacity_bytes


def test_a_reader_finishing_first_does_not_promote_an_entry_another_reader_is_copying(tmp_path):
    import threading

    # Regression (CI flake): reader A finished, promoted the disk entry to host and deleted the disk file
    # while reader B was still about to read it; B saw None, took it for a lost entry and forgot the index
    # record, leaving host holding an entry the cache no longer knew.
    with make_cache(tmp_path, host_entries=3, disk_entries=10) as c:
        for i in range(4):
            c.put(key(i), tensor(i))
        assert c.where(key(0)) == "disk"
        disk = c.tiers[1]
        real_get = disk.get
        b_entered, a_done = threading.Event(), threading.Event()

        def gated_get(k, *args, **kw):
            if threading.current_thread().name == "reader-b":
                b_entered.set()
                assert a_done.wait(10)
            return real_get(k, *args, **kw)

        disk.get = gated_get
        results = {}
        b = threading.Thread(target=lambda: results.setdefault("b", c.get(key(0))), name="reader-b")
        b.start()
        assert b_entered.wait(10)
        results["a"] = c.get(key(0))
        a_done.set()
        b.join(10)
        assert torch.equal(results["a"], tensor(0)) and torch.equal(results["b"], tensor(0))
        # B's copy was valid, then the entry is promoted by B (the last reader out): one holder, indexed.
        holders = [t.name for t in c.tiers if t.contains(key(0))]
        assert holders == [c.where(key(0))] == ["host"]


def test_replacing_in_a_full_tier_evicts_nothing_else(tmp_path):
    with make_cache(tmp_path, host_entries=3) as c:
        for i in range(3):
            c.put(key(i), tensor(i))
        # replacing an entry of a full tier reuses its own room: the other two stay
        assert c.put(key(1), tensor(7))
        assert [c.where(key(i)) for i in range(3)] == ["host", "host", "host"]
        assert torch.equal(c.get(key(1)), tensor(7))


def test_codec_refusing_a_victim_does_not_fail_an_unrelated_put(tmp_path):
    # the host tier's KV-layout codec refuses a non-KV tensor: the victim is dropped, the put succeeds
    cfg = CacheConfig(tiers=[TierConfig("device", 2 * ENTRY * 4, device="cpu", block_bytes=BLOCK),
                             TierConfig("host", 1 << 20, codec="kv-int8", block_bytes=BLOCK)],
                      policy="lru", namespace=NS)
    with TieredCache(cfg) as c:
        assert c.put(key(0), tensor(0)) and c.put(key(1), tensor(1))
        assert c.put(key(2), tensor(2))
        assert c.where(key(0)) is None and c.where(key(2)) == "device"
        assert c.stats()["dropped"] == 1


def test_get_into_a_callers_buffer_from_any_tier(tmp_path):
    with make_cache(tmp_path, host_entries=2, disk_entries=10) as c:
        for i in range(4):
            c.put(key(i), tensor(i))
        assert c.where(key(0)) == "disk"
        buf = torch.empty(ENTRY)
        got, tier = c.lookup(key(0), out=buf)
        assert got is buf and tier == "disk" and torch.equal(buf, tensor(0))
        assert c.where(key(0)) == "host"  # promoted from the caller's buffer; the buffer is free to reuse
        buf.zero_()
        assert torch.equal(c.get(key(0)), tensor(0))
        assert c.get(key(3), out=buf) is buf and torch.equal(buf, tensor(3))
        where = {i: c.where(key(i)) for i in range(4)}
        with pytest.raises(ValueError, match="out is"):
            c.get(key(1), out=torch.empty(ENTRY, dtype=torch.float16))
        assert {i: c.where(key(i)) for i in range(4)} == where and torch.equal(c.get(key(1)), tensor(1))


def chain(n: int, tag: int = 0) -> tuple[list, list]:
    """One request's prompt: ``n`` chained chunk keys and their ``(key, tensor, parent)`` items."""
    keys, items, parent = [], [], None
    for i in range(n):
        k = prefix_key(NS, parent, [tag, i])
        items.append((k, tensor(100 * tag + i), parent))
        keys.append(k)
        parent = k
    return keys, items


def make_three_tier_cache(tmp_path, policy, device_entries=4, host_entries=4, disk_entries=32) -> TieredCache:
    tiers = [TierConfig("device", device_entries * ENTRY * 4, device="cpu", block_bytes=BLOCK),
             TierConfig("host", host_entries * ENTRY * 4, block_bytes=BLOCK),
             TierConfig("disk", disk_entries * (ENTRY * 4 + 512), path=str(tmp_path / "disk"))]
    return TieredCache(CacheConfig(tiers=tiers, policy=policy, namespace=NS, prefetch_threads=0))


def assert_all_cached_exact(c: TieredCache, keys, tag: int = 0) -> None:
    for t in c.tiers:
        assert 0 <= t.used_bytes <= t.capacity_bytes, (t.name, t.used_bytes, t.capacity_bytes)
    assert c.longest_prefix(keys) == len(keys)
    for i, k in enumerate(keys):
        assert torch.equal(c.get(k, promote=False), tensor(100 * tag + i))


@pytest.mark.parametrize("policy", [None, "lru"])  # None: the default (prefix-lru)
@pytest.mark.parametrize("batched", [False, True])
def test_a_put_overflowing_the_host_tier_demotes_into_free_disk_space(tmp_path, policy, batched):
    with make_cache(tmp_path, host_entries=4, disk_entries=32, policy=policy) as c:
        keys, items = chain(16)
        # one prompt of 16 chunks into a 4-slot host tier over an empty 32-slot disk tier
        stored = c.put_many(items) if batched else [c.put(*item) for item in items]
        assert stored == [True] * 16
        # nothing dropped: the 4 newest stay in host, the 12 older are on disk: one put at a time, each went
        # through host and was demoted; one batch sends them straight to disk (newest on top, no host copy)
        assert [c.where(k) for k in keys] == ["disk"] * 12 + ["host"] * 4
        s = c.stats()
        assert s["dropped"] == 0 and s["tiers"][1]["demotions_in"] == (0 if batched else 12)
        assert s["tiers"][1]["entries"] == 12 and s["tiers"][0]["evictions"] == 0
        assert_all_cached_exact(c, keys)


@pytest.mark.parametrize("policy", [None, "lru"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_victim_skips_a_tier_that_cannot_make_room_instead_of_being_dropped(tmp_path, policy, batched):
    with make_three_tier_cache(tmp_path, policy) as c:
        # fill the 4-slot host tier with a prompt that is being read (pinned)
        held, held_items = chain(4, tag=1)
        assert c.put_many(held_items) == [True] * 4
        assert all(c.demote(k) for k in held) and [c.where(k) for k in held] == ["host"] * 4
        with c.pinned(held):
            keys, items = chain(8)
            # 8 new chunks into the 4-slot device tier: its victims cannot go to the pinned host tier -> disk
            # (batched: two batches of 4, so the second one's victims are the first one's chunks)
            stored = c.put_many(items[:4]) + c.put_many(items[4:]) if batched else [c.put(*item) for item in items]
            assert stored == [True] * 8
            assert [c.where(k) for k in keys] == ["disk"] * 4 + ["device"] * 4
            assert [c.where(k) for k in held] == ["host"] * 4
        s = c.stats()
        assert s["dropped"] == 0 and s["tiers"][2]["demotions_in"] == 4
        assert_all_cached_exact(c, keys)
        assert_all_cached_exact(c, held, tag=1)


@pytest.mark.parametrize("policy", [None, "lru"])
def test_reading_a_pinned_prompt_longer_than_the_host_tier_drops_nothing(tmp_path, policy):
    with make_three_tier_cache(tmp_path, policy) as c:
        prompt, prompt_items = chain(8, tag=2)
        other, other_items = chain(4, tag=3)
        assert c.put_many(prompt_items) == [True] * 8 and c.put_many(other_items) == [True] * 4
        # the prompt lies in host (full) and disk; another prompt fills the device tier
        assert [c.where(k) for k in prompt] == ["disk"] * 4 + ["host"] * 4
        assert [c.where(k) for k in other] == ["device"] * 4
        # read it as the engine does (pinned, promote on hit): each promotion into the device tier pushes a
        # chunk of the other prompt out, past the host tier full of pinned chunks, down to disk
        with c.pinned(prompt):
            for i, k in enumerate(prompt):
                got, _ = c.lookup(k)
                assert torch.equal(got, tensor(200 + i))
        assert [c.where(k) for k in other] == ["disk"] * 4
        assert c.stats()["dropped"] == 0
        assert_all_cached_exact(c, prompt, tag=2)
        assert_all_cached_exact(c, other, tag=3)


def fill_host_tier(c: TieredCache) -> list:
    """Store a 4-chunk chain and demote it into the host tier (4 entries: full); its keys, for the caller to pin
    as a prompt being read is."""
    held, held_items = chain(4, tag=1)
    assert c.put_many(held_items) == [True] * 4
    assert all(c.demote(k) for k in held)
    return held


def test_a_victim_skipping_a_pinned_tier_still_leaves_a_usable_prefix_with_the_default_policy(tmp_path):
    with make_three_tier_cache(tmp_path, None, disk_entries=2) as c:
        held = fill_host_tier(c)
        with c.pinned(held):
            keys, items = chain(8)
            assert c.put_many(items[:4]) == [True] * 4
            # the next 4 push those 4 out of the device tier; they skip the pinned host tier into a 2-slot disk
            # tier, all written after the lock in one go, yet 2 are dropped tails first, as one at a time
            assert c.put_many(items[4:]) == [True] * 4
        assert [c.where(k) for k in keys] == ["disk"] * 2 + [None] * 2 + ["device"] * 4
        s = c.stats()
        assert s["dropped"] == 2 and s["tiers"][2]["evictions"] == 2 and c.longest_prefix(keys) == 2
        assert_all_cached_exact(c, keys[:2])


def test_a_batch_overflowing_every_tier_keeps_its_head_in_the_last_one(tmp_path):
    with make_three_tier_cache(tmp_path, None, disk_entries=2) as c:
        held = fill_host_tier(c)
        with c.pinned(held):
            keys, items = chain(8)
            # one batch of 8: the newest 4 fill the device tier, the older 4 go past the pinned host tier to the
            # 2-slot disk tier, which keeps the chain's head and refuses the rest (nothing stored then dropped)
            assert c.put_many(items) == [True] * 2 + [False] * 2 + [True] * 4
        assert [c.where(k) for k in keys] == ["disk"] * 2 + [None] * 2 + ["device"] * 4
        assert c.stats()["dropped"] == 0 and c.longest_prefix(keys) == 2
        assert_all_cached_exact(c, keys[:2])


def test_entry_info_counts_reads_of_the_value_and_starts_over_for_a_new_one(tmp_path):
    with make_three_tier_cache(tmp_path, None) as c:
        keys, items = chain(3)
        assert c.put_many(items) == [True] * 3
        assert c.entry_info(keys[2]) == ("device", keys[1], c.entry_info(keys[2]).last_access, 0)
        c.get(keys[2])
        c.touch(keys[2])  # a read served by reference (a node agent's handle) counts too
        c.demote(keys[2])
        c.get(keys[2], promote=False)
        info = c.entry_info(keys[2])
        assert (info.tier, info.parent, info.hits) == ("host", keys[1], 3)  # hits follow the entry down
        assert c.parents([keys[0], keys[1], prefix_key(NS, None, [99])]) == [None, keys[0], None]
        c.put(keys[2], torch.zeros(4), parent=keys[1])  # a new value: its reads start at 0
        assert c.entry_info(keys[2]).hits == 0
        c.remove(keys[2])
        assert c.entry_info(keys[2]) is None and c.parents([keys[2]]) == [None]


def test_a_chain_head_demoted_and_read_back_up_is_again_no_victim_before_its_tail():
    # prefix-lru (the default): a head that left the device alone (demoted) and came back (a hit promotes it)
    # is its cached child's parent again, so the device gives up the child first
    cfg = CacheConfig(tiers=[TierConfig("device", 1 << 20, device="cpu"), TierConfig("host", 4 << 20)],
                      namespace=Namespace(model="relink"), prefetch_threads=0)
    head, tail = b"\x01" * 16, b"\x02" * 16
    with TieredCache(cfg) as c:
        assert c.put(head, torch.ones(1024)) and c.put(tail, torch.ones(1024) * 2, parent=head)
        assert c.demote(head) and c.where(head) == "host"
        assert torch.equal(c.get(head, promote=True), torch.ones(1024)) and c.where(head) == "device"
        c.get(tail)  # read head to tail: the tail is the most recent
        assert c.victims("device", 4096) == [tail]
        c.relieve("device", c.tiers[0].used_bytes - 1)  # the first victim leaves
        assert (c.where(head), c.where(tail)) == ("device", "host")


def test_a_tensor_one_tiers_codec_refuses_goes_to_a_tier_below_and_one_no_tier_takes_is_named(tmp_path):
    cfg = CacheConfig(tiers=[TierConfig("host", 1 << 20, codec="int8"),
                             TierConfig("disk", 4 << 20, path=str(tmp_path / "d"), fsync=False)],
                      namespace=NS, prefetch_threads=0)
    nan = torch.randn(1024)
    nan[3] = float("nan")  # int8 refuses NaN: the raw disk tier takes it, exactly
    good = torch.randn(1024)
    with TieredCache(cfg) as c:
        assert c.put_many([(b"\x01" * 16, good), (b"\x02" * 16, nan)]) == [True, True]
        assert c.where(b"\x01" * 16) == "host" and c.where(b"\x02" * 16) == "disk"
        assert torch.equal(c.get(b"\x02" * 16).view(torch.int32), nan.view(torch.int32))
    only = CacheConfig(tiers=[TierConfig("host", 1 << 20, codec="int8")], namespace=NS, prefetch_threads=0)
    with TieredCache(only) as c, pytest.raises(CodecError, match="fits no tier: host: .*"):
        c.put(b"\x03" * 16, nan)
