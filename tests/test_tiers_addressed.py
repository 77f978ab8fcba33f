"""The pooled tiers as addressed storage: an entry's location lives in its owner's record.

Used alone, a pooled tier keeps a record per key; driven by a ``TieredCache``, the location is a field of the
store's own record of the entry (``EntryRecord.loc``), the tier keeps no map of its own, and its keyed reads
find the store's records. Pins are the store's, by key: they hold across an entry's moves between tiers.
"""

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.base import Placement
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.factory import make_tier
from tests.helpers_threads import run_together

NS = Namespace(model="test-addressed")
BLOCK = 1024


def key(i: int) -> bytes:
    return prefix_key(NS, None, [i])


def value(i: int, n: int = 1024) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + i


def host(capacity_blocks: int = 16):
    return make_tier(TierConfig("host", capacity_blocks * BLOCK, block_bytes=BLOCK), NS)


def test_store_read_free_by_placement():
    tier = host()
    a, b = Placement(), Placement()
    assert tier.store_into(tier.prepare_store(key(1), value(1)), a)
    assert tier.store_into(tier.prepare_store(key(2), value(2, 512)), b)
    assert torch.equal(tier.read(a), value(1)) and torch.equal(tier.read(b), value(2, 512))
    assert tier.stored_nbytes(a) == 4 * BLOCK and tier.stored_nbytes(b) == 2 * BLOCK
    assert len(tier) == 2 and tier.used_bytes == 6 * BLOCK
    assert list(tier.keys()) == []  # the placements are the caller's: no keys of its own
    # a replace at the same placement takes the old value's blocks back
    assert tier.store_into(tier.prepare_store(key(1), value(7, 256)), a)
    assert torch.equal(tier.read(a), value(7, 256)) and tier.used_bytes == 3 * BLOCK and len(tier) == 2
    assert tier.free(a) and a.loc is None and not tier.free(a)
    assert tier.read(a) is None and tier.used_bytes == 2 * BLOCK and len(tier) == 1


def test_held_room_commits_into_the_placement_and_releases_what_it_replaces():
    tier = host()
    place = Placement()
    assert tier.store_into(tier.prepare_store(key(1), value(1)), place)
    res = tier.allocate(tier.prepare_store(key(1), value(2)))
    assert res is not None and tier.used_bytes == 8 * BLOCK  # both values' room while the new one is written
    assert torch.equal(tier.read(place), value(1))  # the old one serves until the commit
    assert tier.write(res)
    tier.commit_into([(res, place)])
    assert torch.equal(tier.read(place), value(2)) and tier.used_bytes == 4 * BLOCK and len(tier) == 1


def test_standalone_keyed_api_keeps_a_record_per_key_only_while_it_holds_the_key():
    tier = host()
    assert tier.put(key(1), value(1)) and tier.contains(key(1)) and list(tier.keys()) == [key(1)]
    assert not tier.put(key(2), value(2, 4096))  # 16 blocks, 12 free: refused, and no record of key(2) stays
    assert not tier.contains(key(2)) and tier.entry_nbytes(key(2)) is None and len(tier) == 1
    assert tier.remove(key(1)) and not tier.contains(key(1)) and len(tier) == 0 and tier.used_bytes == 0


def cache(host_blocks: int = 8, disk: bool = False, tmp_path=None, policy: str = "prefix-lru") -> TieredCache:
    tiers = [TierConfig("host", host_blocks * BLOCK, block_bytes=BLOCK)]
    if disk:
        tiers.append(TierConfig("disk", 1 << 20, path=str(tmp_path / "disk")))
    return TieredCache(CacheConfig(tiers=tiers, policy=policy, namespace=NS, prefetch_threads=0))


def test_a_store_driven_tier_keeps_no_index_and_reads_through_the_stores_records():
    with cache() as c:
        tier = c.tiers[0]
        for i in range(3):
            assert c.put(key(i), value(i, 256), parent=key(i - 1) if i else None)
        assert tier._own == {}  # the store's records hold the locations
        assert len(tier) == 3 and sorted(tier.keys()) == sorted(key(i) for i in range(3))
        assert all(c.manager._index[key(i)].loc is not None for i in range(3))
        # the tier's keyed reads agree with the store
        assert tier.contains(key(1)) and torch.equal(tier.get(key(1)), value(1, 256))
        assert tier.entry_shape(key(2)) == (256,) and tier.entry_nbytes(key(2)) == BLOCK
        with pytest.raises(RuntimeError, match="belongs to a store"):
            tier.put(key(9), value(9))  # bytes stored past the store would be no entry of it
        assert c.remove(key(2)) and not tier.contains(key(2)) and len(tier) == 2 and tier.used_bytes == 2 * BLOCK


