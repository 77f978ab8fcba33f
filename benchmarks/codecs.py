"""Codec benchmark: compression ratio vs bf16, error, and encode/decode throughput next to memcpy.

    PYTHONPATH=. python -m benchmarks.codecs [--json] [--device cpu|cuda] [--repeats N] [--codecs SPEC ...]
                                             [--threads N] [--no-large] [--kv-from-checkpoint PATH]

Tensors (bf16): ``kv`` -- a synthetic KV chunk [layers=2, 2, kv_heads=8, tokens=256, head_dim=128] (2 MiB)
whose keys carry a few large-magnitude outlier channels per head (as real keys do) and whose values are
near-Gaussian; ``vision`` -- synthetic vision features [1024 tokens, 2048 channels], Gaussian with
log-normal channel scales and 16 hot channels; ``vision-t5`` -- the same with Student-t(5) heavy tails.
``axis=0`` quantizes features per channel (groups along tokens), the default ``axis=-1`` per token.

Realistic entry sizes (``--no-large`` skips them; only ``LARGE_CODECS`` run on them):
``kv-batch16`` -- a put_many batch of 16 separate ``kv`` chunks (16 x 2 MiB = 32 MiB, each chunk encoded
and copied on its own, the batch as a whole streamed from DRAM); ``kv-8b`` -- one chunk of the 8B model's
geometry [36 layers, 2, 8, 256, 128] (36 MiB).

Throughput is bf16 input bytes per second (payload creation and checksum included);
``memcpy_gbps`` is ``dst.copy_(src)`` of the same tensors, same sizes, into preallocated buffers, measured
in the same run before and after each codec's timing; decode is timed the same way, into preallocated
tensors (``decode(payload, out=dst)``), and once more allocating its result (``dec+alloc``: fresh pages
cost first-touch faults, about a memcpy of their own). Every number is the best of ``--repeats`` runs (the
host is shared; other load only adds time).

``--kernels both`` (default) measures the codecs that have fused kernels (``FUSED``: numba on CPU, Triton on
CUDA) twice: with the kernels (``kern`` = fused) and on the torch paths they replace (``kern`` = torch), in the
same run. On CUDA an encode ends with the payload on the host and a decode starts from it, so each row also
times the raw copies a tier would make without a codec (``d2h``: device -> page-locked host, ``h2d``: back) and
prints ``enc/d2h`` and ``dec/h2d``, raw copy time over codec time: above 1, the compressed path moves an entry
between GPU and host faster than the raw copy. The
first call of each row compiles or loads the kernels and is not timed. Kernel threads follow ``--threads``
(0: every core of the process's affinity mask, as a worker runs). ``auto`` rows also report what choosing
costs: ``auto``'s encode time over the chosen codec's own encode time, minus one (``choose``); ``auto`` remembers
each tensor kind's winner and screens the kind afresh after an interval that doubles from ``RESCREEN_EVERY`` to
``RESCREEN_MAX`` tensors while re-screens confirm the winner: the row first encodes through that ramp (untimed),
then each timed run spans ``RESCREEN_MAX + 1`` encodes, one full cycle (the steady state, its re-screen included),
and the chosen codecs' own encodes are timed over runs of the same length, alternated with ``auto``'s (this host's
speed drifts by a quarter within minutes: timed one after the other, the same build's ``choose`` moved by 10-15
points between runs). ``--clock cpu`` (with ``--threads 1``) times the thread's CPU
time instead of wall time, which removes the time other tenants hold the core but not their cache and
memory-bandwidth pressure.

Why the size matters: a 2 MiB tensor and its copy stay in L3, so memcpy runs at cache speed (~40 GB/s
here) while a quantizer does ~6 elementwise passes of compute; a real KV entry or batch is tens to hundreds
of MiB, where memcpy is DRAM-bound (~8-12 GB/s here) and a cache-blocked codec reads its input from DRAM
once. Both kinds of rows are printed. The ``enc/mc``/``dec/mc`` targets are judged on the realistic rows
(``kv-batch16``, ``kv-8b``); the small rows show the cache-resident ratio and are not hidden.

Targets: int8 >= 1.9x and cosine >= 0.999; kv-int4 >= 3.5x and cosine >= 0.99; int8 and kv-int8 encode and
decode each >= 0.5x memcpy, kv-int4 >= 0.4x (CPU, realistic entry sizes, the worker's cores); ``auto``
chooses in <= 10% of an encode.
"""

from __future__ import annotations

