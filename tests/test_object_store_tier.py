"""Object-store host tier: the read path (validate and plan every entry, then copy) and raw-byte slabs, driven
without Ray (LocalObjectStore has the object store's semantics). The real Ray store is covered in
test_object_store_tier_ray.py."""

import numpy as np
import pytest
import torch

from actors.object_store_tier import (LocalObjectStore, ObjectStoreTier, array_to_tensor, copy_plan, raw_bytes,
                                      slice_of)
from helpers_object_store import FullStore
from qwen3vl_ray.errors import CodecError
from qwen3vl_ray.keys import CacheKey


def key(i: int) -> CacheKey:
    return CacheKey(i.to_bytes(16, "little"))


def tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 5, generator=g).to(torch.bfloat16),
        torch.randn(7, generator=g),
        torch.randint(-100, 100, (2, 2, 3), generator=g, dtype=torch.int8),
        torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        torch.zeros(0, 3),
        torch.tensor(2.5, dtype=torch.float16),
    ]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(-1).view(torch.uint8).numpy()) == \
        bytes(b.contiguous().view(-1).view(torch.uint8).numpy())


def test_batch_round_trips_every_dtype_into_new_and_given_outputs_with_misses():
    tier = ObjectStoreTier(1 << 20, store=LocalObjectStore())
    ts = tensors()
    assert tier.put_many([(key(i), t) for i, t in enumerate(ts)]) == [True] * len(ts)
    assert tier.stats()["slabs"] == 1
    # slabs hold flat bytes; dtype and shape live in the tier's index
    e = tier.entry(key(0))
    assert e.dtype == "bfloat16" and e.shape == (3, 5) and e.handle[e.index].dtype == np.uint8
    keys = [key(0), key(99), key(1), key(2), key(3), key(4), key(5)]
    outs = [torch.empty_like(ts[0]), torch.empty(1), None, torch.empty_like(ts[2]), None, None, torch.empty_like(ts[5])]
    got = tier.get_many(keys, outs=outs)
    assert got[1] is None and got[0] is outs[0] and got[3] is outs[3] and got[6] is outs[6]
    for g, t in zip([got[0], got[2], got[3], got[4], got[5], got[6]], ts[:3] + ts[3:]):
        assert same(g, t)
    s = tier.stats()
    assert s["hits"] == 6 and s["misses"] == 1


def test_strided_out_is_written_through_not_into_a_temporary():
    tier = ObjectStoreTier(1 << 20, store=LocalObjectStore())
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tier.put(key(1), t)
    base = torch.zeros(6, 4)
    out = base.t()  # (4, 6) non-contiguous view
    assert tier.get(key(1), out=out) is out
    assert torch.equal(out, t) and torch.equal(base, t.t())


def test_returned_tensors_are_owned_copies_and_the_store_stays_read_only():
    tier = ObjectStoreTier(1 << 20, store=LocalObjectStore())
    t = torch.randn(8, 8).to(torch.bfloat16)
    tier.put(key(1), t)
    a = tier.get(key(1))
    a += 1
    assert same(tier.get(key(1)), t)
    e = tier.entry(key(1))
    view = slice_of(e.handle, e.index, e.nbytes)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1


def test_wrong_out_is_refused_naming_both_shapes():
    tier = ObjectStoreTier(1 << 20, store=LocalObjectStore())
    tier.put(key(1), torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"out is torch.float32 \(16,\), entry is torch.float32 \(4, 4\)"):
        tier.get(key(1), out=torch.empty(16))
    with pytest.raises(ValueError, match="float16"):
        tier.get(key(1), out=torch.empty(4, 4, dtype=torch.float16))