def test_a_move_down_and_back_frees_and_takes_blocks_with_the_record(tmp_path):
    with cache(host_blocks=2, disk=True, tmp_path=tmp_path, policy="lru") as c:
        host_tier = c.tiers[0]
        for i in range(3):
            assert c.put(key(i), value(i, 256))
        assert c.where(key(0)) == "disk" and host_tier.used_bytes == 2 * BLOCK and len(host_tier) == 2
        assert c.manager._index[key(0)].loc is None  # the disk tier indexes its own files
        t, where = c.lookup(key(0))  # promoted: it takes the host blocks of the entry demoted for it
        assert where == "disk" and torch.equal(t, value(0, 256))
        assert c.where(key(0)) == "host" and c.manager._index[key(0)].loc is not None
        assert host_tier.used_bytes == 2 * BLOCK and len(host_tier) == 2


def test_pins_are_by_key_and_hold_across_a_promotion(tmp_path):
    with cache(host_blocks=2, disk=True, tmp_path=tmp_path, policy="lru") as c:
        for i in range(3):
            assert c.put(key(i), value(i, 256))
        assert c.where(key(0)) == "disk" and c.pin(key(0))
        assert c.get(key(0)) is not None and c.where(key(0)) == "host"  # a pinned entry still moves up on a hit
        for i in range(3, 6):
            assert c.put(key(i), value(i, 256))
        assert c.where(key(0)) == "host"  # still pinned in its new tier: never the victim
        assert c.stats()["pinned"] == 1 and c.unpin(key(0)) and not c.unpin(key(0))
        assert c.put(key(6), value(6, 256)) and c.put(key(7), value(7, 256))
        assert c.where(key(0)) == "disk" and c.stats()["pinned"] == 0


def test_a_removed_pinned_key_takes_its_pins_with_it():
    with cache() as c:
        assert c.put(key(1), value(1, 256)) and c.pin(key(1)) and c.pin(key(1))
        assert c.remove(key(1)) and c.stats()["pinned"] == 0 and not c.unpin(key(1))
        assert c.put(key(1), value(2, 256)) and c.demote(key(1))  # a new value of the key is not pinned


def test_a_tier_filled_alone_hands_its_entries_to_the_store_it_is_given_to():
    tier = host()
    assert tier.put(key(1), value(1, 256)) and tier.put(key(2), value(2, 256))
    cfg = CacheConfig(tiers=[TierConfig("host", 16 * BLOCK, block_bytes=BLOCK)], policy="lru", namespace=NS,
                      prefetch_threads=0)
    with TieredCache(cfg, tiers=[tier]) as c:
        assert len(c) == 2 and tier._own == {} and c.manager._index[key(1)].loc is not None
        assert torch.equal(c.get(key(2)), value(2, 256)) and c.remove(key(1))
        assert tier.used_bytes == BLOCK and len(tier) == 1


@pytest.fixture
def fine_thread_switches():
    # switch threads every microsecond so the races below interleave within a few thousand rounds
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_concurrent_stores_and_removes_of_one_key_in_a_tier_alone_leak_no_block(fine_thread_switches):
    # a key's own record is found or made, stored into and dropped under the tier's lock: a remove between
    # making it and storing into it left a stored value no key reached, its blocks in use for good
    tier = make_tier(TierConfig("host", 64 * 1024, block_bytes=256), NS)
    x = value(1, 256)

    def store():
        for _ in range(3000):
            tier.complete_store(tier.prepare_store(key(1), x))

    def remove():
        for _ in range(3000):
            tier.remove(key(1))

    run_together(store, store, remove)
    tier.remove(key(1))
    assert (tier.pool.in_use, len(tier), list(tier.keys())) == (0, 0, [])


def test_the_keys_of_a_store_driven_tier_can_be_listed_while_the_store_changes(fine_thread_switches):
    import time

    with cache(host_blocks=64, policy="lru") as c:
        tier, errors, stop = c.tiers[0], [], time.monotonic() + 1.0

        def churn():
            i = 0
            while time.monotonic() < stop:
                c.put(key(i % 32), value(i, 64))
                c.remove(key((i + 16) % 32))
                i += 1

        def listing():
            while time.monotonic() < stop:
                try:
                    assert len(set(tier.keys())) <= 32
                except RuntimeError as exc:  # "dictionary changed size during iteration"
                    errors.append(exc)

        run_together(churn, listing)
        assert errors == []
