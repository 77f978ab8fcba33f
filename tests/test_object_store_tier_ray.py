"""Object-store host tier against a real (embedded, one-node) Ray object store: slabs travel as raw out-of-band
buffers, reads are zero-copy and read-only, and a reader's view keeps its slab alive after the tier drops it."""

import gc

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from actors.object_store_tier import ObjectStoreTier, RayObjectStore, slice_of  # noqa: E402
from qwen3vl_ray.keys import CacheKey  # noqa: E402

pytestmark = pytest.mark.ray
MiB = 1 << 20


def key(i: int) -> CacheKey:
    return CacheKey(i.to_bytes(16, "little"))


@pytest.fixture(scope="module")
def store():
    # address="local": always a fresh embedded instance, never another session's cluster on this machine
    ray.init(address="local", num_cpus=1, object_store_memory=100 * MiB, include_dashboard=False,
             log_to_driver=False)
    yield RayObjectStore()
    ray.shutdown()


def test_batch_is_one_object_of_raw_buffers_read_back_exactly(store):
    tier = ObjectStoreTier(32 * MiB, store=store)
    ts = [torch.randn(256, 64).to(torch.bfloat16), torch.randn(1000), torch.zeros(0),
          torch.randint(0, 255, (3, 7), dtype=torch.uint8)]
    assert tier.put_many([(key(i), t) for i, t in enumerate(ts)]) == [True] * 4
    assert tier.stats()["slabs_put"] == 1
    (slab,) = store.get_many([tier.entry(key(0)).handle])
    # raw bytes, not pickled arrays or tensors: nothing but buffers comes back, and they are read-only
    assert isinstance(slab, list) and len(slab) == 4
    assert not any(isinstance(b, (np.ndarray, torch.Tensor)) for b in slab)
    assert all(memoryview(b).readonly for b in slab)
    outs = [torch.empty_like(ts[0]), None, None, torch.empty_like(ts[3])]
    got = tier.get_many([key(0), key(1), key(2), key(3), key(9)], outs=outs + [None])
    assert got[0] is outs[0] and got[3] is outs[3] and got[4] is None
    for g, t in zip(got, ts):
        assert g.dtype == t.dtype and torch.equal(g.view(torch.uint8) if g.dtype == torch.bfloat16 else g,
                                                  t.view(torch.uint8) if t.dtype == torch.bfloat16 else t)
    got[1] += 1  # owned by the caller; the store is unchanged
    assert torch.equal(tier.get(key(1)), ts[1])


def test_a_readers_view_keeps_the_slab_alive_after_the_tier_drops_it(store):
    tier = ObjectStoreTier(32 * MiB, store=store)
    t = torch.arange(MiB // 4, dtype=torch.int32)
    tier.put(key(1), t)
    e = tier.entry(key(1))
    (slab,) = store.get_many([e.handle])
    view = slice_of(slab, e.index, e.nbytes)
    del slab, e
    assert tier.remove(key(1)) and tier.stats()["slabs"] == 0  # the tier's ObjectRef is gone
    gc.collect()
    # refill the store so a freed object's memory would be reused and overwritten
    refs = [ray.put(np.full(8 * MiB, 0xAB, dtype=np.uint8)) for _ in range(6)]
    assert not view.flags.writeable
    assert np.array_equal(view.view(np.int32), t.numpy())
    del refs
