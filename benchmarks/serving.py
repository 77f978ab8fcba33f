"""vLLM serving a multi-turn multimodal workload, alone and with qwen3vl-ray as its KV tier (``qwen3vl_ray.serving``).

    python -m benchmarks.serving [--json] [--quick] [--seed N] [--conversations N] [--checkpoint DIR]

The model is the ``bench-2b`` checkpoint (Qwen3-VL-2B's per-layer geometry with 2 text layers: the prefill cost
and KV bytes per token and layer of the real 2B model; random weights, so answers are gibberish), bf16, in
vLLM on this machine's CPU (``enforce_eager``, its CPU block of 128 tokens).

Workload (``mooncake_workload``, seeded): Mooncake-shaped multi-turn chats. Each conversation opens with one
of two shared system prompts and an image drawn Zipf-wise from a small pool (so popular images open several
conversations, as shared documents do in the Mooncake trace), then turns that each add a new user message
(sometimes another pool image) and resend the whole history, the engine's own earlier answers included.
Conversations start at Poisson arrival times and their turns follow after exponential think times, so the
turns of different conversations interleave: by the time a conversation comes back, the other ones have
pushed its blocks out of vLLM's own KV cache, which is sized at one ``--max-model-len`` prompt
(``kv_cache_memory_bytes``), a fraction of the workload's distinct KV (the table prints how many times it fits).

Replay: requests are served one at a time in arrival order (a turn needs the previous turn's answer), each
through ``LLM.chat``, so TTFT is the engine's time to the first token without queueing behind other requests:
the rows differ in prefill work, not in queue lengths. TTFT is vLLM's own per-request metric
(``RequestOutput.metrics.first_token_latency``, with ``disable_log_stats=False``): from the moment ``LLM.chat``
starts rendering the request (chat template and image preprocessing included) to the engine step that produced
its first token (that step includes the connector's synchronous loads and, after the forward pass, its saves).
All rows' engines run at once, each in its own process, in lockstep: request ``i`` is served by every engine
(in a shuffled order) before request ``i + 1``, so the rows of one request are measured at nearly the same
moment of this shared 2-core machine; besides p50/p90, ``paired`` is the median over requests of the
per-request TTFT ratio. Throughput is requests and tokens (prompt + generated) per second of the engine's own
busy time (the sum of its requests' ``LLM.chat`` times; engine start-up excluded).

Threads: each engine runs one thread, unbound (``VLLM_CPU_OMP_THREADS_BIND=nobind``, ``OMP_NUM_THREADS=1``;
``--threads``). With vLLM's default (an OpenMP thread on each of the 2 cores) on this machine shared with
other jobs (load average 5-13), every parallel region waits for a descheduled thread, and the same request's
TTFT varied 10x between adjacent runs, far more than the rows differ.

Rows (each configuration in its own engine process, as a user runs it, on the same requests):

* ``vLLM alone``: its prefix cache on;
* ``+ host``: the connector, host tier only (large enough for the whole workload);
* ``+ host + disk``: a host tier of a quarter of the workload's KV, the disk tier below it (fsync on);
* ``+ host kv-int8``: the host tier with the KV codec (``host_codec="kv-int8"``). NOTE: it runs here only
  because bench-2b has 2 layers: a stored block is ``[layers, kv_heads, block_size, 2 * head_dim]`` and the
  codec reads the size-2 layer axis as its K/V axis (on the real 28-layer geometry it refuses the block:
  ``benchmarks.connector``), so this row times the codec, not its intended grouping.

External hits per tier are the connector store's counters (``open_stores()``: blocks loaded from each tier,
times the block size); vLLM's own prefix hits are the rest of ``num_cached_tokens``. The same requests give
the same prompts in every row only as long as the answers agree: greedy decoding, and loaded KV is the KV
vLLM computed (int8 codecs change it slightly, so their later turns can differ by a few tokens).

All-miss workload: single-turn requests, each with its own image and text (nothing to reuse), served by
vLLM alone and by vLLM with the host tier, in lockstep; the overhead is the median over requests of the paired
TTFT ratio (same request, tier / alone) and the ratio of the summed busy times.

Targets (issue 11): reuse workload TTFT p50 >= 3x better than vLLM alone (host tier); all-miss <= 5% slower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
TTFT_TARGET = 3.0
MISS_TARGET = 1.05
WORDS = ("tier cache block prefix image token layer host disk memory vision model request turn answer page "
         "object store engine batch chunk entry codec quantize promote demote evict hit miss reuse "
         "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar").split()


@dataclass(slots=True)
class Turn:
    """One request: a conversation's next user message, sent with the whole history before it."""

    conversation: int
    index: int
    arrival_s: float
    text: str
    images: list[int] = field(default_factory=list)  # indices into the image pool


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def mooncake_workload(seed: int, conversations: int = 6, turns: tuple[int, int] = (3, 5), pool: int = 4,
                      first_words: int = 60, turn_words: tuple[int, int] = (25, 60), image_turn_p: float = 0.2,
                      start_rate_per_s: float = 1.0, think_s: float = 10.0) -> tuple[list[str], list[Turn]]:
    """``(system prompts, turns in arrival order)``: see the module docstring. The small tokenizer of the
    generated checkpoints makes ~4 tokens of a word."""
    rng = random.Random(seed)
    systems = [_text(rng, 60) for _ in range(2)]
    # Zipf-like popularity: image k is drawn with weight 1/(k+1)
    weights = [1 / (k + 1) for k in range(pool)]
    out: list[Turn] = []
    start = 0.0
    for c in range(conversations):
        start += rng.expovariate(start_rate_per_s)
        t = start
        for i in range(rng.randint(*turns)):
            if i == 0:
                images, words = [rng.choices(range(pool), weights)[0]], first_words
            else:
                t += rng.expovariate(1 / think_s)
                images = [rng.choices(range(pool), weights)[0]] if rng.random() < image_turn_p else []
                words = rng.randint(*turn_words)
            out.append(Turn(c, i, t, _text(rng, words), images))
    out.sort(key=lambda turn: turn.arrival_s)
    return systems, out


