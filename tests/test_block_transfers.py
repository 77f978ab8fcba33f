"""The connector's transfer thread (``qwen3vl_ray.serving.block_transfers``), without vLLM: a real
``LocalBlockStore`` and a ``PagedBlocks`` over plain tensors in vLLM's CPU layout."""

from __future__ import annotations

import threading

import pytest
import torch

from qwen3vl_ray.cache.config import CacheConfig
from qwen3vl_ray.cache.tiered_cache import TieredCache
from qwen3vl_ray.keys import CacheKey, Namespace, content_key
from qwen3vl_ray.serving.block_store import LocalBlockStore
from qwen3vl_ray.serving.block_transfers import BlockMove, BlockTransfers, StagingBuffers, save_blocks
from qwen3vl_ray.serving.paged_blocks import PagedBlocks
from qwen3vl_ray.tiers.config import TierConfig

LAYERS, BLOCKS, HEADS, TOKENS, HEAD = 2, 8, 2, 4, 8


def _paged(seed: int = 0) -> PagedBlocks:
    g = torch.Generator().manual_seed(seed)
    caches = {f"layer{i}": torch.randn(BLOCKS, HEADS, TOKENS, 2 * HEAD, generator=g) for i in range(LAYERS)}
    return PagedBlocks(caches, BLOCKS, head_size=HEAD)


def _store() -> LocalBlockStore:
    return LocalBlockStore(TieredCache(CacheConfig(tiers=[TierConfig(kind="host", capacity_bytes=1 << 20,
                                                                     block_bytes=4096)], namespace=NS)))


NS = Namespace(model="m", dtype="float32", layout="test", tenant="t")


def _keys(n: int) -> list[CacheKey]:
    return [content_key(NS, "block", f"block-{i}".encode()) for i in range(n)]


class HeldStore(LocalBlockStore):
    """Its saves wait until ``release`` is set (a slow disk or a slow node agent)."""

    def __init__(self, inner: LocalBlockStore) -> None:
        super().__init__(inner.cache)
        self.entered, self.release = threading.Event(), threading.Event()

    def _save(self, items):
        self.entered.set()
        assert self.release.wait(30)
        return super()._save(items)


def test_a_load_queued_after_a_save_finds_its_blocks_and_writes_them_exactly():
    source, target = _paged(0), _paged(1)
    store = HeldStore(_store())
    transfers = BlockTransfers(store)
    keys = _keys(3)
    moves = [BlockMove(b, k) for b, k in zip([1, 4, 6], keys)]
    done = []
    transfers.submit_save(moves, source.gather([m.block_id for m in moves], out=torch.empty(3, *source.entry_shape)),
                          lambda saved, seconds: done.append(saved))
    assert store.entered.wait(30)
    # the save is running (held): its keys are pending, so a lookup counts them held
    assert transfers.pending(keys + _keys(4)[3:]) == [True, True, True, False]
    into = [BlockMove(b, k) for b, k in zip([0, 2, 3], keys)]
    loaded = []
    transfers.submit_load(target, into, TOKENS, loaded.append)
    store.release.set()
    assert transfers.drain(30)
    assert done == [3] and transfers.pending(keys) == [False] * 3
    [result] = loaded
    assert result.failed_block_ids == [] and result.tokens_per_tier == {"host": 3 * TOKENS}
    for src, dst in zip([1, 4, 6], [0, 2, 3]):
        for s, t in zip(source.tensors, target.tensors):
            assert torch.equal(s[src], t[dst])
    transfers.close()


def test_missing_blocks_and_a_failing_store_are_failed_block_ids_and_the_thread_goes_on():
    paged, store = _paged(), _store()
    transfers = BlockTransfers(store)
    result = transfers.load_now(paged, [BlockMove(5, k) for k in _keys(2)], TOKENS)
    assert result.failed_block_ids == [5, 5] and result.tokens_per_tier == {}

    def broken(keys):
        raise OSError("node agent unreachable")

    store._load = broken
    result = transfers.load_now(paged, [BlockMove(2, _keys(1)[0])], TOKENS)
    assert result.failed_block_ids == [2]
    saved = []
    store._save = broken
    transfers.submit_save([BlockMove(3, _keys(1)[0])], paged.gather([3]), lambda n, s: saved.append(n))
    assert transfers.drain(30) and saved == [0]
    transfers.close()


