"""Block pools: handles, free list, leaks, zeroing, stats, PoolManager routing."""

import gc
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qwen3vl_ray.pools import BlockPool, PoolManager, pinning_available


def test_acquire_release_and_stats():
    pool = BlockPool((4, 8), torch.float32, capacity=3, device="cpu")
    a, b = pool.acquire(), pool.acquire()
    assert (a.slot, b.slot) == (0, 1)  # a fresh pool hands out ascending slots
    assert a.tensor.shape == (4, 8) and a.tensor.dtype == torch.float32
    s = pool.stats()
    assert (s.capacity, s.in_use, s.high_water, s.failed_acquires, s.leaks) == (3, 2, 2, 0, 0)
    a.release()
    assert pool.stats().in_use == 1 and pool.stats().high_water == 2
    assert pool.slot_bytes == 4 * 8 * 4


def test_full_pool_returns_none_and_counts():
    pool = BlockPool((16,), torch.uint8, capacity=2, device="cpu")
    held = [pool.acquire(), pool.acquire()]
    # both slots out -> a third acquire is a normal "no room": None, counted, never raises
    assert pool.acquire() is None
    assert pool.acquire_ids(1) is None
    assert pool.stats().failed_acquires == 2
    held[0].release()
    assert pool.acquire() is not None


def test_acquire_ids_all_or_nothing():
    pool = BlockPool((8,), torch.uint8, capacity=4, device="cpu")
    ids = pool.acquire_ids(3)
    assert ids == [0, 1, 2]
    assert pool.acquire_ids(2) is None  # only one left: nothing taken
    assert pool.free == 1
    pool.release_ids(ids)
    assert pool.acquire_ids(4) == [0, 1, 2, 3]  # released slots come back in the same order
    with pytest.raises(ValueError, match="> 0"):
        pool.acquire_ids(0)