def all_miss_workload(seed: int, requests: int = 6, words: int = 80) -> list[Turn]:
    """Single-turn requests, each with its own image (pool index = request) and text: no block is shared."""
    rng = random.Random(seed + 1)
    return [Turn(r, 0, float(r), f"request {r}: " + _text(rng, words), [r]) for r in range(requests)]


def _image(path: Path, seed: int, side: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


# ============================================================ one engine process
class EngineSession:
    """One vLLM engine in this process (``--worker``) serving a spec's requests one at a time, on command."""

    def __init__(self, spec: dict) -> None:
        from PIL import Image
        from vllm import LLM, SamplingParams

        from qwen3vl_ray.serving.block_store import open_stores
        from qwen3vl_ray.serving.connector_config import kv_transfer_config

        self.spec = spec
        kwargs = {}
        if spec["connector"] is not None:
            kwargs["kv_transfer_config"] = kv_transfer_config(**spec["connector"])
        t0 = time.perf_counter()
        self.llm = LLM(model=spec["model"], enforce_eager=True, dtype="bfloat16", block_size=spec["block_size"], seed=0,
                       max_model_len=spec["max_model_len"], kv_cache_memory_bytes=spec["kv_cache_bytes"],
                       limit_mm_per_prompt={"image": spec["max_images"], "video": 0},
                       mm_processor_kwargs={"max_pixels": spec["image_side"] ** 2},
                       enable_prefix_caching=True, disable_log_stats=False, **kwargs)
        self.start_s = time.perf_counter() - t0
        self.sampling = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
        self.images = {int(k): Image.open(p).convert("RGB") for k, p in spec["images"].items()}
        # warm-up: a request of its own (its blocks match nothing later), so no row pays first-call costs
        warm = f"warm-up {os.getpid()} " + " ".join(WORDS)
        self._chat([{"role": "user", "content": self._content(warm, [spec["warmup_image"]])}])
        self.stores = open_stores()
        self.base = self._counters()
        self.histories: dict[int, list[dict]] = {}

    def _content(self, text: str, image_ids: list[int]) -> list[dict]:
        return [*({"type": "image_pil", "image_pil": self.images[i]} for i in image_ids), {"type": "text", "text": text}]

    def _chat(self, history: list[dict]):
        return self.llm.chat([history], self.sampling, use_tqdm=False)[0]

    def _counters(self) -> tuple[dict[str, int], int, int]:
        loaded: dict[str, int] = {}
        for s in self.stores:
            for tier, n in s.counters.loaded.items():
                loaded[tier] = loaded.get(tier, 0) + n
        return (loaded, sum(s.counters.load_failures for s in self.stores), sum(s.counters.saved for s in self.stores))

    def request(self, i: int) -> dict:
        """Serve request ``i``: its conversation's history so far plus its new user message."""
        req = self.spec["requests"][i]
        systems = self.spec["systems"]
        history = self.histories.setdefault(req["conversation"], [
            {"role": "system", "content": systems[req["conversation"] % len(systems)]}] if systems else [])
        history.append({"role": "user", "content": self._content(req["text"], req["images"])})
        t = time.perf_counter()
        out = self._chat(history)
        e2e = time.perf_counter() - t
        answer = out.outputs[0]
        history.append({"role": "assistant", "content": answer.text})
        m = out.metrics
        return {"prompt": len(out.prompt_token_ids), "output": len(answer.token_ids), "cached": out.num_cached_tokens,
                "ttft_s": m.first_token_latency if m is not None and m.first_token_latency > 0 else None, "e2e_s": e2e}

    def finish(self) -> dict:
        import torch

        (l0, f0, s0), (l1, f1, s1) = self.base, self._counters()
        bs = self.spec["block_size"]
        metrics = {}
        for m in self.llm.get_metrics():
            if m.name.startswith(("vllm:qwen3vl_ray_loaded_tokens", "vllm:external_prefix_cache_hits",
                                  "vllm:prefix_cache_hits")) and hasattr(m, "value"):
                name = m.name + (f"{{tier={m.labels['tier']}}}" if "tier" in m.labels else "")
                metrics[name] = metrics.get(name, 0) + m.value
        with open("/proc/self/status") as f:
            rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
        return {"start_s": self.start_s, "external_tokens": {t: (n - l0.get(t, 0)) * bs for t, n in l1.items()},
                "load_failures": f1 - f0, "saved_blocks": s1 - s0, "vllm_metrics": metrics,
                "torch_threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0)), "peak_rss": rss}


def _worker(spec_path: str) -> int:
    """Start the engine, say READY, then serve one command per stdin line: a request index, or ``finish``."""
    session = EngineSession(json.loads(Path(spec_path).read_text()))
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "finish":
            print("RESULT " + json.dumps(session.finish()), flush=True)
            return 0
        print("RESULT " + json.dumps(session.request(int(cmd))), flush=True)
    return 0


# ============================================================ the benchmark (parent process)
@dataclass(frozen=True)
class Config:
    name: str
    connector: dict | None


class EngineProcess:
    """A ``--worker`` process: one configuration's engine, in a fresh process (vLLM's in-process engine core;
    numba kernels of the int8 codecs must not have compiled in a process before vLLM starts in it)."""

    def __init__(self, name: str, spec: dict, root: Path, threads: int) -> None:
        self.name, self.error = name, None
        path = root / f"spec-{os.urandom(4).hex()}.json"
        path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
        if threads:  # see the module docstring (Threads)
            # NUMBA_NUM_THREADS: the int8 codecs' kernels take every core of the affinity mask otherwise, and
            # their OpenMP setting stays on vLLM's thread (vLLM refuses torch.set_num_threads after start-up)
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
        self.log = open(root / f"{path.stem}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serving", "--worker", str(path)], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def _read(self, prefix: str):
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.proc.wait()
        self.log.seek(0)
        tail = [ln for ln in self.log.read().splitlines() if ln.strip()][-3:]
        self.error = f"engine process exited {self.proc.returncode}: " + " | ".join(tail)[-600:]
        return None

    def wait_ready(self) -> bool:
        return self.error is None and self._read("READY") is not None

    def call(self, cmd: str) -> dict | None:
        if self.error is not None:
            return None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        out = self._read("RESULT ")
        return None if out is None else json.loads(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_lockstep(configs: list[Config], spec: dict, root: Path, seed: int, threads: int) -> dict[str, dict]:
    """Start one engine per configuration (at once), then serve request 0 on every engine, request 1 on every
    engine, ... in a shuffled engine order per request: each request's rows are measured at nearly the same
    moment of a shared machine. Returns per configuration its requests and counters, or ``{"error": ...}``."""
    engines = [EngineProcess(c.name, {**spec, "connector": c.connector}, root, threads) for c in configs]
    try:
        live = [e for e in engines if e.wait_ready()]
        rows: dict[str, list[dict]] = {e.name: [] for e in live}
        order = random.Random(seed)
        for i in range(len(spec["requests"])):
            order.shuffle(live)
            for e in list(live):
                row = e.call(str(i))
                if row is None:
                    live.remove(e)
                else:
                    rows[e.name].append(row)
        out = {}
        for e in engines:
            final = e.call("finish")
            out[e.name] = {"error": e.error} if final is None else {"requests": rows[e.name], **final}
        return out
    finally:
        for e in engines:
            e.close()


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


def summarize(res: dict) -> dict:
    if "error" in res:
        return {"error": res["error"]}
    reqs = res["requests"]
    ttft = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None]
    prompt = sum(r["prompt"] for r in reqs)
    cached = sum(r["cached"] for r in reqs)
    external = sum(res["external_tokens"].values())
    busy = sum(r["e2e_s"] for r in reqs)  # lockstep: the engine's own time, not the others' turns in between
    return {
        "requests": len(reqs), "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90),
        "ttft_mean_s": statistics.fmean(ttft), "busy_s": busy, "start_s": res["start_s"],
        "req_per_s": len(reqs) / busy, "tok_per_s": (prompt + sum(r["output"] for r in reqs)) / busy,
        "prompt_tokens": prompt, "cached_tokens": cached, "vllm_prefix_hit_tokens": cached - external,
        "external_tokens": res["external_tokens"], "load_failures": res["load_failures"],
        "saved_blocks": res["saved_blocks"], "vllm_metrics": res["vllm_metrics"], "peak_rss_mib": res["peak_rss"] >> 20,
        "torch_threads": res["torch_threads"], "ttft_s": [r["ttft_s"] for r in reqs],
    }


def estimated_tokens(systems: list[str], turns: list[Turn], image_tokens: int, answer_tokens: int) -> int:
    """The workload's distinct prompt tokens, roughly (~4 tokens a word with the generated checkpoints'
    tokenizer): what the host + disk row's host tier is sized against before any engine runs."""
    words = sum(len(s.split()) for s in systems) + sum(len(t.text.split()) for t in turns)
    return 4 * words + image_tokens * sum(len(t.images) for t in turns) + answer_tokens * len(turns)


def run(args) -> dict:
    systems, turns = mooncake_workload(args.seed, conversations=args.conversations)
    misses = all_miss_workload(args.seed, requests=args.miss_requests)
    pool = 1 + max(i for t in turns for i in t.images)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        if args.checkpoint:
            model = args.checkpoint
        else:
            from qwen3vl_ray import settings as settings_mod

            model = settings_mod.resolve_checkpoint(settings_mod.resolve({"model": "bench-2b"}))
        side = args.image_side
        images = {k: _image(root / f"pool{k}.png", 1000 + k, side) for k in range(pool)}
        miss_images = {k: _image(root / f"miss{k}.png", 2000 + k, side) for k in range(len(misses))}
        warm_image = _image(root / "warm.png", 999, side)
        kv_per_token = 2 * 2 * 8 * 128 * 2  # bench-2b: 2 layers x K,V x 8 heads x head_dim 128 x bf16
        block_mib = args.block_size * kv_per_token / MiB
        common = {"model": model, "block_size": args.block_size, "max_model_len": args.max_model_len,
                  # one max-length prompt's blocks plus vLLM's null block
                  "kv_cache_bytes": (-(-args.max_model_len // args.block_size) + 1) * args.block_size * kv_per_token,
                  "max_tokens": args.max_tokens, "image_side": side, "max_images": 4}
        image_tokens = (side // 32) ** 2  # 16-pixel patches, 2x2 merged
        distinct_blocks = estimated_tokens(systems, turns, image_tokens, args.max_tokens) / args.block_size
        disk_dir = root / "disk"
        disk_dir.mkdir(mode=0o700)

        def connector(**options) -> dict:
            return {"host_bytes": f"{args.host_mib}MiB", "disk_bytes": 0, **options}

        configs = [Config("vLLM alone", None),
                   Config("+ host", connector()),
                   Config("+ host + disk", connector(host_bytes=f"{max(4, round(distinct_blocks * block_mib / 4))}MiB",
                                                     disk_bytes="1GiB", disk_dir=str(disk_dir / "tier"))),
                   Config("+ host kv-int8", connector(host_codec="kv-int8"))]
        if args.quick:
            configs = configs[:2]
        reuse_spec = {**common, "systems": systems, "requests": [asdict(t) for t in turns],
                      "images": {**images, 999: warm_image}, "warmup_image": 999}
        print(f"  reuse workload: {len(turns)} requests on {len(configs)} engines ...", file=sys.stderr, flush=True)
        raw = run_lockstep(configs, reuse_spec, root, args.seed, args.threads)
        results = {c.name: {"config": c.connector, **summarize(raw[c.name])} for c in configs}
        miss_spec = {**common, "systems": [], "requests": [asdict(t) for t in misses],
                     "images": {**miss_images, 999: warm_image}, "warmup_image": 999}
        print(f"  all-miss workload: {len(misses)} requests on 2 engines ...", file=sys.stderr, flush=True)
        miss = run_lockstep(configs[:2], miss_spec, root, args.seed + 1, args.threads)

    alone, host = results["vLLM alone"], results["+ host"]
    out = {"model": "bench-2b", "seed": args.seed, "block_size": args.block_size,
           "kv_cache_tokens": args.max_model_len, "reuse": results}
    if "error" not in host:
        out["working_set_tokens"] = host["saved_blocks"] * args.block_size
        out["working_set_vs_kv_cache"] = out["working_set_tokens"] / args.max_model_len
    ok = "error" not in alone and "error" not in host
    for name, res in results.items():
        if "error" not in res and "error" not in alone and name != "vLLM alone":
            res["ttft_p50_speedup"] = alone["ttft_p50_s"] / res["ttft_p50_s"]
            res["ttft_paired_speedup"] = statistics.median(
                a / t for a, t in zip(alone["ttft_s"], res["ttft_s"]) if a and t)
    out["ttft_p50_speedup"] = host["ttft_p50_speedup"] if ok else None
    out["ttft_target_met"] = ok and host["ttft_p50_speedup"] >= TTFT_TARGET
    out["all_miss"] = _miss_summary({name: summarize(r) for name, r in miss.items()})
    out["targets_met"] = out["ttft_target_met"] and out["all_miss"].get("target_met", False)
    return out


def _miss_summary(rows: dict[str, dict]) -> dict:
    errors = [r["error"] for r in rows.values() if "error" in r]
    if errors:
        return {"error": errors[0]}
    alone, host = rows["vLLM alone"], rows["+ host"]
    # same request, served beside each other: tier TTFT over alone TTFT
    paired = [t / a for a, t in zip(alone["ttft_s"], host["ttft_s"]) if a and t]
    ratio = statistics.median(paired)
    time_ratio = host["busy_s"] / alone["busy_s"]
    return {"rows": rows, "ttft_ratio_median": ratio,
            "ttft_ratio_iqr": statistics.quantiles(paired, n=4)[::2] if len(paired) >= 2 else [ratio, ratio],
            "time_ratio": time_ratio, "target_met": ratio <= MISS_TARGET and time_ratio <= MISS_TARGET}


def _fmt_tiers(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "0"


def report(res: dict) -> None:
    print(f"bench-2b bf16 in vLLM (CPU), block {res['block_size']}, vLLM's KV cache {res['kv_cache_tokens']} tokens"
          + (f"; the reuse workload's distinct KV ~{res['working_set_tokens']} tokens "
             f"({res['working_set_vs_kv_cache']:.1f}x vLLM's cache)" if "working_set_tokens" in res else ""))
    print("reuse workload (multi-turn, shared images):")
    print(f"  {'row':<16}{'reqs':>5}{'TTFT p50':>10}{'p90':>8}{'speedup (paired)':>18}{'req/s':>7}{'tok/s':>7}"
          f"{'prompt':>8}{'vLLM hit':>9}  external hits (tokens per tier)")
    for name, r in res["reuse"].items():
        if "error" in r:
            print(f"  {name:<16} FAILED: {r['error']}")
            continue
        sp = f"{r['ttft_p50_speedup']:.2f}x" if "ttft_p50_speedup" in r else "-"
        sp += f" ({r['ttft_paired_speedup']:.2f}x)" if "ttft_paired_speedup" in r else ""
        ext = _fmt_tiers(r["external_tokens"]) + (f", {r['load_failures']} load failures" if r["load_failures"] else "")
        print(f"  {name:<16}{r['requests']:>5}{r['ttft_p50_s']:>9.3f}s{r['ttft_p90_s']:>7.3f}s{sp:>18}"
              f"{r['req_per_s']:>7.2f}{r['tok_per_s']:>7.0f}{r['prompt_tokens']:>8}{r['vllm_prefix_hit_tokens']:>9}  {ext}")
    m = res["all_miss"]
    print("all-miss workload (no reuse):")
    if "error" in m:
        print(f"  FAILED: {m['error']}")
    else:
        for name, r in m["rows"].items():
            print(f"  {name:<16}{r['requests']:>5}{r['ttft_p50_s']:>9.3f}s{r['ttft_p90_s']:>7.3f}s{'':>18}"
                  f"{r['req_per_s']:>7.2f}{r['tok_per_s']:>7.0f}{r['prompt_tokens']:>8}{r['vllm_prefix_hit_tokens']:>9}  "
                  f"{_fmt_tiers(r['external_tokens'])}")
        print(f"  tier / alone: TTFT {m['ttft_ratio_median']:.3f}x (median of paired requests, quartiles "
              f"{m['ttft_ratio_iqr'][0]:.3f}-{m['ttft_ratio_iqr'][1]:.3f}), busy time {m['time_ratio']:.3f}x")
    sp = res["ttft_p50_speedup"]
    if sp is None:
        print(f"target TTFT p50 >= {TTFT_TARGET}x vLLM alone: not measured (a row failed)")
    else:
        print(f"target TTFT p50 >= {TTFT_TARGET}x vLLM alone (host tier): "
              + ("met" if sp >= TTFT_TARGET else f"NOT met, short by {TTFT_TARGET - sp:.2f}x") + f" ({sp:.2f}x)")
    if "error" not in m:
        worst = max(m["ttft_ratio_median"], m["time_ratio"])
        print(f"target all-miss <= {(MISS_TARGET - 1) * 100:.0f}% slower: "
              + ("met" if m["target_met"] else f"NOT met, over by {(worst - MISS_TARGET) * 100:.1f} points")
              + f" ({(worst - 1) * 100:+.1f}%)")


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true",
                    help="3 conversations, vLLM alone and + host only, 3 all-miss requests (a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conversations", type=int, default=10)
    ap.add_argument("--miss-requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--image-side", type=int, default=448, help="pixels: 448 -> 196 image tokens")
    ap.add_argument("--block-size", type=int, default=128, help="vLLM's block (CPU: a multiple of 32)")
    ap.add_argument("--max-model-len", type=int, default=2560,
                    help="also vLLM's KV cache size in tokens (one such prompt)")
    ap.add_argument("--host-mib", type=int, default=512, help="host tier of the + host rows, MiB")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per engine (default 1, unbound; 0: vLLM's own binding, all allowed cores)")
    ap.add_argument("--checkpoint", help="a bench-2b checkpoint directory (default: generated on first use)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        sys.exit(_worker(args.worker))
    if args.quick:
        args.conversations, args.miss_requests, args.max_tokens = 3, 3, 4
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg_1min"] = [load0, os.getloadavg()[0]]
    print(f"{os.cpu_count()} CPUs, load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (other processes share "
          f"the machine), {res['wall_s']:.0f} s in all")
    report(res)
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