def test_staging_buffers_are_reused_and_a_step_waits_when_all_are_taken():
    staging = StagingBuffers((2, 3), torch.float32, max_buffers=2)
    a, b = staging.acquire(4), staging.acquire(20)
    assert a.shape[0] >= 4 and b.shape[0] >= 20
    got = []
    waiter = threading.Thread(target=lambda: got.append(staging.acquire(4)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got  # both buffers are out: back-pressure
    staging.release(a)
    waiter.join(30)
    assert got and got[0] is a  # the released buffer, not a new allocation


def test_bad_gather_buffers_are_refused():
    paged = _paged()
    with pytest.raises(ValueError, match="cannot hold"):
        paged.gather([0, 1], out=torch.empty(1, *paged.entry_shape))


def test_after_close_jobs_run_in_their_callers_and_drain_never_waits():
    """vLLM shuts an engine down from a finalizer that runs after this process's exit hook closed the thread:
    its last saves still reach the store, and its drain returns at once (it used to wait out its timeout)."""
    paged, store = _paged(), _store()
    transfers = BlockTransfers(store)
    transfers.close()
    assert transfers.drain(timeout=5)
    saved = []
    key = _keys(1)[0]
    transfers.submit_save([BlockMove(3, key)], paged.gather([3]), lambda n, s: saved.append(n))
    assert saved == [1] and store.contains_many([key]) == [True]
    assert transfers.load_now(paged, [BlockMove(0, key)], TOKENS).failed_block_ids == []


def test_a_load_that_breaks_while_writing_the_paged_kv_reports_every_block_failed():
    """A waiting engine step is never left hanging: the blocks of a load that raised are failed loads."""
    source, target, store = _paged(0), _paged(1), _store()
    transfers = BlockTransfers(store)
    keys = _keys(2)
    transfers.submit_save([BlockMove(b, k) for b, k in zip([1, 2], keys)], source.gather([1, 2], out=torch.empty(
        2, *source.entry_shape)), lambda n, s: None)

    def broken_scatter(block_id, entry):
        raise RuntimeError("device lost")

    target.scatter = broken_scatter
    result = transfers.load_now(target, [BlockMove(4, keys[0]), BlockMove(5, keys[1])], TOKENS)
    assert result.failed_block_ids == [4, 5]
    transfers.close()


def test_the_connectors_modes_default_from_its_config_and_a_bad_one_is_refused_by_name():
    from qwen3vl_ray.errors import ConfigError
    from qwen3vl_ray.serving.connector_config import ConnectorConfig, connector_config

    config = connector_config({})
    assert (config.store, config.load_mode, config.save_mode) == ("local", "sync", "async")
    assert connector_config({"load_mode": "async", "save_mode": "sync"}).load_mode == "async"
    with pytest.raises(ConfigError, match="load_mode must be one of sync, async, got 'later'"):
        connector_config({"load_mode": "later"})
    with pytest.raises(ConfigError, match="unknown kv_connector_extra_config key"):
        connector_config({"load": "async"})
    assert ConnectorConfig.__dataclass_fields__["save_mode"].default == "async"


def test_a_load_that_needs_no_queued_save_goes_ahead_of_them():
    # a request's first token must not wait for the disk writes of the blocks earlier requests stored: with one
    # save running (held: a slow disk) and two queued, a load of blocks already stored runs right after the
    # running one, and a load of a block still being saved waits for that save and then finds it
    source, target = _paged(0), _paged(1)
    plain, stored = _store(), _keys(6)
    assert save_blocks(plain, [BlockMove(0, stored[0]), BlockMove(1, stored[1])], source.gather([0, 1])) == 2
    store = HeldStore(plain)
    transfers = BlockTransfers(store)
    order = []

    def own(i):  # a queued save's entries must outlive later gathers: each gets its own buffer
        return source.gather([i], out=torch.empty(1, *source.entry_shape))

    transfers.submit_save([BlockMove(2, stored[2])], own(2), lambda n, s: order.append("save 2"))
    assert store.entered.wait(30)
    transfers.submit_save([BlockMove(3, stored[3])], own(3), lambda n, s: order.append("save 3"))
    transfers.submit_save([BlockMove(5, stored[5])], own(5), lambda n, s: order.append("save 5"))
    results = {}

    def loaded(name):
        return lambda result: (order.append(name), results.setdefault(name, result))

    transfers.submit_load(target, [BlockMove(6, stored[3])], TOKENS, loaded("load 3"))  # 3 is pending
    transfers.submit_load(target, [BlockMove(4, stored[0]), BlockMove(7, stored[1])], TOKENS, loaded("load 0 1"))
    store.release.set()
    assert transfers.drain(30)
    assert order == ["save 2", "load 0 1", "save 3", "save 5", "load 3"]
    assert results["load 0 1"].failed_block_ids == [] and results["load 3"].failed_block_ids == []
    for src, dst in ((0, 4), (1, 7), (3, 6)):
        assert all(torch.equal(s[src], t[dst]) for s, t in zip(source.tensors, target.tensors)), (src, dst)
    transfers.close()


def test_blocks_fetched_at_lookup_load_even_if_the_store_loses_them_and_a_gap_ends_the_fetch():
    # the connector reads an image-covering hit when the scheduler looks it up and reports only what came back:
    # the step's load then takes those blocks from memory, so it cannot fail (vLLM 0.32 must not see it fail)
    source, target = _paged(0), _paged(1)
    store, keys = _store(), _keys(4)
    assert save_blocks(store, [BlockMove(i, k) for i, k in enumerate(keys)], source.gather([0, 1, 2, 3])) == 4
    assert store.cache.remove(keys[2])  # a gap: the fetch stops before it
    transfers = BlockTransfers(store)
    assert transfers.fetch("req-1", keys) == 2
    assert store.cache.remove(keys[0]) and store.cache.remove(keys[1])  # gone from the store after the lookup
    moves = [BlockMove(5, keys[0]), BlockMove(6, keys[1])]
    result = transfers.load_now(target, moves, TOKENS, transfers.take_fetched("req-1"))
    assert result.failed_block_ids == [] and result.tokens_per_tier == {"host": 2 * TOKENS}
    for src, dst in ((0, 5), (1, 6)):
        assert all(torch.equal(s[src], t[dst]) for s, t in zip(source.tensors, target.tensors))
    assert transfers.take_fetched("req-1") == {}  # handed over once
    # without the fetched blocks the same load fails for both, and vLLM recomputes them
    assert transfers.load_now(target, moves, TOKENS).failed_block_ids == [5, 6]
    assert transfers.fetch("req-2", keys[3:]) == 1
    transfers.drop_fetched("req-2")  # the request finished before its load: nothing is kept for it
    assert transfers.take_fetched("req-2") == {}
    transfers.close()
