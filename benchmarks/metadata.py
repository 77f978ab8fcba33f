"""Metadata cost of the tier indexes: bytes per cached entry and lookup time as entries grow.

* bytes/entry: ``tracemalloc`` traced memory after N stores minus before, divided by N. It counts
  everything the tier keeps per entry: the 16-byte key object, the dict slot, the index record (a pooled
  tier used alone: a ``Placement`` with its location int and interned spec; disk tier: file size). The bytes of the entries themselves
  live in the slab / in files and are not metadata. For the disk tier the index is also measured as
  rebuilt from the directory by a fresh tier (the steady state after a restart). Target: <= 256 B.
* the whole store: a ``TieredCache`` over one host tier, so everything the store, the policy and the tier
  keep per entry is counted, for LRU and for the default (prefix-aware) policy; KV chunks are stored as
  chains (``parent`` = previous chunk), as the engine stores them. Under a store the pooled tier keeps no
  index: the entry's location (payload length and block runs packed in one int, 32 B for entries under
  256 MiB whatever their size) is a field of the store's one record of it, so the 64-byte entries here
  cost what large ones do.
* lookup: ``contains(key)`` and a hit ``get`` of a tiny entry, per operation (best of several rounds),
  on random present keys;
  flat means the cost at the largest N is within a small factor of the smallest (dict lookups, no scans).

    python -m benchmarks.metadata [--json] [--max-entries N]
"""

from __future__ import annotations

import gc
import json
import random
import tempfile
import time
import tracemalloc

import torch

from benchmarks import options
from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.policies import DEFAULT_POLICY
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.factory import make_tier

NS = Namespace(model="bench-metadata")
ENTRY = torch.arange(16, dtype=torch.float32).reshape(2, 1, 2, 4)  # 64 B, a 4-D KV-like shape


def _keys(n: int) -> list[bytes]:
    return [i.to_bytes(8, "little") + b"metadata" for i in range(n)]


def _per_op_ns(fn, sample: list[bytes], rounds: int = 7) -> float:
    """Best of ``rounds`` (the least disturbed by other processes on a shared machine), ns per call."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for k in sample:
            fn(k)
        best = min(best, time.perf_counter() - t0)
    return best / len(sample) * 1e9


def _lookup_ns(tier, keys: list[bytes], ops: int = 4000) -> tuple[float, float]:
    rng = random.Random(0)
    sample = [keys[rng.randrange(len(keys))] for _ in range(ops)]
    return _per_op_ns(tier.contains, sample), _per_op_ns(tier.get, sample[: ops // 10], rounds=3)


def _traced_bytes(fill) -> int:
    """Bytes that ``fill()`` leaves allocated (tracemalloc), after a collection so garbage doesn't count."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fill()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before


def _row(name: str, store, keys: list[bytes], nbytes: int) -> dict:
    contains_ns, get_ns = _lookup_ns(store, keys)
    assert len(store) == len(keys)
    return {"tier": name, "entries": len(keys), "bytes_per_entry": nbytes / len(keys),
            "contains_ns": contains_ns, "get_ns": get_ns}


def pooled_row(kind: str, n: int) -> dict:
    tier = make_tier(TierConfig(kind, (n + 16) * 64, block_bytes=64, device="cpu"), NS)
    keys = _keys(n)
    return _row(kind, tier, keys, _traced_bytes(lambda: [tier.put(k, ENTRY) for k in keys]))


def cache_row(policy: str, n: int, chain: int = 16) -> dict:
    cache = TieredCache(CacheConfig(
        tiers=[TierConfig("host", (n + 16) * 64, block_bytes=64)], policy=policy, namespace=NS, prefetch_threads=0))
    keys = _keys(n)

    def fill():
        for i, k in enumerate(keys):
            cache.put(k, ENTRY, parent=keys[i - 1] if i % chain else None)

    return _row(f"cache/{policy}", cache, keys, _traced_bytes(fill))


def disk_row(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-meta-") as d:
        cfg = TierConfig("disk", 1 << 40, path=d, fsync=False)
        tier = make_tier(cfg, NS)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        keys = _keys(n)
        for k in keys:
            assert tier.put(k, ENTRY)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del tier
        gc.collect()
        tracemalloc.start()
        before_rebuild = tracemalloc.get_traced_memory()[0]
        fresh = make_tier(cfg, NS)  # index rebuilt from the directory
        after_rebuild = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(fresh) == n
        contains_ns, get_ns = _lookup_ns(fresh, keys)
        return {"tier": "disk", "entries": n, "bytes_per_entry": (after - before) / n,
                "bytes_per_entry_rebuilt": (after_rebuild - before_rebuild) / n,
                "contains_ns": contains_ns, "get_ns": get_ns}


def run(max_entries: int = 100_000, max_disk_entries: int = 10_000) -> dict:
    sizes = [n for n in (1_000, 10_000, 100_000, 1_000_000) if n <= max_entries]
    rows = [pooled_row("host", n) for n in sizes] + [pooled_row("device", n) for n in sizes[:2]]
    rows += [disk_row(n) for n in sizes if n <= max_disk_entries]
    cache_kinds = []
    for policy in dict.fromkeys(("lru", DEFAULT_POLICY)):
        cache_kinds.append(f"cache/{policy}")
        rows += [cache_row(policy, n) for n in sizes]
    flat = {}
    for kind in ("host", "device", "disk", *cache_kinds):
        rs = [r for r in rows if r["tier"] == kind]
        flat[kind] = rs[-1]["contains_ns"] / rs[0]["contains_ns"]
    worst = max(max(r["bytes_per_entry"], r.get("bytes_per_entry_rebuilt", 0)) for r in rows)
    return {"rows": rows, "max_bytes_per_entry": worst, "lookup_growth": flat,
            "target_met": worst <= 256 and all(v < 3 for v in flat.values())}


def main(argv=None) -> None:
    ap = options.parser(__doc__)
    ap.add_argument("--max-entries", type=int, default=100_000)
    ap.add_argument("--max-disk-entries", type=int, default=10_000)
    args = ap.parse_args(argv)
    res = run(args.max_entries, args.max_disk_entries)
    print(f"{'store':<16} {'entries':>9} {'B/entry':>8} {'B/entry rebuilt':>16} {'contains ns':>12} {'get ns':>9}")
    for r in res["rows"]:
        rb = r.get("bytes_per_entry_rebuilt")
        print(f"{r['tier']:<16} {r['entries']:>9} {r['bytes_per_entry']:>8.0f} {('%.0f' % rb) if rb else '-':>16} "
              f"{r['contains_ns']:>12.0f} {r['get_ns']:>9.0f}")
    print(f"max bytes/entry {res['max_bytes_per_entry']:.0f} (target <= 256); contains() cost growth smallest->largest N: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in res["lookup_growth"].items())
          + f"; targets {'met' if res['target_met'] else 'NOT met'}")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