import json
import os
import time

import torch

from benchmarks import options
from qwen3vl_ray.codecs import auto, decode, fused, gpu_fused, make_codec, relative_error

LARGE_CODECS = ["none", "int8", "int4", "kv-int8", "kv-int4", "auto"]
#: codecs with fused kernels (``qwen3vl_ray.codecs.fused`` on CPU, ``qwen3vl_ray.codecs.gpu_fused`` on CUDA)
FUSED = {"int8", "int4", "kv-int8", "kv-int4"}
DEFAULT_CODECS = ["none", "zstd", "fp8", "int8", "int8:axis=0", "int4", "int4:axis=0", "int4:group=64,axis=0",
                  "kv-int8", "kv-int4", "kv-int4:residual=32", "int8+zstd", "lowrank", "auto", "auto:max_error=0.15"]


def synthetic_kv(gen: torch.Generator, layers: int = 2) -> torch.Tensor:
    heads, tokens, dim = 8, 256, 128
    keys = torch.randn(layers, heads, tokens, dim, generator=gen)
    # outlier channels: a handful per head with large, token-independent magnitude (RoPE'd keys show this)
    for h in range(heads):
        chans = torch.randperm(dim, generator=gen)[:4]
        keys[:, h, :, chans] = keys[:, h, :, chans] * 4 + torch.randn(len(chans), generator=gen) * 15
    values = torch.randn(layers, heads, tokens, dim, generator=gen) * 0.5
    return torch.stack([keys, values], dim=1).to(torch.bfloat16)


def synthetic_vision(gen: torch.Generator) -> torch.Tensor:
    """Gaussian tokens with per-channel scales (log-normal) and 16 hot channels 8x larger."""
    x = torch.randn(1024, 2048, generator=gen) * torch.exp(torch.randn(2048, generator=gen) * 0.5)
    hot = torch.randperm(2048, generator=gen)[:16]
    x[:, hot] *= 8
    return x.to(torch.bfloat16)


def synthetic_vision_heavy(gen: torch.Generator) -> torch.Tensor:
    """Stress case: Student-t(5) heavy tails (kurtosis 9) plus the same hot channels."""
    x = torch.distributions.StudentT(5.0).sample((1024, 2048))
    hot = torch.randperm(2048, generator=gen)[:16]
    x[:, hot] *= 8
    return x.to(torch.bfloat16)


def checkpoint_kv(path: str, tokens: int = 256) -> torch.Tensor:
    """Prefill ``tokens`` random ids through a saved Qwen3-VL checkpoint; its KV as [layers, 2, kv, tokens, d]."""
    from qwen3vl_ray.engine.loading import load_model_and_processor

    model, _ = load_model_and_processor(path)
    ids = torch.randint(100, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).to(torch.bfloat16)


def _checkpoint_path(name: str) -> str:
    """A checkpoint directory as given, or a preset generated once under the user's cache directory."""
    from qwen3vl_ray.engine.checkpoint import make_checkpoint
    from qwen3vl_ray.engine.presets import PRESETS

    if name in PRESETS:
        return str(make_checkpoint(name, os.path.expanduser(f"~/.cache/qwen3vl-ray/checkpoints/{name}")))
    return name


_CLOCK = time.perf_counter


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = _CLOCK()
        out = fn()
        ts.append(_CLOCK() - t0)
    # best of N: this host is shared, and other tenants' load only ever adds time
    return min(ts), out


def _timed_pair(fa, fb, repeats: int) -> tuple[float, object, float]:
    """(best time of ``fa``, its last result, best time of ``fb``), their runs alternated: a drift of the host's
    speed then lands on both, not on whichever ran in its slow phase."""
    out = fa()  # warm-up
    fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = _CLOCK()
        out = fa()
        ta.append(_CLOCK() - t0)
        t0 = _CLOCK()
        fb()
        tb.append(_CLOCK() - t0)
    return min(ta), out, min(tb)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, x: torch.Tensor | list[torch.Tensor], spec: str, repeats: int, kernels: str = "fused") -> dict:
    """One row; ``x`` may be a list of entries (a batch), each encoded, decoded and copied on its own.

    ``kernels``: "fused" or "torch" (the codecs' torch paths; ``fused.ENABLED`` is off for the row).
    """
    before = fused.ENABLED, gpu_fused.ENABLED
    fused.ENABLED = gpu_fused.ENABLED = kernels == "fused"
    try:
        row = _measure(name, x, spec, repeats)
    finally:
        fused.ENABLED, gpu_fused.ENABLED = before
    base = spec.split(":")[0].split("+")[0]
    t = x[0] if isinstance(x, list) else x
    has = fused.available(t) or gpu_fused.available(t)
    row["kernels"] = kernels if (base in FUSED or base == "auto") and has else "torch"
    return row


