"""Host and disk tier throughput beside the limits measured in the same run.

For 8 MiB and 64 MiB entries (float32 tensors), each repetition runs, interleaved so machine noise hits
all alike (medians reported):

Memory cases, disk writes, warm reads and cold reads run as separate phases; within a phase the
order of the cases is shuffled every repetition. Ratios are medians of per-repetition ratios (each tier time against the limit measured beside it);
their quartiles are printed (``*_iqr`` in JSON) because on a shared machine they spread widely.

* memcpy limit: the faster of ``np.copyto`` (one plain memcpy) and ``torch.Tensor.copy_`` (torch's
  intra-op threads) from the source into preallocated, already-faulted buffers (``memcpy``, the limit
  for puts), and from those buffers into one output buffer (``memcpy_read``, the limit for gets).
* host tier put and get into a preallocated ``out`` (the path the cache uses); ``host_get_alloc`` is a
  get that returns a fresh tensor (pays first-touch page faults, informational).
* disk raw write limit: open a new file, one sequential write, fsync, close (the tier also fsyncs; it
  additionally writes a header, renames and fsyncs the directory). Each rep's file replaces the last.
* disk put: ``tier.put`` with fsync on.
* disk reads, two caching conditions, same for raw and tier:
  - warm: the file was just written, so its pages are in the page cache (raw = ``preadv`` into a
    preallocated buffer; tier = ``get(out=preallocated)``, which also verifies the xxh3-128 checksum);
  - cold: ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the (fsynced, hence clean) file before each read
    drops its pages, so the read comes from the device.
  ``disk_raw_read_gbps``/``disk_get_gbps`` are the warm numbers; cold ones are in ``sizes``.
  Raw files, tier entries and memcpy buffers each form a ring (>= 128 MiB in total, four times this machine's 32 MiB L3)
  and every repetition moves to the next one, so a warm read comes from the page cache in DRAM, not from
  the CPU cache the previous repetition left it in (which would make any per-byte work look huge).

Batched store (``batch``): one ``TieredCache.put_many`` of 64 distinct 1 MiB entries into a cache whose host
tier is empty, against ``memcpy`` of the same 64 sources into one preallocated, already-faulted 64 MiB buffer
(``np.copyto`` per entry), paired per repetition. What the store adds to the copies: the metadata (index,
policy, block ids) under one lock round, per-entry Python work, and the copy into the tier's slab outside the
lock. The entries are removed between repetitions, untimed. Target: >= 0.8x memcpy.

Device tier (``--device-tier DEV``, e.g. ``cuda``; off by default): a ``device`` tier (the production
defaults: 1 MiB blocks, zero on release) on DEV, for the same sizes, against the copies measured beside it
in the same run, each timed up to a ``synchronize`` of the device (on CPU the copies are ``np.copyto``, as the
tier's own CPU path is):

* ``d2d``: ``Tensor.copy_`` between two tensors on DEV (the limit for ``device_put`` of a tensor already on
  DEV and ``device_get`` into a preallocated ``out`` on DEV);
* ``h2d``/``d2h``: ``Tensor.copy_`` between page-locked host memory (as the host tier's slab is with CUDA)
  and DEV (the limits for ``device_put_from_host`` and ``device_get_to_host``: the tier fed from, and read
  into, page-locked host tensors).

Paired and shuffled per repetition like the host cases, over rings of >= 128 MiB on DEV (an H200's L2 is
50 MiB). No target is set for it; ``device_tier.worst_ratios`` is the lowest ratio over the sizes.
``--device-only`` runs only these rows (seconds; with ``--device-tier cpu`` it runs anywhere).

    python -m benchmarks.tiers [--json] [--reps N] [--dir PATH] [--batch-only] [--sizes MiB ...]
                               [--device-tier DEV [--device-only]]
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks import options
from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.factory import make_tier

MiB = 1 << 20
RING_BYTES = 128 * MiB
NS = Namespace(model="bench-tiers")


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(cases: dict, order: list[str], reps: int, seed: int, times: dict[str, list[float]], run,
                 after=None) -> None:
    """``reps`` repetitions of ``order``'s cases, shuffled each time (no case always runs right after the same
    neighbour: cache and position bias), appending ``run(case)``'s time to ``times``; ``after(name)`` runs
    untimed after each case."""
    shuffle = random.Random(seed).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            times[name].append(run(cases[name]))
            if after is not None:
                after(name)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_size(size: int, reps: int, root: str) -> dict:
    src = torch.randint(-1000, 1000, (size // 4,), dtype=torch.int32).view(torch.float32)
    src_bytes = src.view(torch.uint8).numpy()
    ring = max(2, -(-RING_BYTES // size))
    dsts = [torch.empty_like(src) for _ in range(ring)]
    for d in dsts:
        d.copy_(src)
    out = torch.empty_like(src)
    out.copy_(src)
    raw_buf = torch.empty(size, dtype=torch.uint8)
    raw_buf.fill_(0)
    raw_view = memoryview(raw_buf.numpy())

    host = make_tier(TierConfig("host", (ring + 1) * size), NS)
    disk = make_tier(TierConfig("disk", (ring + 1) * (size + 4096), path=os.path.join(root, "tier")), NS)
    key = b"bench-key-000001"
    keys = [b"bench-ring-%05d" % i for i in range(ring)]
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    raw_paths = [os.path.join(raw_dir, f"raw{i}.bin") for i in range(ring)]
    counter = [0]
    pos = {"w": 0, "r": 0, "pw": 0, "g": 0, "rc": 0, "gc": 0, "mn": 0, "mt": 0, "mr": 0, "hp": 0, "hg": 0}

    def nxt(name: str) -> int:
        pos[name] = (pos[name] + 1) % ring
        return pos[name]

    def raw_write():
        counter[0] += 1
        raw_path = raw_paths[nxt("w")]
        tmp = f"{raw_path}.{counter[0]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        view = memoryview(src_bytes)
        done = 0
        while done < size:
            done += os.write(fd, view[done:])
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, raw_path)

    def raw_read(raw_path=None):
        raw_path = raw_path or raw_paths[nxt("r")]
        fd = os.open(raw_path, os.O_RDONLY)
        got = 0
        while got < size:
            got += os.preadv(fd, [raw_view[got:]], got)
        os.close(fd)

    def raw_read_cold():
        path = raw_paths[nxt("rc")]
        _drop_cache(path)
        return _t(lambda: raw_read(path))

    def disk_get_cold():
        k = keys[nxt("gc")]
        _drop_cache(str(disk.path_of(k)))
        return _t(lambda: disk.get(k, out=out))

    dst_np, src_np, out_np = [d.numpy() for d in dsts], src.numpy(), out.numpy()
    cases = {
        "memcpy_np": lambda: _t(lambda: np.copyto(dst_np[nxt("mn")], src_np)),
        "memcpy_torch": lambda: _t(lambda: dsts[nxt("mt")].copy_(src)),
        "memcpy_read": lambda: _t(lambda: np.copyto(out_np, dst_np[nxt("mr")])),
        "host_put": lambda: _t(lambda: host.put(keys[nxt("hp")], src)),
        "host_get": lambda: _t(lambda: host.get(keys[nxt("hg")], out=out)),
        "host_get_alloc": lambda: _t(lambda: host.get(keys[0])),
        "disk_raw_write": lambda: _t(raw_write),
        "disk_put": lambda: _t(lambda: disk.put(keys[nxt("pw")], src)),
        "disk_raw_read": lambda: _t(raw_read),
        "disk_get": lambda: _t(lambda: disk.get(keys[nxt("g")], out=out)),
        "disk_raw_read_cold": raw_read_cold,
        "disk_get_cold": disk_get_cold,
    }
    for _ in range(ring):  # fill the rings (files and entries the reads use)
        raw_write()
        disk.put(keys[nxt("pw")], src)
        host.put(keys[nxt("hp")], src)
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    # Each tier runs beside its own limits; phases keep fsyncs and page-cache churn of the disk cases
    # from landing in the middle of the memory-speed cases.
    phases = [[k for k in cases if k.startswith(("memcpy", "host"))],
              ["disk_raw_write", "disk_put"], ["disk_raw_read", "disk_get"], ["disk_raw_read_cold", "disk_get_cold"]]
    for p, order in enumerate(phases):
        _interleaved(cases, order, reps, size + p, times, lambda case: case())
    same = lambda a: torch.equal(a.view(torch.int32), src.view(torch.int32))  # noqa: E731 - bit patterns, NaNs included
    assert same(out) and same(disk.get(keys[0])) and same(host.get(keys[1])), "benchmark read back wrong data"
    r = {f"{k}_gbps": size / statistics.median(v) / 1e9 for k, v in times.items()}
    r["memcpy_gbps"] = max(r["memcpy_np_gbps"], r["memcpy_torch_gbps"])
    r["size_mib"] = size // MiB
    # Ratios pair each repetition's tier time with the limit measured right beside it (same moment, same
    # noise from other processes) and take the median of those per-repetition ratios.
    mem = "memcpy_np" if r["memcpy_np_gbps"] >= r["memcpy_torch_gbps"] else "memcpy_torch"

    def paired(name: str, tier_case: str, limit_case: str) -> None:
        ratios = [b / a for a, b in zip(times[tier_case], times[limit_case])]
        r[name] = statistics.median(ratios)
        q = statistics.quantiles(ratios, n=4)
        r[name + "_iqr"] = [q[0], q[2]]  # spread of the per-repetition ratios: how noisy the machine was

    paired("host_put_vs_memcpy", "host_put", mem)
    paired("host_get_vs_memcpy", "host_get", "memcpy_read")
    paired("disk_put_vs_raw_write", "disk_put", "disk_raw_write")
    paired("disk_get_vs_raw_read", "disk_get", "disk_raw_read")
    paired("disk_get_cold_vs_raw_read_cold", "disk_get_cold", "disk_raw_read_cold")
    host.close()
    disk.remove_many(keys)
    for p in raw_paths:
        os.unlink(p)
    return r


def bench_batch(entries: int = 64, size: int = MiB, reps: int = 21) -> dict:
    """``put_many`` of ``entries`` x ``size`` into an empty host tier vs memcpy of the same bytes (module doc)."""
    srcs = [torch.randint(-1000, 1000, (size // 4,), dtype=torch.int32).view(torch.float32) for _ in range(entries)]
    src_np = [t.numpy() for t in srcs]
    dst = np.empty(entries * size // 4, dtype=np.float32)
    dst.fill(0)  # fault every page now, as the tier's slab is
    dsts = [dst[i * size // 4:(i + 1) * size // 4] for i in range(entries)]
    cache = TieredCache(CacheConfig(tiers=[TierConfig("host", entries * size)], namespace=NS, prefetch_threads=0))
    keys, parent = [], None
    for i in range(entries):  # one prompt's chain, as the engine and the connector store it
        parent = prefix_key(NS, parent, [i])
        keys.append(parent)
    items = [(k, t, keys[i - 1] if i else None) for i, (k, t) in enumerate(zip(keys, srcs))]

    def memcpy():
        for d, s in zip(dsts, src_np):
            np.copyto(d, s)

    def store():
        stored = cache.put_many(items)
        assert all(stored), "the batch did not fit its empty tier"

    cases = {"memcpy": memcpy, "put_many": store}
    for fn in cases.values():  # warm-up
        fn()
        cache.remove_many(keys)
    times: dict[str, list[float]] = {k: [] for k in cases}

    def check_and_empty(name: str) -> None:
        if name == "put_many":
            for k, t in zip(keys, srcs):
                assert torch.equal(cache.get(k, promote=False).view(torch.int32), t.view(torch.int32)), \
                    "benchmark read back wrong data"
            cache.remove_many(keys)  # the next repetition stores into an empty tier again

    _interleaved(cases, list(cases), reps, entries, times, _t, after=check_and_empty)
    cache.close()
    total = entries * size
    ratios = [m / p for m, p in zip(times["memcpy"], times["put_many"])]
    q = statistics.quantiles(ratios, n=4)
    return {"entries": entries, "entry_mib": size / MiB,
            "memcpy_gbps": total / statistics.median(times["memcpy"]) / 1e9,
            "put_many_gbps": total / statistics.median(times["put_many"]) / 1e9,
            "put_many_vs_memcpy": statistics.median(ratios), "put_many_vs_memcpy_iqr": [q[0], q[2]],
            "target_met": statistics.median(ratios) >= 0.8}


def bench_device(size: int, reps: int, device: str) -> dict:
    """A ``device`` tier on ``device`` against d2d, h2d and d2h copies of the same size (module doc)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)

    def timed(fn) -> float:  # a copy on the device is queued, not done, until the device synchronizes
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    host_src = torch.randint(-1000, 1000, (size // 4,), dtype=torch.int32)
    host_src = (host_src.pin_memory() if cuda else host_src).view(torch.float32)
    src = host_src.to(dev)
    ring = max(2, -(-RING_BYTES // size))
    dsts = [torch.empty_like(src) for _ in range(ring)]
    for d in dsts:
        d.copy_(src)
    out = torch.empty_like(src)
    host_out = torch.empty(host_src.shape, dtype=host_src.dtype, pin_memory=cuda)
    tier = make_tier(TierConfig("device", (ring + 1) * size, device=str(dev)), NS)
    keys = [b"bench-device%04d" % i for i in range(ring)]
    pos = {k: 0 for k in ("d2d", "h2d", "d2h", "put", "get", "put_h", "get_h")}

    def nxt(name: str) -> int:
        pos[name] = (pos[name] + 1) % ring
        return pos[name]

    def copy(dst: torch.Tensor, s: torch.Tensor) -> None:
        # On CPU the tier copies with numpy; torch's copy_ there is an OpenMP region that waits for threads
        # other tenants deschedule (~100x slower on this shared machine), so the limit takes numpy's too.
        if cuda:
            dst.copy_(s)
        else:
            np.copyto(dst.numpy(), s.numpy())

    cases = {
        "d2d": lambda: copy(dsts[nxt("d2d")], src),
        "h2d": lambda: copy(dsts[nxt("h2d")], host_src),
        "d2h": lambda: copy(host_out, dsts[nxt("d2h")]),
        "device_put": lambda: tier.put(keys[nxt("put")], src),
        "device_get": lambda: tier.get(keys[nxt("get")], out=out),
        "device_put_from_host": lambda: tier.put(keys[nxt("put_h")], host_src),
        "device_get_to_host": lambda: tier.get(keys[nxt("get_h")], out=host_out),
    }
    for k in keys:  # fill the ring the reads use
        assert tier.put(k, src), "the ring did not fit its device tier"
    sync()
    for fn in cases.values():  # warm-up
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in cases}
    _interleaved(cases, list(cases), reps, size, times, timed)
    same = lambda a: torch.equal(a.view(torch.int32).cpu(), host_src.view(torch.int32))  # noqa: E731 - bit patterns
    assert same(out) and same(host_out) and same(tier.get(keys[0])), "benchmark read back wrong data"
    r = {f"{k}_gbps": size / statistics.median(v) / 1e9 for k, v in times.items()}
    r["size_mib"] = size // MiB
    for name, tier_case, limit_case in (("device_put_vs_d2d", "device_put", "d2d"), ("device_get_vs_d2d", "device_get", "d2d"),
                                        ("device_put_from_host_vs_h2d", "device_put_from_host", "h2d"),
                                        ("device_get_to_host_vs_d2h", "device_get_to_host", "d2h")):
        ratios = [b / a for a, b in zip(times[tier_case], times[limit_case])]
        r[name] = statistics.median(ratios)
        q = statistics.quantiles(ratios, n=4)
        r[name + "_iqr"] = [q[0], q[2]]
    tier.close()
    return r


DEVICE_RATIOS = ("device_put_vs_d2d", "device_get_vs_d2d", "device_put_from_host_vs_h2d", "device_get_to_host_vs_d2h")


def run_device(device: str, sizes=(8 * MiB, 64 * MiB), reps: int = 21) -> dict:
    """``bench_device`` for each size, with the device's name and the worst ratio of each kind."""
    per = {f"{s // MiB}MiB": bench_device(s, reps, device) for s in sizes}
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": str(dev), "device_name": name, "sizes": per,
            "worst_ratios": {k: min(p[k] for p in per.values()) for k in DEVICE_RATIOS}}


def print_device(d: dict) -> None:
    print(f"device tier on {d['device']} ({d['device_name']})")
    cols = ["d2d", "device_put", "device_get", "h2d", "device_put_from_host", "d2h", "device_get_to_host"]
    print(f"{'GB/s':<22}" + "".join(f"{k:>10}" for k in d["sizes"]))
    for c in cols:
        print(f"{c:<22}" + "".join(f"{p[c + '_gbps']:>10.2f}" for p in d["sizes"].values()))
    for c in DEVICE_RATIOS:
        print(f"{c:<31}" + "".join(f"{p[c]:>7.2f}x [{p[c + '_iqr'][0]:.2f}-{p[c + '_iqr'][1]:.2f}]" for p in d["sizes"].values()))


def run(sizes=(8 * MiB, 64 * MiB), reps: int = 21, directory: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=directory, prefix="bench-tiers-") as root:
        per = {f"{s // MiB}MiB": bench_size(s, reps, root) for s in sizes}
    big = per[f"{max(sizes) // MiB}MiB"]
    headline = {k: big[k] for k in ("memcpy_gbps", "memcpy_read_gbps", "host_put_gbps", "host_get_gbps", "disk_raw_write_gbps",
                                    "disk_raw_read_gbps", "disk_put_gbps", "disk_get_gbps")}
    ratios = ("host_put_vs_memcpy", "host_get_vs_memcpy", "disk_put_vs_raw_write", "disk_get_vs_raw_read")
    worst = {k: min(p[k] for p in per.values()) for k in ratios}
    batch = bench_batch(reps=reps)
    worst["put_many_vs_memcpy"] = batch["put_many_vs_memcpy"]
    return {**headline, "headline_size_mib": max(sizes) // MiB, "worst_ratios": worst,
            "targets_met": all(v >= 0.8 for v in worst.values()), "sizes": per, "batch": batch}


def print_batch(b: dict) -> None:
    print(f"batched store: put_many of {b['entries']} x {b['entry_mib']:g} MiB into an empty host tier vs memcpy of the same bytes")
    print(f"{'GB/s':<20}{'memcpy':>10}{'put_many':>10}")
    print(f"{'':<20}{b['memcpy_gbps']:>10.2f}{b['put_many_gbps']:>10.2f}")
    iqr = b["put_many_vs_memcpy_iqr"]
    print(f"{'put_many_vs_memcpy':<31}{b['put_many_vs_memcpy']:>7.2f}x [{iqr[0]:.2f}-{iqr[1]:.2f}] "
          f"(target >= 0.8x: {'met' if b['target_met'] else 'NOT met'})")


def main(argv=None) -> None:
    ap = options.parser(__doc__)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--dir", default=None, help="where the disk tier and the raw files go (default: $TMPDIR)")
    ap.add_argument("--batch-only", action="store_true", help="only the batched store row (no disk, seconds; with --device-tier, its rows too)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64], metavar="MiB", help="entry sizes (default 8 64)")
    ap.add_argument("--device-tier", metavar="DEV", default=None,
                    help="also measure a device tier on DEV (cuda, cuda:N, cpu) against d2d/h2d/d2h copies")
    ap.add_argument("--device-only", action="store_true", help="only the device-tier rows (needs --device-tier)")
    args = ap.parse_args(argv)
    if args.device_only and not args.device_tier:
        ap.error("--device-only needs --device-tier")
    sizes = tuple(s * MiB for s in args.sizes)
    load0 = os.getloadavg()[0]
    if args.batch_only or args.device_only:
        res = {"batch": bench_batch(reps=args.reps)} if args.batch_only else {}
        if args.device_tier:
            res["device_tier"] = run_device(args.device_tier, sizes, args.reps)
        res["loadavg_1min"] = [load0, os.getloadavg()[0]]
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
        if "batch" in res:
            print_batch(res["batch"])
        if "device_tier" in res:
            print_device(res["device_tier"])
        if args.json:
            print(json.dumps(res))
        return
    device = run_device(args.device_tier, sizes, args.reps) if args.device_tier else None  # first: a bad DEV fails fast
    res = run(sizes=sizes, reps=args.reps, directory=args.dir)
    if device:
        res["device_tier"] = device
    res["loadavg_1min"] = [load0, os.getloadavg()[0]]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}, dir {args.dir or tempfile.gettempdir()}, "
          f"{os.cpu_count()} CPUs, load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (other processes share the machine)")
    cols = ["memcpy_np", "memcpy_torch", "memcpy", "memcpy_read", "host_put", "host_get", "host_get_alloc", "disk_raw_write", "disk_put", "disk_raw_read",
            "disk_get", "disk_raw_read_cold", "disk_get_cold"]
    print(f"{'GB/s':<20}" + "".join(f"{k:>10}" for k in res["sizes"]))
    for c in cols:
        print(f"{c:<20}" + "".join(f"{p[c + '_gbps']:>10.2f}" for p in res["sizes"].values()))
    print("ratios: median of per-repetition ratios [quartiles]")
    for c in ("host_put_vs_memcpy", "host_get_vs_memcpy", "disk_put_vs_raw_write", "disk_get_vs_raw_read",
              "disk_get_cold_vs_raw_read_cold"):
        print(f"{c:<31}" + "".join(f"{p[c]:>7.2f}x [{p[c + '_iqr'][0]:.2f}-{p[c + '_iqr'][1]:.2f}]" for p in res["sizes"].values()))
    print_batch(res["batch"])
    print(f"targets (>= 0.8x, worst size): {'met' if res['targets_met'] else 'NOT met'} {res['worst_ratios']}")
    if "device_tier" in res:
        print_device(res["device_tier"])
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