def test_wrong_shape_or_dtype_raises_naming_values():
    pool = BlockPool((2, 3), torch.float16, capacity=2, device="cpu")
    with pytest.raises(ValueError, match=r"torch.float32 \(2, 3\).*torch.float16 \(2, 3\)"):
        pool.store(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        pool.store(torch.zeros(3, 2, dtype=torch.float16))
    h = pool.acquire()
    with pytest.raises(ValueError, match="does not fit"):
        h.copy_from(torch.zeros(6, dtype=torch.float16))
    assert pool.stats().in_use == 1  # a failed store took no slot


def test_store_copies_data():
    pool = BlockPool((5,), torch.int64, capacity=1, device="cpu")
    src = torch.arange(5)
    with pool.store(src) as h:
        assert torch.equal(h.tensor, src)
        src.add_(1)  # the slot holds a copy, not a view of the source
        assert torch.equal(h.tensor, torch.arange(5))
    assert pool.in_use == 0  # context manager released it


def test_double_release_and_foreign_ids_raise():
    pool = BlockPool((4,), torch.uint8, capacity=2, device="cpu")
    h = pool.acquire()
    h.release()
    with pytest.raises(ValueError, match="already released"):
        h.release()
    with pytest.raises(ValueError, match="already released"):
        _ = h.tensor
    with pytest.raises(ValueError, match="not acquired"):
        pool.release_ids([1])
    with pytest.raises(ValueError, match="not acquired"):
        pool.release_ids([7])


def test_dropped_handle_is_reclaimed_and_counted_as_leak():
    pool = BlockPool((4,), torch.uint8, capacity=2, device="cpu")
    h = pool.acquire()
    assert pool.in_use == 1
    del h  # dropped without release
    gc.collect()
    s = pool.stats()
    assert s.in_use == 0 and s.leaks == 1
    # a released handle that is later collected is not a leak
    h2 = pool.acquire()
    h2.release()
    del h2
    gc.collect()
    assert pool.stats().leaks == 1


def test_zero_on_release_clears_slot():
    pool = BlockPool((6,), torch.int32, capacity=1, device="cpu", zero_on_release=True)
    h = pool.store(torch.arange(1, 7, dtype=torch.int32))
    h.release()
    h2 = pool.acquire()  # the same slot: the previous tenant's data is gone
    assert h2.slot == 0 and int(h2.tensor.abs().sum()) == 0


def test_zero_on_release_is_the_default_for_single_slots_and_runs():
    # pools are shared between tenants: a released slot reads back as zeros, whoever acquires it next
    pool = BlockPool((4,), torch.bfloat16, capacity=6, device="cpu")
    ids = pool.acquire_ids(6)
    pool.slab[:] = 7
    pool.release_ids(range(1, 4))          # one run of three slots
    pool.release_ids([5, 0])               # scattered slots, any order
    assert pool.slab[[0, 1, 2, 3, 5]].eq(0).all() and pool.slab[4].eq(7).all()  # slot 4 is still held
    assert ids == list(range(6)) and PoolManager().zero_on_release


def test_no_zeroing_when_turned_off():
    pool = BlockPool((3,), torch.int32, capacity=1, device="cpu", zero_on_release=False)
    pool.store(torch.tensor([1, 2, 3], dtype=torch.int32)).release()
    assert pool.acquire().tensor.tolist() == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zero_on_release_on_the_device():
    pool = BlockPool((1024,), torch.uint8, capacity=4, device="cuda")
    h = pool.store(torch.full((1024,), 9, dtype=torch.uint8, device="cuda"))
    slot = h.slot
    h.release()
    assert int(pool.slab[slot].sum()) == 0


def test_bad_pool_config_raises():
    with pytest.raises(ValueError, match="capacity"):
        BlockPool((4,), torch.uint8, capacity=0, device="cpu")
    with pytest.raises(ValueError, match="shape"):
        BlockPool((0,), torch.uint8, capacity=1, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        BlockPool((4,), "float32", capacity=1, device="cpu")
    with pytest.raises(ValueError, match="device"):
        BlockPool((4,), torch.uint8, capacity=1, device="nonsense")


def test_pinned_only_where_cuda_present():
    pool = BlockPool((64,), torch.uint8, capacity=2, device="cpu", pin_memory=True)
    assert pool.pinned == pinning_available()
    assert pool.slab.is_pinned() == pinning_available()


def test_auto_device():
    pool = BlockPool((4,), torch.uint8, capacity=1)
    assert pool.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_manager_routes_by_shape_dtype_device():
    m = PoolManager()
    kv = m.create((2, 2, 4, 8), torch.bfloat16, capacity=2, device="cpu")
    vis = m.create((16, 32), torch.float32, capacity=1, device="cpu")
    h = m.store(torch.ones(2, 2, 4, 8, dtype=torch.bfloat16))
    assert h is not None and h.slot == 0 and kv.in_use == 1
    held = m.acquire((16, 32), torch.float32, "cpu")
    assert held is not None
    assert m.acquire((16, 32), torch.float32, "cpu") is None  # full -> None
    assert vis.stats().failed_acquires == 1
    with pytest.raises(ValueError, match=r"no pool for torch.float16 \(16, 32\)"):
        m.acquire((16, 32), torch.float16, "cpu")
    with pytest.raises(ValueError, match="exists already"):
        m.create((16, 32), torch.float32, capacity=1, device="cpu")
    stats = m.stats()
    assert len(stats) == 2 and all("high_water" in s for s in stats.values())


def test_manager_staging_pool_is_pinned_when_cuda():
    m = PoolManager()
    s1 = m.staging(1024, capacity=2)
    assert m.staging(1024, capacity=2) is s1  # reused, not recreated
    assert s1.pinned == pinning_available() and s1.dtype == torch.uint8


def test_threads_share_a_pool():
    pool = BlockPool((32,), torch.uint8, capacity=8, device="cpu")
    errors = []

    def worker(seed):
        try:
            for i in range(300):
                h = pool.acquire()
                if h is not None:
                    h.tensor.fill_(seed)
                    assert int(h.tensor[0]) == seed  # nobody else holds this slot
                    h.release()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.in_use == 0 and pool.stats().high_water <= 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=60))
def test_pool_matches_reference_model(ops):
    # acquire (True) or release the i-th held handle (False); the pool agrees with a plain set
    pool = BlockPool((4,), torch.uint8, capacity=5, device="cpu")
    held = []
    for acquire, i in ops:
        if acquire:
            h = pool.acquire()
            assert (h is None) == (len(held) == 5)
            if h is not None:
                assert h.slot not in {x.slot for x in held}
                held.append(h)
        elif held:
            held.pop(i % len(held)).release()
        assert pool.in_use == len(held)
    assert pool.stats().high_water <= 5


def test_release_ids_with_a_bad_id_releases_nothing():
    pool = BlockPool((8,), torch.uint8, capacity=4, device="cpu")
    ids = pool.acquire_ids(3)
    # a bad id (or a repeated one) in the middle: the call fails whole, no slot is half-released
    with pytest.raises(ValueError):
        pool.release_ids([ids[0], 99, ids[1]])
    with pytest.raises(ValueError, match="twice"):
        pool.release_ids([ids[0], ids[0]])
    pool.release_ids(ids)  # all three are still acquired, so this succeeds
    assert len(pool.acquire_ids(4)) == 4