def test_a_corrupt_entry_is_a_counted_miss_and_the_rest_of_the_batch_is_still_copied():
    tier = ObjectStoreTier(1 << 20, store=LocalObjectStore())
    ts = [torch.full((64,), float(i)) for i in range(3)]
    tier.put_many([(key(i), t) for i, t in enumerate(ts)])
    e = tier.entry(key(1))
    e.nbytes -= 4  # the index no longer matches the stored bytes
    outs = [torch.empty(64) for _ in range(3)]
    got = tier.get_many([key(0), key(1), key(2)], outs=outs)
    assert got[1] is None and not tier.contains(key(1))
    assert torch.equal(got[0], ts[0]) and torch.equal(got[2], ts[2])
    assert tier.stats()["corrupt"] == 1 and tier.stats()["hits"] == 2


def test_copy_plan_checks_sizes_before_any_copy():
    arr = np.zeros(12, dtype=np.uint8)
    with pytest.raises(CodecError, match="holds 12 bytes"):
        copy_plan(arr, "float32", (4,))
    with pytest.raises(CodecError, match="needs 0"):
        copy_plan(arr, "float32", (0,))
    t, dst, src = copy_plan(arr, "float32", (3,))
    assert dst is not None and dst.nbytes == src.nbytes == 12 and t.shape == (3,)


def test_large_fresh_outputs_are_writable_and_exact():
    t = torch.randn(1 << 20)  # 4 MiB: the numpy-backed allocation path
    got = array_to_tensor(raw_bytes(t), "float32", (1 << 20,))
    assert torch.equal(got, t) and got.data_ptr() != t.data_ptr()
    before = t[0].item()
    got[0] = before + 1  # writable, and not the source
    assert t[0].item() == before


def test_raw_bytes_is_a_view_for_contiguous_tensors_and_a_copy_otherwise():
    t = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    v = raw_bytes(t)
    assert v.dtype == np.uint8 and v.nbytes == 24 and v.ctypes.data == t.data_ptr()
    nc = raw_bytes(t.t())
    assert bytes(nc) == bytes(t.t().contiguous().numpy())
    g = torch.ones(3, requires_grad=True)
    assert bytes(raw_bytes(g)) == bytes(torch.ones(3).numpy())


def test_a_batch_larger_than_a_slab_is_split_and_still_reads_back():
    tier = ObjectStoreTier(1 << 20, store=LocalObjectStore(), slab_bytes=1024)
    ts = [torch.full((100,), float(i)) for i in range(10)]  # 400 B each: two per slab
    assert all(tier.put_many([(key(i), t) for i, t in enumerate(ts)]))
    assert tier.stats()["slabs"] == 5
    got = tier.get_many([key(i) for i in range(10)])
    assert all(torch.equal(g, t) for g, t in zip(got, ts))


class CountingStore(LocalObjectStore):
    def __init__(self):
        self.reads = 0

    def get_many(self, handles):
        self.reads += 1
        return super().get_many(handles)


@pytest.mark.parametrize("mapped", [True, False])
def test_mapped_slabs_are_read_without_a_store_round_trip(mapped):
    store = CountingStore()
    tier = ObjectStoreTier(1 << 20, store=store, map_slabs=mapped)
    ts = [torch.full((16,), float(i)) for i in range(4)]
    tier.put_many([(key(i), t) for i, t in enumerate(ts)])
    reads_after_put = store.reads
    assert reads_after_put == (1 if mapped else 0)
    got = tier.get_many([key(3), key(0), key(7)])
    assert torch.equal(got[0], ts[3]) and torch.equal(got[1], ts[0]) and got[2] is None
    assert store.reads == reads_after_put + (0 if mapped else 1)
    # the mapping dies with the slab: once its entries are gone, nothing holds it
    tier.remove_many([key(i) for i in range(4)])
    assert tier.stats()["slabs"] == 0 and not tier._slabs


