"""Block pool vs fresh allocation vs a copy into one preallocated buffer.

For 8 MiB and 64 MiB slots: acquire a slot + fill it from a source tensor + release it, against
``torch.empty`` + the same fill (a fresh tensor each time), against a plain copy into one preallocated
buffer (the limit). All run interleaved in the same loop so machine noise hits them alike; the median of
the repetitions is reported. Target: pool >= 0.8x the preallocated copy.

Zero on release (the default: pools are shared between tenants) is measured as its own case, the same cycle
with the slot zeroed when it comes back: ``zero_cost`` is the extra time of a cycle over the plain pool's
(one memset of the released bytes; the fill itself is one copy, so expect up to ~+50%), and
``zero_gbps`` the rate at which released bytes are zeroed.

Note: glibc serves allocations below its dynamic mmap threshold (grows up to 32 MiB) from reused heap
pages, so a fresh 8 MiB tensor may not page-fault; at 64 MiB every fresh tensor is a new mmap and pays
first-touch faults. That is what the "fresh" column shows.

    python -m benchmarks.pools [--json] [--reps N]
"""

from __future__ import annotations

import json
import random
import statistics
import time

import torch

from benchmarks import options
from qwen3vl_ray.pools import BlockPool

MiB = 1 << 20


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(sizes=(8 * MiB, 64 * MiB), reps: int = 15) -> list[dict]:
    rows = []
    for size in sizes:
        src = torch.randint(0, 256, (size,), dtype=torch.uint8)
        dst = torch.empty(size, dtype=torch.uint8)
        dst.copy_(src)  # fault it in: this is the preallocated limit
        pool = BlockPool((size,), torch.uint8, capacity=2, device="cpu", zero_on_release=False)
        zpool = BlockPool((size,), torch.uint8, capacity=2, device="cpu", zero_on_release=True)

        def pooled(p=pool):
            h = p.acquire()
            h.tensor.copy_(src)
            h.release()

        def fresh():
            t = torch.empty(size, dtype=torch.uint8)
            t.copy_(src)
            del t

        def prealloc():
            dst.copy_(src)

        cases = {"prealloc": prealloc, "pool": pooled, "pool_zero_on_release": lambda: pooled(zpool), "fresh": fresh}
        for fn in cases.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        order = list(cases)
        for _ in range(reps):
            random.Random(len(times[order[0]])).shuffle(order)  # no fixed neighbour: no position bias
            for name in order:
                times[name].append(_timed(cases[name]))
        med = {k: statistics.median(v) for k, v in times.items()}
        gbps = {k: size / t / 1e9 for k, t in med.items()}
        extra = med["pool_zero_on_release"] - med["pool"]
        rows.append({
            "size_mib": size // MiB,
            "prealloc_copy_gbps": gbps["prealloc"],
            "pool_gbps": gbps["pool"],
            "pool_zero_on_release_gbps": gbps["pool_zero_on_release"],
            "fresh_alloc_gbps": gbps["fresh"],
            "pool_vs_prealloc": gbps["pool"] / gbps["prealloc"],
            "pool_zero_vs_prealloc": gbps["pool_zero_on_release"] / gbps["prealloc"],
            "zero_cost": extra / med["pool"],  # extra time per acquire + fill + release cycle
            "zero_gbps": size / extra / 1e9 if extra > 0 else float("inf"),
            "pool_vs_fresh": gbps["pool"] / gbps["fresh"],
        })
        del pool, zpool
    return rows


def main(argv=None) -> None:
    ap = options.parser(__doc__)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    rows = run(reps=args.reps)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    print(f"{'size':>7} {'prealloc GB/s':>14} {'pool GB/s':>10} {'pool+zero':>10} {'fresh GB/s':>11} {'pool/prealloc':>14} "
          f"{'pool/fresh':>11} {'zero cost':>10} {'zero GB/s':>10}")
    for r in rows:
        print(f"{r['size_mib']:>4}MiB {r['prealloc_copy_gbps']:>14.2f} {r['pool_gbps']:>10.2f} {r['pool_zero_on_release_gbps']:>10.2f} "
              f"{r['fresh_alloc_gbps']:>11.2f} {r['pool_vs_prealloc']:>14.2f} {r['pool_vs_fresh']:>11.2f} "
              f"{r['zero_cost']:>+9.0%} {r['zero_gbps']:>10.2f}")
    target = min(r["pool_vs_prealloc"] for r in rows)
    zero_cost = max(r["zero_cost"] for r in rows)
    print(f"target pool >= 0.8x preallocated copy: {'met' if target >= 0.8 else 'NOT met'} (worst {target:.2f}x)")
    print(f"zero on release (default): {zero_cost:+.0%} per acquire + fill + release at worst "
          f"(pool+zero {min(r['pool_zero_vs_prealloc'] for r in rows):.2f}x the preallocated copy)")
    if args.json:
        print(json.dumps({"rows": rows, "pool_vs_prealloc_min": target, "target_met": target >= 0.8,
                          "zero_on_release_cost_max": zero_cost}))


if __name__ == "__main__":
    main()
