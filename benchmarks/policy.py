"""Eviction policies on prefix-shaped block traces, beside LRU and Belady's optimum.

    PYTHONPATH=. python -m benchmarks.policy [--json] [--trace PATH] [--policies a,b] [--no-synthetic]

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
replay counts prefix hits anyway and would show any difference). On the Mooncake trace this reproduces
the README's reference figures (LRU 0.082 / 0.188 / 0.423 / 0.624 and Belady 0.277 / 0.447 / 0.618 / 0.640
at 1k / 3k / 10k / 30k blocks); MIN without bypass scores within 0.01 of it (0.269 / 0.444 / 0.617 / 0.640).

Chain oracle (``ChainOracle``, offline, column ``chain-oracle``): leaf-first with perfect per-chain
statistics (requests left on each chain, each chain's request rate) but not the arrival times. On the
Mooncake trace it scores 0.104 / 0.259 / 0.535 / 0.640: even exact chain statistics close only 28% of the
LRU->Belady gap at 3k blocks, because chains come back after a median ~560 requests (~17k block accesses,
far beyond a 3k-block cache) at times that per-chain history barely predicts (log consecutive gaps of a
chain correlate at 0.31). The rest of Belady's lead is clairvoyance about *when*. (It is no bound on the
multi-turn trace, whose chain heads are shared system prompts: see ``ChainOracle``.)

Measured here (2 shared cores): the default ``prefix-lru`` is >= LRU at every capacity of every trace; at
the largest LRU->Belady gap it closes 1% on Mooncake (0.1906 vs LRU 0.1878 @ 3k). The opt-in ``chain-arc`` is
also >= LRU everywhere and closes 6% on Mooncake (0.2045), 23% on Zipf, 36% on Zipf+scan and 3% on
multi-turn; it is not the default because it breaks more chat sessions under pressure (``benchmarks.capacity``,
see ``qwen3vl_ray.policies``).

Traces: the Mooncake trace at 1k/3k/10k/30k blocks, and the synthetic ones of ``benchmarks.traces`` (Zipf
documents, Zipf with long one-shot scans, multi-turn chats on shared system prompts) at 2%, 5%, 12.5% and
33% of their unique blocks.

Also printed: index memory per entry (tracemalloc over 100k inserts) and lookup/update cost as the number
of entries grows (should stay flat).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import time
import tracemalloc
from pathlib import Path

from benchmarks.traces import MOONCAKE_TRACE, SYNTHETIC, Trace, load_mooncake
from qwen3vl_ray.policies import DEFAULT_POLICY, POLICIES, make_policy
from qwen3vl_ray.policies.base import EvictionPolicy
from qwen3vl_ray.policies.prefix import PrefixLRUPolicy, _Node

BLOCK = 1  # every block has the same size; capacities are in blocks


def prefix_hits(req, cached) -> int:
    """Leading blocks of ``req`` present in ``cached``: a prefix hit stops at the first missing block."""
    n = 0
    for b in req:
        if b not in cached:
            break
        n += 1
    return n


def replay(policy: EvictionPolicy, trace: Trace, capacity: int) -> float:
    """Block-level prefix-hit ratio of ``policy`` with room for ``capacity`` blocks."""
    cached: set[int] = set()
    hits = total = 0
    in_flight: set[int] = set()
    not_in_flight = lambda k: k not in in_flight  # noqa: E731
    for req in trace:
        total += len(req)
        hits += prefix_hits(req, cached)
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
        hits += prefix_hits(req, cached)
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


class ChainOracle(PrefixLRUPolicy):
    """An offline reference between LRU and Belady: leaf-first, and it knows, for every chain head, how many
    more requests will use that chain and the chain's mean request rate over its lifetime (not *when* they
    come). Leaves of chains with no request left go first, then chains by ascending rate, LRU within a rate.
    It bounds what per-chain statistics alone (reuse count, frequency) can buy an online policy: an online
    policy can only estimate these numbers, so scoring near this line means the rest of the gap to Belady
    needs the arrival times themselves. Only meaningful where a chain head is one conversation or document
    (Mooncake, Zipf); on the multi-turn trace the heads are system prompts shared by many chats, their
    statistics say nothing about one chat, and this line falls below LRU."""

    name = "chain-oracle"

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        uses: dict[int, list[int]] = {}
        for i, req in enumerate(trace):
            if req:
                uses.setdefault(req[0], []).append(i)
        self._left = {head: len(idx) for head, idx in uses.items()}
        # requests per request of lifetime; a chain used once has no rate
        self._rate = {h: (len(ix) / (ix[-1] - ix[0] + 1) if len(ix) > 1 else 0.0) for h, ix in uses.items()}

    def _head(self, node: _Node) -> _Node:
        while isinstance(node.parent, _Node):
            node = node.parent
        return node

    def _priority(self, node: _Node) -> int:
        head = self._head(node).key
        if self._left.get(head, 0) <= 0:
            return self._clock - (1 << 40)
        return self._clock + int(self._rate[head] * (1 << 20))

    def _on_new(self, node: _Node) -> None:
        if node.parent is None and node.key in self._left:
            self._left[node.key] -= 1

    def on_access(self, key: int) -> None:
        node = self._nodes.get(key)
        if node is not None and node.parent is None and key in self._left:
            self._left[key] -= 1
        super().on_access(key)


def metadata_bytes_per_entry(name: str, n: int = 100_000, chain: int = 16) -> float:
    """Index memory per entry: tracemalloc growth while ``n`` chained 16-byte keys are inserted (the keys
    themselves are allocated before measuring: the cache owns them)."""
    keys = [os.urandom(16) for _ in range(n)]
    policy = make_policy(name)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, k in enumerate(keys):
        policy.on_insert(k, 1, keys[i - 1] if i % chain else None)
    for k in keys[::7]:
        policy.on_access(k)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


def op_cost_ns(name: str, n: int, ops: int = 20_000) -> float:
    """Mean cost of one access plus one insert-with-eviction on a full policy of ``n`` entries. ``name``
    "dict" is the baseline: the same lookups, pops and inserts on a plain dict of ``n`` keys (what any
    index pays; its growth with ``n`` is the machine's cache hierarchy, not the policy)."""
    keys = [os.urandom(16) for _ in range(n + ops)]
    if name == "dict":
        return _dict_cost_ns(keys, n, ops)
    policy = make_policy(name)
    for i in range(n):
        policy.on_insert(keys[i], 1, keys[i - 1] if i % 16 else None)
    always = lambda k: True  # noqa: E731
    rng = random.Random(0)
    probe = [keys[rng.randrange(n)] for _ in range(ops)]
    best = float("inf")
    for lo in range(0, ops, ops // _ROUNDS):  # best of rounds: the machine is shared and noisy
        t0 = time.perf_counter()
        for j in range(lo, lo + ops // _ROUNDS):
            policy.on_access(probe[j])
            victims = policy.victims(always)
            victim = next(victims)
            policy.on_remove(victim)
            victims.close()
            k = keys[n + j]
            policy.on_miss(k)
            policy.on_insert(k, 1, None)
        best = min(best, (time.perf_counter() - t0) / (ops // _ROUNDS))
    return best * 1e9


_ROUNDS = 4


def _dict_cost_ns(keys: list[bytes], n: int, ops: int) -> float:
    index = dict.fromkeys(keys[:n], 0)
    rng = random.Random(0)
    probe = [keys[rng.randrange(n)] for _ in range(ops)]
    best = float("inf")
    for lo in range(0, ops, ops // _ROUNDS):
        t0 = time.perf_counter()
        for j in range(lo, lo + ops // _ROUNDS):
            index[probe[j]] = j
            index.pop(keys[j], None)  # the oldest key, as an LRU victim would be
            index[keys[n + j]] = j
        best = min(best, (time.perf_counter() - t0) / (ops // _ROUNDS))
    return best * 1e9


def synthetic_traces() -> dict[str, tuple[Trace, list[int]]]:
    """Each synthetic trace with capacities at 2%, 5%, 12.5% and 33% of its unique blocks."""
    out = {}
    for name, gen in SYNTHETIC.items():
        trace = gen()
        unique = len({b for req in trace for b in req})
        out[name] = (trace, [unique // 50, unique // 20, unique // 8, unique // 3])
    return out


MOONCAKE_CAPACITIES = [1000, 3000, 10000, 30000]  # the trace README's reference points (of 43,924 unique blocks)


def trace_capacities(trace: Trace, args: argparse.Namespace) -> list[int]:
    """The capacities to replay ``trace`` at: ``--capacities``, the reference points for the shipped trace,
    or the same fractions of another trace's unique blocks (so a larger trace is not measured at tiny caches)."""
    if args.capacities:
        try:
            caps = [int(c) for c in args.capacities.split(",") if c.strip()]
        except ValueError:
            raise SystemExit(f"--capacities must be comma-separated block counts, got {args.capacities!r}") from None
        if not caps or min(caps) < 1:
            raise SystemExit(f"--capacities must be block counts >= 1, got {args.capacities!r}")
        return caps
    if args.trace == MOONCAKE_TRACE:
        return MOONCAKE_CAPACITIES
    unique = len({b for req in trace for b in req})
    return sorted({max(1, unique * c // 43_924) for c in MOONCAKE_CAPACITIES})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Replay block traces through each eviction policy, LRU and Belady.")
    ap.add_argument("--json", action="store_true", help="print one JSON list as the last line")
    ap.add_argument("--trace", type=Path, default=MOONCAKE_TRACE, help="Mooncake-format jsonl trace")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policy names")
    ap.add_argument("--capacities", default="",
                    help="comma-separated capacities in blocks for --trace (default: 1k,3k,10k,30k for the shipped "
                         "Mooncake trace, else the same fractions of the trace's unique blocks: 1/44, 3/44, 10/44, 30/44)")
    ap.add_argument("--no-synthetic", action="store_true", help="replay only the Mooncake trace")
    args = ap.parse_args(argv)
    names = [p for p in args.policies.split(",") if p]
    for p in names:
        make_policy(p)  # fail fast on a bad name
    trace = load_mooncake(args.trace)
    traces = {"mooncake" if args.trace == MOONCAKE_TRACE else args.trace.stem: (trace, trace_capacities(trace, args))}
    if not args.no_synthetic:
        traces.update(synthetic_traces())

    rows: list[dict] = []
    t_start = time.perf_counter()
    slowest = 0.0
    for tname, (trace, caps) in traces.items():
        accesses = sum(map(len, trace))
        print(f"\n{tname}: {len(trace)} requests, {accesses} block accesses")
        refs = ["chain-oracle", "belady"]
        print(f"{'capacity':>9} " + " ".join(f"{p:>12}" for p in names + refs) + "  default-LRU  gap closed")
        for cap in caps:
            ratios = {}
            for p in names:
                t0 = time.perf_counter()
                ratios[p] = replay(make_policy(p), trace, cap)
                slowest = max(slowest, time.perf_counter() - t0)
            ratios["chain-oracle"] = replay(ChainOracle(trace), trace, cap)
            ratios["belady"] = belady(trace, cap)
            for p, r in ratios.items():
                rows.append({"trace": tname, "capacity": cap, "policy": p, "hit_ratio": round(r, 4)})
            line = f"{cap:>9} " + " ".join(f"{ratios[p]:>12.4f}" for p in names + refs)
            if "lru" in ratios and DEFAULT_POLICY in ratios:
                gain = ratios[DEFAULT_POLICY] - ratios["lru"]
                gap = ratios["belady"] - ratios["lru"]
                line += f"  {gain:+11.4f}  {gain / gap if gap > 1e-9 else float('nan'):10.2f}"
            print(line)
    print(f"\nslowest single replay {slowest:.1f} s; all replays {time.perf_counter() - t_start:.0f} s")
    if "lru" in names and DEFAULT_POLICY in names:
        print(summary(rows))

    print("\nindex memory per entry (tracemalloc, 100k chained entries; target <= 256 B) and the cost of one")
    print("access + evict + insert vs entries, as ns and as a multiple of a plain dict doing the same at that size:")
    print(f"{'policy':>11} {'B/entry':>8} " + " ".join(f"{'ns@' + str(n):>10} {'x dict':>6}" for n in COST_SIZES))
    base = [op_cost_ns("dict", n) for n in COST_SIZES]
    print(f"{'dict':>11} {'':>8} " + " ".join(f"{c:>10.0f} {1:>6.1f}" for c in base))
    memory = {}
    for p in names:
        memory[p] = metadata_bytes_per_entry(p)
        costs = [op_cost_ns(p, n) for n in COST_SIZES]
        print(f"{p:>11} {memory[p]:>8.0f} " + " ".join(f"{c:>10.0f} {c / b:>6.1f}" for c, b in zip(costs, base)))
    if args.json:
        print(json.dumps(rows))


COST_SIZES = (1_000, 10_000, 100_000)


def summary(rows: list[dict]) -> str:
    """Checks the issue's targets: default >= LRU everywhere; share of the LRU->Belady gap it closes where
    that gap is largest (per trace)."""
    by = {(r["trace"], r["capacity"], r["policy"]): r["hit_ratio"] for r in rows}
    out = [f"\ndefault policy: {DEFAULT_POLICY}"]
    worst = min((by[(t, c, DEFAULT_POLICY)] - by[(t, c, "lru")], t, c) for (t, c, p) in by if p == "lru")
    out.append(f"default - LRU, worst case: {worst[0]:+.4f} ({worst[1]} @ {worst[2]})"
               f" -> {'OK' if worst[0] >= 0 else 'BELOW LRU'}")
    for trace in dict.fromkeys(t for (t, _, _) in by):
        caps = [c for (t, c, p) in by if t == trace and p == "lru"]
        cap = max(caps, key=lambda c: by[(trace, c, "belady")] - by[(trace, c, "lru")])
        gap = by[(trace, cap, "belady")] - by[(trace, cap, "lru")]
        gain = by[(trace, cap, DEFAULT_POLICY)] - by[(trace, cap, "lru")]
        out.append(f"{trace}: largest LRU->Belady gap {gap:.4f} @ {cap}; default closes {gain / gap:.0%} of it"
                   f" (target >= 25%)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