def _measure(name: str, x: torch.Tensor | list[torch.Tensor], spec: str, repeats: int) -> dict:
    codec = make_codec(spec)
    xs = x if isinstance(x, list) else [x]
    dsts = [torch.empty_like(t) for t in xs]
    outs = [torch.empty_like(t) for t in xs]
    nbytes = sum(t.numel() for t in xs) * 2  # against bf16
    device = xs[0].device

    def copy():
        for d, t in zip(dsts, xs):
            d.copy_(t)
        _sync(device)

    # auto remembers a tensor kind's winner and screens the kind afresh after an interval that doubles up to
    # RESCREEN_MAX while re-screens confirm the winner: encode through that ramp first, then one timed run spans
    # a full steady-state cycle (RESCREEN_MAX + 1 encodes), so its time has the re-screen in it
    cycle = -(-(auto.RESCREEN_MAX + 1) // len(xs)) if codec.name == "auto" else 1
    if codec.name == "auto":
        ramp, interval = 0, auto.RESCREEN_EVERY
        while interval < auto.RESCREEN_MAX:
            ramp, interval = ramp + interval + 1, 2 * interval
        for i in range(ramp):
            codec.encode(xs[i % len(xs)])

    def enc():
        # one round of the entries at a time: earlier rounds' payloads are dropped as the next is made, as in every
        # other row (a list of all of a cycle's payloads put RESCREEN_MAX + 1 payloads of 1 MiB, fresh pages, into
        # each timed run of a 2 MiB chunk's auto row)
        ps = None
        for _ in range(cycle):
            ps = [codec.encode(t) for t in xs]
        _sync(device)
        return ps

    def dec():
        ys = [decode(p, device, out=o) for p, o in zip(payloads, outs)]; _sync(device); return ys

    def dec_alloc():
        ys = [decode(p, device) for p in payloads]; _sync(device); return ys

    chosen = None
    if codec.name == "auto":
        # what choosing costs: auto's encode against the chosen codecs' own encodes of the same entries, timed
        # over runs as long as auto's (cycle encodes of each entry): on a shared host a long run rarely escapes
        # every stall of a descheduled thread, a single encode often does, and best-of-N would then charge the
        # stalls to choosing
        chosen = [codec.choose(t)[0] for t in xs]

    def chosen_enc():
        ps = None
        for _ in range(cycle):
            ps = [c.encode(t) for c, t in zip(chosen, xs)]
        _sync(device)
        return ps

    heavy = codec.name == "lowrank"
    reps = max(1, repeats // 5) if heavy else repeats
    t_copy, _ = _timed(copy, repeats)
    if chosen is None:
        t_enc, payloads = _timed(enc, reps)
    else:
        t_enc, payloads, t_chosen = _timed_pair(enc, chosen_enc, reps)
    t_enc /= cycle
    t_copy2, _ = _timed(copy, repeats)
    t_dec, ys = _timed(dec, reps)
    t_dec_alloc, _ = _timed(dec_alloc, reps)
    t_d2h = t_h2d = None
    if device.type == "cuda":
        # what a tier moves without a codec: the raw tensor to page-locked host memory and back
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in xs]

        def d2h():
            for h, t in zip(hosts, xs):
                h.copy_(t, non_blocking=True)
            _sync(device)

        def h2d():
            for h, o in zip(hosts, outs):
                o.copy_(h, non_blocking=True)
            _sync(device)

        t_d2h, _ = _timed(d2h, repeats)
        t_h2d, _ = _timed(h2d, repeats)
    choose = None if chosen is None else t_enc / (t_chosen / cycle) - 1
    ref = torch.cat([t.reshape(-1) for t in xs])
    y = torch.cat([t.reshape(-1) for t in ys])
    a, b = ref.double(), y.double()
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.norm() > 0 else 1.0
    return {"tensor": name, "codec": spec, "ratio": nbytes / sum(len(p) for p in payloads),
            "rel_error": relative_error(ref, y), "cosine": cos, "encode_gbps": nbytes / t_enc / 1e9,
            "decode_gbps": nbytes / t_dec / 1e9, "decode_alloc_gbps": nbytes / t_dec_alloc / 1e9,
            "memcpy_gbps": nbytes / min(t_copy, t_copy2) / 1e9, "choose_overhead": choose,
            "encode_vs_d2h": t_d2h / t_enc if t_d2h else None, "decode_vs_h2d": t_h2d / t_dec if t_h2d else None,
            "mib": nbytes / 2**20, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = options.parser(__doc__, "the rows as one JSON list")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (the fastest is kept)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads and fused-kernel threads (memcpy uses the same); 0 (default) keeps "
                         "torch's default and gives the kernels every core of the affinity mask, as in production; "
                         "1 is steadier on a shared host")
    ap.add_argument("--kernels", choices=["both", "fused", "torch"], default="both",
                    help="fused: numba kernels where a codec has them; torch: the torch paths; both: a row each")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this thread's CPU time (time.thread_time), which leaves out "
                         "time other tenants' processes hold the core; only meaningful with --threads 1")
    ap.add_argument("--no-large", action="store_true", help="skip the realistic-size rows (kv-batch16, kv-8b)")
    ap.add_argument("--kv-from-checkpoint", metavar="PATH|PRESET", default="tiny",
                    help="also measure KV captured from this checkpoint directory, or from a preset generated on "
                         "first use (default: the tiny Qwen3-VL preset); 'none' skips it")
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="codec specs (space-separated)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        fused.MAX_THREADS = args.threads
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            ap.error("--clock cpu times the calling thread only; use it with --threads 1")
        global _CLOCK
        _CLOCK = time.thread_time
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    device = torch.device(args.device)
    tensors = {"kv": synthetic_kv(gen).to(device), "vision": synthetic_vision(gen).to(device),
               "vision-t5": synthetic_vision_heavy(gen).to(device)}
    if args.kv_from_checkpoint and args.kv_from_checkpoint != "none":
        tensors["kv-ckpt"] = checkpoint_kv(_checkpoint_path(args.kv_from_checkpoint)).to(device)
    large: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    if not args.no_large:
        large["kv-batch16"] = [synthetic_kv(gen).to(device) for _ in range(16)]
        large["kv-8b"] = synthetic_kv(gen, layers=36).to(device)
    rows = []
    for name, x in [*tensors.items(), *large.items()]:
        for spec in args.codecs:
            if name in large and spec not in LARGE_CODECS:
                continue
            is_kv = name.startswith("kv")
            if (spec.startswith("kv-") and not is_kv) or ("axis=0" in spec and is_kv):
                continue  # KV layout codecs need the KV shape; axis 0 of a KV chunk is its 2 layers
            base = spec.split(":")[0].split("+")[0]
            kinds = ["fused", "torch"] if args.kernels == "both" and base in FUSED else [args.kernels if args.kernels != "both" else "fused"]
            for kernels in kinds:
                rows.append(measure(name, x, spec, args.repeats, kernels))
    kthreads = fused._threads() if fused.available() else 0
    print(f"device={device}  torch threads={torch.get_num_threads()}  kernel threads={kthreads}  clock={args.clock}")
    head = (f"{'tensor':<10} {'MiB':>4} {'codec':<22} {'kern':<5} {'ratio':>6} {'rel_err':>9} {'cosine':>8} {'enc GB/s':>9} "
            f"{'dec GB/s':>9} {'memcpy':>8} {'enc/mc':>7} {'dec/mc':>7} {'dec+alloc/mc':>12} {'choose':>7}"
            + (f" {'enc/d2h':>7} {'dec/h2d':>7}" if device.type == "cuda" else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        choose = f"{r['choose_overhead']:7.1%}" if r["choose_overhead"] is not None else ""
        print(f"{r['tensor']:<10} {r['mib']:4.0f} {r['codec']:<22} {r['kernels']:<5} {r['ratio']:6.2f} {r['rel_error']:9.5f} "
              f"{r['cosine']:8.5f} {r['encode_gbps']:9.2f} {r['decode_gbps']:9.2f} {r['memcpy_gbps']:8.2f} "
              f"{r['encode_gbps'] / r['memcpy_gbps']:7.3f} {r['decode_gbps'] / r['memcpy_gbps']:7.3f} "
              f"{r['decode_alloc_gbps'] / r['memcpy_gbps']:12.3f} {choose:>7}"
              + (f" {r['encode_vs_d2h']:7.2f} {r['decode_vs_h2d']:7.2f}" if r["encode_vs_d2h"] else ""))
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
