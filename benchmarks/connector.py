"""KV connector data path: blocks between vLLM's paged layout and each tier, against memcpy of the same bytes.

    python -m benchmarks.connector [--json] [--reps N] [--blocks N] [--dir PATH] [--quick]

What the connector's worker side does per step, on synthetic data of a real geometry (Qwen3-VL-2B: 28 layers,
8 KV heads, head_dim 128, bf16, vLLM's CPU block of 128 tokens: one block entry ``[28, 8, 128, 256]`` is
14 MiB), ``--blocks`` blocks at a time (24: 336 MiB, ten times this machine's 32 MiB L3):

* paged KV: one tensor per layer ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``, all layers views
  of one buffer (vLLM's CPU layout), ``2 * --blocks`` blocks; the saved block ids and the loaded-into ones
  are disjoint random sets (vLLM's block ids are not contiguous);
* save = ``PagedBlocks.gather`` + ``LocalBlockStore.save_many`` (``wait_for_save``); every repetition saves
  fresh keys, so the tier evicts older entries as it does in steady state (its budget holds two batches);
* load = ``LocalBlockStore.load_with_tiers`` + ``PagedBlocks.scatter`` per block (``start_load_kv``), of
  the batch the last save stored;
* stores, each made through the connector's own settings path (``LocalBlockStore.from_settings``):
  ``host`` (no codec); ``host-kv-int8`` and ``host-int8`` (the host tier's codec: encode on save, decode on
  load; a codec that refuses the block entry is a row saying why; the connector's entries hold keys and
  values apart, ``[layers, 2, heads, tokens, head_dim]``, which kv-int8 takes); ``disk``:
  a host tier smaller than one block, so every save goes to the disk tier (write + fsync of file and
  directory) and every load reads it, with no promotion into host memory in between: the disk path alone.
  Its loads come from the page cache (the files were just written); ``disk cold`` drops the files' pages
  first (``posix_fadvise(DONTNEED)`` on the fsynced files, outside the timing), so they come from the device.
* reference ``one copy_``: each (block, layer) copied once between the paged KV and a preallocated
  contiguous buffer: the one copy a connector cannot avoid, i.e. what save and load cost if the tier's own
  memory were the destination (no gather temporaries, no fresh allocations, no second copy);
* limit: memcpy of the same number of bytes between two preallocated, already-faulted buffers (the faster
  of ``np.copyto`` and ``Tensor.copy_``, as in ``benchmarks.tiers``).

Threads: one by default (``--threads``), as vLLM's CPU worker runs its connector (bound to one core unless
``VLLM_CPU_OMP_THREADS_BIND`` gives it more). With two threads on this shared 2-core machine, each of the
hundreds of small per-layer copies is an OpenMP region that waits for a descheduled second thread, which
measured the copies 10-30x slower and says more about the neighbours than about the connector.

Each repetition runs every case in a shuffled order, each case right after its own memcpy, so both see the
same moment of a shared machine; a ratio is the median of the per-repetition ratios (memcpy time / case
time), with quartiles; GB/s are medians. Save and load are also split into their two halves (gather vs.
store, tier read vs. scatter) to show where the time goes. The first repetition is a warm-up (numba kernels
of the int8 codec compile, pools fault in) and is not counted. Correctness is checked once at the end: the
blocks scattered from the host and disk stores equal the gathered ones bit for bit; kv-int8's are close.

Target (issue 11): save and load through the host tier >= 0.5x memcpy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from qwen3vl_ray import settings as settings_mod
from qwen3vl_ray.errors import CodecError
from qwen3vl_ray.keys import Namespace, content_key
from qwen3vl_ray.serving.block_keys import BLOCK_KIND
from qwen3vl_ray.serving.block_store import LocalBlockStore, store_namespace
from qwen3vl_ray.serving.paged_blocks import PagedBlocks

MiB = 1 << 20
#: Qwen3-VL-2B's KV geometry as vLLM's CPU backend lays it out
LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 28, 8, 128, 128, torch.bfloat16
TARGET = 0.5
REFERENCE = "one copy_"
#: the stores measured: host tier with each codec (``host-<codec>``), then the disk path
STORES = ("host", "host-kv-int8", "host-int8", "disk")
KEY_NS = Namespace(model="bench-connector", dtype="bfloat16", layout="vllm-cpu-L28xH8xD128:B128")


def paged_kv(num_blocks: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """vLLM's CPU paged KV: one ``[num_blocks, heads, block_size, 2 * head_dim]`` view per layer of one buffer."""
    per_layer = (num_blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    n = int(np.prod(per_layer))
    buf = torch.empty(LAYERS * n, dtype=DTYPE)
    for i in range(LAYERS):  # KV-like values, chunked so the float32 temporary stays small
        buf[i * n:(i + 1) * n] = torch.randn(n, generator=gen).to(DTYPE)
    return {f"model.layers.{i}.self_attn.attn": buf[i * n:(i + 1) * n].view(per_layer) for i in range(LAYERS)}


def make_store(kind: str, root: str, entry_bytes: int, blocks: int) -> LocalBlockStore:
    """A store as the connector builds it from its options (``kv_transfer_config(**options)``)."""
    budget = 2 * blocks * entry_bytes + 64 * MiB  # two batches: each save's fresh keys evict the oldest
    options = {"host_bytes": budget, "disk_bytes": 0, "host_codec": "none", "disk_codec": "none"}
    if kind.startswith("host-"):
        options["host_codec"] = kind.removeprefix("host-")
    elif kind == "disk":
        # smaller than one block: the host tier refuses every entry, which lands on disk and is read from there
        options.update(host_bytes=4 * MiB, disk_bytes=budget, disk_dir=os.path.join(root, "disk"), disk_fsync=True)
    s = settings_mod.resolve(options)
    return LocalBlockStore.from_settings(s, store_namespace(f"bench-{kind}"))


class Case:
    """One store: save and load batches of blocks between the paged KV and it, timing both halves."""

    def __init__(self, name: str, store: LocalBlockStore, paged: PagedBlocks, src_ids: list[int], dst_ids: list[int]):
        self.name, self.store, self.paged = name, store, paged
        self.src_ids, self.dst_ids = src_ids, dst_ids
        self.generation = 0
        self.keys: list = []
        self.times: dict[str, list[float]] = {k: [] for k in ("save", "gather", "store", "load", "read", "scatter")}

    def save(self) -> float:
        self.generation += 1
        keys = [content_key(KEY_NS, BLOCK_KIND, b"%s-%d-%d" % (self.name.encode(), self.generation, i))
                for i in range(len(self.src_ids))]
        t0 = time.perf_counter()
        entries = self.paged.gather(self.src_ids)
        t1 = time.perf_counter()
        oks = self.store.save_many([(k, e, keys[i - 1] if i else None) for i, (k, e) in enumerate(zip(keys, entries))])
        t2 = time.perf_counter()
        assert all(oks), f"{self.name}: the store refused {len(oks) - sum(oks)} of {len(oks)} blocks"
        self.keys = keys
        self.times["gather"].append(t1 - t0)
        self.times["store"].append(t2 - t1)
        self.times["save"].append(t2 - t0)
        return t2 - t0

    def drop_page_cache(self) -> None:
        disk = self.store.cache.tiers[-1]
        for k in self.keys:
            fd = os.open(disk.path_of(k), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def load(self, times: dict[str, list[float]] | None = None) -> float:
        times = self.times if times is None else times
        t0 = time.perf_counter()
        entries, tiers = self.store.load_with_tiers(self.keys)
        t1 = time.perf_counter()
        for block_id, entry in zip(self.dst_ids, entries):
            self.paged.scatter(block_id, entry)
        t2 = time.perf_counter()
        assert all(t is not None for t in tiers), f"{self.name}: blocks missing on load"
        times["read"].append(t1 - t0)
        times["scatter"].append(t2 - t1)
        times["load"].append(t2 - t0)
        return t2 - t0


def run(blocks: int = 24, reps: int = 9, directory: str | None = None) -> dict:
    gen = torch.Generator().manual_seed(0)
    num_blocks = 2 * blocks
    kv = paged_kv(num_blocks, gen)
    paged = PagedBlocks(kv, num_blocks, head_size=HEAD_DIM)  # as the connector builds it: keys and values apart
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    src_ids, dst_ids = ids[:blocks], ids[blocks:]
    nbytes = blocks * paged.entry_nbytes
    # what every load must put back (scatter only writes dst_ids); gathers reuse one buffer, so keep a copy
    reference = [e.clone() for e in paged.gather(src_ids)]

    # the limit: memcpy of the same bytes between preallocated, faulted buffers
    src = torch.randn(nbytes // 2, generator=gen).to(DTYPE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    src_np, dst_np = src.view(torch.int16).numpy(), dst.view(torch.int16).numpy()

    def memcpy() -> float:
        t0 = time.perf_counter()
        np.copyto(dst_np, src_np)
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        return min(t1 - t0, t2 - t1)

    with tempfile.TemporaryDirectory(dir=directory, prefix="bench-connector-") as root:
        entry = paged.entry_nbytes
        cases = {name: Case(name, make_store(name, root, entry, blocks), paged, src_ids, dst_ids)
                 for name in STORES}
        refused = {}
        for name, c in list(cases.items()):
            try:  # a codec that cannot take vLLM's block entry refuses it here; the row says so
                c.save()
            except CodecError as exc:
                refused[name] = str(exc)
                c.store.close()
                del cases[name]
        cold_times: dict[str, list[float]] = {k: [] for k in ("load", "read", "scatter")}

        def disk_cold() -> float:
            cases["disk"].drop_page_cache()
            return cases["disk"].load(cold_times)

        # reference: the one copy a connector cannot avoid, vLLM's block of every layer to or from a contiguous
        # entry in a preallocated buffer, one ``copy_`` per (block, layer); what save and load would cost if
        # the store's memory were that buffer (no gather temporaries, no second copy into the tier)
        # (vLLM's own per-layer block shape: the reference does not split keys from values)
        staging = torch.empty(blocks, LAYERS, *paged.tensors[0].shape[1:], dtype=DTYPE)
        staging.copy_(torch.stack([torch.stack([t[b] for t in paged.tensors]) for b in src_ids]))
        ref_times: dict[str, list[float]] = {"save": [], "load": []}

        def copy_out() -> float:
            t0 = time.perf_counter()
            for j, b in enumerate(src_ids):
                for layer, t in enumerate(paged.tensors):
                    staging[j, layer].copy_(t[b])
            ref_times["save"].append(time.perf_counter() - t0)
            return ref_times["save"][-1]

        def copy_in() -> float:
            t0 = time.perf_counter()
            for j, b in enumerate(dst_ids):
                for layer, t in enumerate(paged.tensors):
                    t[b].copy_(staging[j, layer])
            ref_times["load"].append(time.perf_counter() - t0)
            return ref_times["load"][-1]

        steps = [(f"{n}:save", c.save) for n, c in cases.items()] + [("copy:save", copy_out)]
        n_saves = len(steps)
        steps += [(f"{n}:load", c.load) for n, c in cases.items()] + [("copy:load", copy_in)]
        steps.append(("disk:load_cold", disk_cold))
        memcpy_times: list[float] = []
        ratios: dict[str, list[float]] = {name: [] for name, _ in steps}
        shuffle = random.Random(1).shuffle
        for rep in range(reps + 1):
            # saves before loads within a repetition (a load reads the batch its store saved last); the order
            # of the stores is shuffled, each step right after its own memcpy
            saves, loads = steps[:n_saves], steps[n_saves:]
            shuffle(saves)
            shuffle(loads)
            for name, fn in saves + loads:
                m = memcpy()
                t = fn()
                if rep == 0:  # warm-up: codec kernels compile, pools and files fault in
                    continue
                memcpy_times.append(m)
                ratios[name].append(m / t)
            if rep == 0:
                for c in cases.values():
                    for v in c.times.values():
                        v.clear()
                for v in (*cold_times.values(), *ref_times.values()):
                    v.clear()

        # correctness: what was loaded into dst_ids equals what was gathered from src_ids
        checks = {}
        for name, c in cases.items():
            c.load()
            got = paged.gather(dst_ids)
            if "int8" in name:
                cos = min(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()
                          for a, b in zip(got, reference))
                assert cos > 0.999, f"{name} blocks came back with cosine {cos}"
                checks[name] = f"min cosine {cos:.5f}"
            else:
                assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, reference)), \
                    f"{name}: loaded blocks differ from the saved ones"
                checks[name] = "bit-identical"
        counters = {name: {"saved": c.store.counters.saved, "loaded": dict(c.store.counters.loaded)}
                    for name, c in cases.items()}
        for c in cases.values():
            c.store.close()

    def gbps(seconds: list[float]) -> float:
        return nbytes / statistics.median(seconds) / 1e9

    def ratio(name: str) -> dict:
        r = ratios[name]
        q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0], r[0], r[0]]
        return {"vs_memcpy": statistics.median(r), "iqr": [q[0], q[2]]}

    rows = []
    for name, c in cases.items():
        t = c.times
        rows.append({"store": name, "op": "save", "gbps": gbps(t["save"]), **ratio(f"{name}:save"),
                     "parts_gbps": {"gather": gbps(t["gather"]), "store": gbps(t["store"])}})
        rows.append({"store": name, "op": "load", "gbps": gbps(t["load"]), **ratio(f"{name}:load"),
                     "parts_gbps": {"read": gbps(t["read"]), "scatter": gbps(t["scatter"])}})
    rows += [{"store": name, "op": op, "refused": why} for name, why in refused.items() for op in ("save", "load")]
    rows.append({"store": "disk cold", "op": "load", "gbps": gbps(cold_times["load"]), **ratio("disk:load_cold"),
                 "parts_gbps": {"read": gbps(cold_times["read"]), "scatter": gbps(cold_times["scatter"])}})
    rows += [{"store": REFERENCE, "op": op, "gbps": gbps(ref_times[op]), **ratio(f"copy:{op}"), "parts_gbps": {}}
             for op in ("save", "load")]
    rows.sort(key=lambda r: ((*STORES, "disk cold", REFERENCE).index(r["store"]), r["op"] == "load"))
    host = {r["op"]: r["vs_memcpy"] for r in rows if r["store"] == "host"}
    return {
        "geometry": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                     "dtype": "bfloat16", "entry_mib": paged.entry_nbytes / MiB, "blocks": blocks,
                     "batch_mib": nbytes / MiB},
        "reps": reps,
        "memcpy_gbps": gbps(memcpy_times),
        "rows": rows,
        "checks": checks,
        "counters": counters,
        "target": TARGET,
        "host_save_vs_memcpy": host["save"],
        "host_load_vs_memcpy": host["load"],
        "targets_met": min(host.values()) >= TARGET,
        "shortfall": {op: max(0.0, TARGET - v) for op, v in host.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--blocks", type=int, default=24, help="blocks per save/load batch (14 MiB each)")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions (one more untimed warm-up)")
    ap.add_argument("--dir", default=None, help="where the disk tier goes (default: $TMPDIR)")
    ap.add_argument("--quick", action="store_true", help="4 blocks, 3 repetitions (a smoke run; numbers are noisy)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: vLLM's CPU worker is bound to one core unless "
                         "VLLM_CPU_OMP_THREADS_BIND says otherwise; 0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.blocks, args.reps = 4, 3
    load0 = os.getloadavg()[0]
    res = run(blocks=args.blocks, reps=args.reps, directory=args.dir)
    res["loadavg_1min"] = [load0, os.getloadavg()[0]]
    res["torch_threads"] = torch.get_num_threads()
    g = res["geometry"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f} (other processes share the machine)")
    print(f"{g['blocks']} blocks of [{g['layers']}, {g['kv_heads']}, {g['block_size']}, {2 * g['head_dim']}] bf16 "
          f"({g['entry_mib']:.0f} MiB each, {g['batch_mib']:.0f} MiB a batch), {res['reps']} reps; "
          f"memcpy of the same bytes: {res['memcpy_gbps']:.2f} GB/s (median)")
    print(f"{'store':<13}{'op':<6}{'GB/s':>7}{'/memcpy':>9}  {'[quartiles]':<13} parts GB/s")
    for r in res["rows"]:
        if "refused" in r:
            if r["op"] == "save":
                print(f"{r['store']:<13}refused the block entry: {r['refused'][:110]}")
            continue
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts_gbps"].items())
        print(f"{r['store']:<13}{r['op']:<6}{r['gbps']:>7.2f}{r['vs_memcpy']:>8.2f}x  "
              f"[{r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}]   {parts}")
    print(f"checks: {res['checks']}")
    short = ", ".join(f"{op} short by {v:.2f}" for op, v in res["shortfall"].items() if v > 0)
    print(f"target (host save and load >= {TARGET}x memcpy): {'met' if res['targets_met'] else 'NOT met'} "
          f"(save {res['host_save_vs_memcpy']:.2f}x, load {res['host_load_vs_memcpy']:.2f}x{'; ' + short if short else ''})")
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
