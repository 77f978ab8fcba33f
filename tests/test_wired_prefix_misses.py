"""The engine's prefix read reports its miss to the store: the first chunk missing after the cached run is a
miss its policies hear (what chain-arc learns from), and nothing past it is."""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.engine.prefix_kv import KVGeometry, PrefixKV
from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.policies import PrefixLRUPolicy
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="test-prefix-misses")
CHUNK = 4  # tokens per chunk
TEXT = Qwen3VLTextConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=64, head_dim=8)
GEOMETRY = KVGeometry.from_text_config(TEXT, torch.float32)


class Heard(PrefixLRUPolicy):
    """Leaf-first LRU that writes down the hits and misses it hears, as ``(event, key)``."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, bytes]] = []

    def hit(self, rec):
        self.log.append(("hit", rec.key))
        super().hit(rec)

    def miss(self, k):
        self.log.append(("miss", k))
        super().miss(k)


def prefix_kv() -> tuple[PrefixKV, TieredCache, Heard]:
    policy = Heard()
    store = TieredCache(CacheConfig(tiers=[TierConfig("host", 1 << 20, block_bytes=4096)], namespace=NS,
                                    prefetch_threads=0), policies=[policy])
    return PrefixKV(store, NS, CHUNK, TEXT, torch.device("cpu"), GEOMETRY), store, policy


def chunk(i: int) -> torch.Tensor:
    g = GEOMETRY
    return torch.full((g.layers, 2, g.kv_heads, CHUNK, g.head_dim), float(i))


def test_the_first_missing_chunk_after_the_cached_run_is_reported_as_a_miss():
    prefix, store, policy = prefix_kv()
    keys = prefix.keys(list(range(3 * CHUNK)), [])  # 3 full chunks
    store.put(keys[0], chunk(0))  # only the first is cached
    loaded = prefix.read(keys, None, 3 * CHUNK - 1)
    # the run of one chunk is loaded; the second chunk is the miss; the third is never asked about
    assert loaded is not None and loaded.n_tokens == CHUNK
    assert policy.log == [("hit", keys[0]), ("miss", keys[1])]
    assert store.stats()["misses"] == 1 and store.stats()["hits"] == 1
    store.close()


def test_a_prompt_with_nothing_cached_misses_on_its_first_chunk_only():
    prefix, store, policy = prefix_kv()
    keys = prefix.keys(list(range(100, 100 + 3 * CHUNK)), [])
    assert prefix.read(keys, None, 3 * CHUNK - 1) is None
    assert policy.log == [("miss", keys[0])] and store.stats()["misses"] == 1
    store.close()


def test_a_whole_cached_prefix_reports_no_miss():
    prefix, store, policy = prefix_kv()
    keys = prefix.keys(list(range(2 * CHUNK)), [])
    for i, k in enumerate(keys):
        store.put(k, chunk(i), parent=keys[i - 1] if i else None)
    loaded = prefix.read(keys, None, 2 * CHUNK)
    assert loaded is not None and loaded.n_tokens == 2 * CHUNK
    assert [e for e, _ in policy.log] == ["hit", "hit"] and store.stats()["misses"] == 0
    store.close()