def test_held_room_batches_are_one_slab_served_only_once_committed():
    t = torch.arange(1024, dtype=torch.int16).view(torch.uint8)[:1024]  # 1 KiB entries into a 4 KiB tier
    tier = ObjectStoreTier(4096, store=LocalObjectStore())
    assert tier.holds_room
    res = tier.allocate_many([tier.prepare_store(key(i), t) for i in range(5)])
    # room for four: held and counted at once, the fifth refused; nothing served yet
    assert [r is not None for r in res] == [True] * 4 + [False] and tier.used_bytes == 4096
    assert list(tier.write_many(res[:4])) == [True] * 4
    assert tier.stats()["slabs_put"] == 1 and not any(tier.contains(key(i)) for i in range(4))
    tier.commit_many(res[:3])
    assert [tier.contains(key(i)) for i in range(4)] == [True] * 3 + [False]
    assert same(tier.get(key(2)), t)
    tier.abort(res[3])  # written, never served: its room goes back, the slab lives on for the other three
    assert tier.used_bytes == 3072 and tier.stats()["slabs"] == 1
    tier.abort(tier.allocate(tier.prepare_store(key(9), t)))  # held and never written
    assert tier.used_bytes == 3072
    # a replace through held room serves the new value and drops the old one
    new = torch.ones(1024, dtype=torch.uint8)
    (r,) = tier.allocate_many([tier.prepare_store(key(0), new)])
    assert tier.write(r)
    tier.commit(r)
    assert same(tier.get(key(0)), new) and len(tier) == 3


def test_a_replace_that_does_not_fit_keeps_the_old_value():
    # the old value shares its slab with a live entry, so dropping it would give back no room: the bigger new
    # value is refused and the old one must stay (it once was dropped first and lost)
    small, big = torch.zeros(1024, dtype=torch.uint8), torch.ones(3072, dtype=torch.uint8)
    tier = ObjectStoreTier(4096, store=LocalObjectStore())
    assert tier.put_many([(key(0), small), (key(1), small)]) == [True, True]
    assert tier.complete_store(tier.prepare_store(key(0), big)) is False
    assert same(tier.get(key(0)), small) and same(tier.get(key(1)), small) and tier.used_bytes == 2048
    # a replace that fits once its own slab dies goes through
    assert tier.complete_store_many([tier.prepare_store(key(0), small), tier.prepare_store(key(1), big)]) == [True] * 2
    assert same(tier.get(key(1)), big) and tier.used_bytes == 4096


def test_a_slab_the_store_refuses_releases_its_room_and_loses_nothing_stored():
    store = FullStore()
    t = torch.zeros(1024, dtype=torch.uint8)
    tier = ObjectStoreTier(4096, store=store)
    assert tier.put_many([(key(0), t)]) == [True]
    store.full = True
    res = tier.allocate_many([tier.prepare_store(key(i), t) for i in (1, 2)])
    assert list(tier.write_many(res)) == [False, False] and tier.used_bytes == 1024
    # a refused put, a refused replace: False, and what was stored stays
    assert tier.put_many([(key(3), t)]) == [False]
    assert tier.complete_store(tier.prepare_store(key(0), torch.ones(1024, dtype=torch.uint8))) is False
    assert tier.used_bytes == 1024 and same(tier.get(key(0)), t) and len(tier) == 1
    # a reservation whose write was refused gave its room back once: aborting it later gives nothing more
    for r in res:
        tier.abort(r)
    assert tier.used_bytes == 1024


def test_deferred_compaction_repacks_each_thinned_slab_once():
    t = torch.zeros(1024, dtype=torch.uint8)
    tier = ObjectStoreTier(8192, store=LocalObjectStore())
    assert tier.put_many([(key(i), t) for i in range(8)]) == [True] * 8
    with tier.deferred_compaction():
        for i in range(6):  # a plain remove would re-pack at 4 and again at 2 survivors
            tier.remove(key(i))
        assert tier.used_bytes == 8192 and tier.stats()["slabs_put"] == 1
    # one re-pack of the 2 survivors: their bytes only, still exact
    assert tier.used_bytes == 2048 and tier.stats()["slabs_put"] == 2 and tier.stats()["slabs"] == 1
    assert all(torch.equal(x, t) for x in tier.get_many([key(6), key(7)]))
