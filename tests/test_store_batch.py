"""``put_many`` is one batch whose copies run outside the cache's metadata lock (issue 10).

A host tier's copy of a batch is held mid-way (``PooledTier.write`` waits on an event): other threads' lookups,
reads of the batch's own entries (served from the bytes being copied) and puts of other keys complete, each
bounded by a generous timeout; a call stuck behind the held copy would time out, not hang the test.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.pooled import PooledTier

NS = Namespace(model="store-batch")
ELEMS = 1024  # float32 -> 4 KiB per entry
WAIT = 30


def key(i: int):
    return prefix_key(NS, None, [i])


def value(i: int) -> torch.Tensor:
    return torch.arange(ELEMS, dtype=torch.float32) - i


def test_a_batch_copy_held_in_the_host_tier_blocks_no_other_call(tmp_path, monkeypatch):
    entered, released = threading.Event(), threading.Event()
    real_write = PooledTier.write
    batch_thread: list = []

    def held_write(self, res):
        if threading.current_thread() in batch_thread:  # only the batch's copies are held
            entered.set()
            assert released.wait(WAIT), "the held copy was never released"
        return real_write(self, res)

    monkeypatch.setattr(PooledTier, "write", held_write)
    tiers = [TierConfig("host", 16 * ELEMS * 4, block_bytes=512)]
    with TieredCache(CacheConfig(tiers=tiers, policy="lru", namespace=NS, prefetch_threads=0)) as c, \
            ThreadPoolExecutor(1) as batcher, ThreadPoolExecutor(1) as other:
        assert c.put(key(0), value(0))

        def store():
            batch_thread.append(threading.current_thread())
            return c.put_many([(key(i), value(i)) for i in range(1, 9)])

        stored = batcher.submit(store)
        assert entered.wait(WAIT)
        try:
            def meanwhile():
                return {
                    "prefix": c.longest_prefix([key(0), key(1)]),  # the batch is indexed before its copies
                    "old": c.get(key(0)),
                    "in_flight": [c.get(key(i)) for i in range(1, 9)],  # from the bytes being copied
                    "put": c.put(key(9), value(9)),
                    "removed_in_flight": c.remove(key(1)),  # never: it would tear the copy
                }

            seen = other.submit(meanwhile).result(timeout=WAIT)
            assert not stored.done()
        finally:
            released.set()
        assert stored.result(timeout=WAIT) == [True] * 8
        assert seen["prefix"] == 2 and torch.equal(seen["old"], value(0))
        assert all(torch.equal(t, value(i)) for i, t in enumerate(seen["in_flight"], 1))
        assert seen["put"] and seen["removed_in_flight"] is False
        # after the batch: every entry in the host tier's slab, exact, and the budget is the entries' blocks
        host = c.tiers[0]
        assert [c.where(key(i)) for i in range(10)] == ["host"] * 10
        assert all(torch.equal(host.get(key(i)), value(i)) for i in range(10))
        assert host.used_bytes == sum(host.entry_nbytes(k) for k in list(host.keys())) == 10 * ELEMS * 4
