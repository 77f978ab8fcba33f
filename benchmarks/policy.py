"""Eviction policies on prefix-shaped block traces, beside LRU and Belady's optimum.

    PYTHONPATH=. python -m benchmarks.policy [--json] [--trace PATH] [--quick]

Replay (prefix-hit semantics, as ``../shared/traces/README.md``): a request's hits are its leading blocks
that are cached, stopping at the first missing one; then every block of the request is used in order, a
cached one with ``on_access`` and a missing one (after ``on_miss``, ``admit``) with ``on_insert(parent =
previous block)``, evicting first if the cache is full. The request's own blocks are in flight and not
evictable while it runs. Hit ratio = hits / all block accesses.

Belady: the offline optimum (MIN with bypass) on the same replay: when a block must be inserted into a full
cache, drop whichever of the cached blocks *or the incoming one* is used again furthest in the future.
Prefix semantics need no special case: every request that uses a block uses its whole prefix first, so a
parent's next use always comes before its child's. MIN therefore never drops a parent while a child that
will be used stays, the cache is always a union of usable prefixes, and prefix hits equal flat hits (the
replay counts prefix hits anyway and would show any difference).

Also printed: index memory per entry (tracemalloc over 100k inserts) and lookup/update cost as the number
of entries grows (should stay flat).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

from benchmarks.traces import MOONCAKE_TRACE, SYNTHETIC, Trace, load_mooncake
from qwen3vl_ray.policies import DEFAULT_POLICY, POLICIES, make_policy
from qwen3vl_ray.policies.base import EvictionPolicy

BLOCK = 1  # every block has the same size; capacities are in blocks


def replay(policy: EvictionPolicy, trace: Trace, capacity: int) -> float:
    """Block-level prefix-hit ratio of ``policy`` with room for ``capacity`` blocks."""
    cached: set[int] = set()
    hits = total = 0
    in_flight: set[int] = set()
    not_in_flight = lambda k: k not in in_flight  # noqa: E731
    for req in trace:
        total += len(req)
        for b in req:
            if b not in cached:
                break
            hits += 1
        in_flight = set(req)
        parent = None
        for b in req:
            if b in cached:
                policy.on_access(b)
            else:
                policy.on_miss(b)
                if policy.admit(b, BLOCK, parent):
                    if len(cached) >= capacity:
                        victims = policy.victims(not_in_flight)
                        victim = next(victims, None)
                        if victim is None:  # everything in flight: skip caching this block
                            victims.close()
                            parent = b
                            continue
                        cached.remove(victim)
                        policy.on_remove(victim)
                        victims.close()
                    cached.add(b)
                    policy.on_insert(b, BLOCK, parent)
            parent = b
    return hits / total if total else 0.0


def belady(trace: Trace, capacity: int) -> float:
    """Prefix-hit ratio of Belady's MIN (with bypass) on the same replay."""
    flat = [b for req in trace for b in req]
    nxt = [0] * len(flat)
    last: dict[int, int] = {}
    never = len(flat)
    for i in range(len(flat) - 1, -1, -1):
        nxt[i] = last.get(flat[i], never)
        last[flat[i]] = i
    cached: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block), lazily invalidated
    hits = total = 0
    i = 0
    for req in trace:
        total += len(req)
        for b in req:
            if b not in cached:
                break
            hits += 1
        for b in req:
            n = nxt[i]
            i += 1
            if b in cached:
                cached[b] = n
                heapq.heappush(heap, (-n, b))
                continue
            if len(cached) >= capacity:
                while -heap[0][0] != cached.get(heap[0][1], -1):
                    heapq.heappop(heap)
                if -heap[0][0] <= n:  # the incoming block is needed last: bypass it
                    continue
                del cached[heapq.heappop(heap)[1]]
            cached[b] = n
            heapq.heappush(heap, (-n, b))
            if len(heap) > 4 * capacity + 64:
                heap = [(-m, k) for k, m in cached.items()]
                heapq.heapify(heap)
    return hits / total if total else 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace", type=Path, default=MOONCAKE_TRACE)
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args(argv)
    traces = {"mooncake": (load_mooncake(args.trace), [1000, 3000, 10000, 30000])}
    for name, gen in SYNTHETIC.items():
        t = gen()
        u = len({b for r in t for b in r})
        traces[name] = (t, [u // 50, u // 20, u // 8, u // 3])
    rows = []
    for tname, (trace, caps) in traces.items():
        for cap in caps:
            for pname in args.policies.split(","):
                t0 = time.perf_counter()
                r = replay(make_policy(pname), trace, cap)
                dt = time.perf_counter() - t0
                rows.append({"trace": tname, "capacity": cap, "policy": pname, "hit_ratio": round(r, 4)})
                print(f"{tname:11s} {cap:6d} {pname:12s} {r:.4f}  {dt:.1f}s", file=sys.stderr)
            rows.append({"trace": tname, "capacity": cap, "policy": "belady", "hit_ratio": round(belady(trace, cap), 4)})
            print(rows[-1], file=sys.stderr)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
