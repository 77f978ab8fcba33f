"""How many 2,000-token chat sessions stay resumable without recompute, next to the physical limit.

    python -m benchmarks.capacity [--json] [--preset tiny] [--checkpoint DIR] [--session-tokens 2000]

For each configuration (device D, host H, disk S budgets and per-tier codecs) the engine runs more
sessions than can fit (one turn each, distinct text), then counts the sessions whose every KV entry is
still in some tier (``Qwen3VLEngine.session_resumable``: the next turn recomputes none of the old tokens).
Limit = (D + H x r_H + S x r_S) / session KV bytes, where r is the codec's measured compression ratio on
this model's KV chunks (1 without a codec). Target: sessions / limit >= 0.9. One resumed turn per
configuration is checked to load all its old tokens from the store. Rows name the eviction policy: the
project default and plain LRU. LRU evicts a session's chunks together (oldest session first); a policy that
scatters evictions over many sessions breaks more of them than the bytes it frees (see the report rows).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import options
from qwen3vl_ray.codecs import make_codec
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.engine import Qwen3VLEngine
from qwen3vl_ray.engine.requests import Request, SamplingParams
from qwen3vl_ray.policies import DEFAULT_POLICY
from qwen3vl_ray.tiers.config import TierConfig

MiB = 1 << 20
WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore".split()


def session_text(tokenizer, n_tokens: int, seed: int) -> str:
    rng = np.random.RandomState(seed)
    words = [f"session-{seed}"]
    while len(tokenizer(" ".join(words))["input_ids"]) < n_tokens:
        words.extend(rng.choice(WORDS, 32).tolist())
    while len(words) > 1 and len(tokenizer(" ".join(words))["input_ids"]) > n_tokens:
        words.pop()
    return " ".join(words)


def codec_ratio(codec: str, sample) -> float:
    """Raw KV bytes / encoded bytes for one real KV chunk of this model."""
    if codec == "none":
        return 1.0
    return sample.numel() * sample.element_size() / len(make_codec(codec).encode(sample))


def probe(ckpt: str, session_tokens: int, chunk: int):
    """One real KV chunk of this model (for codec ratios) and the live KV bytes of one session turn."""
    cfg = EngineConfig(chunk_tokens=chunk, device="cpu", tiers=[TierConfig("host", 256 * MiB)], kv_device_budget_bytes=1 << 40)
    with Qwen3VLEngine(ckpt, cfg) as eng:
        text = session_text(eng.processor.tokenizer, session_tokens - 16, 10_000)
        r = eng.generate([Request([{"role": "user", "content": text}], SamplingParams(max_new_tokens=1), session_id="p")])[0]
        assert r.ok, r.error
        sample = eng.store.get(eng.sessions.get("p").chunk_keys[0])
        return sample, (session_tokens + 64) * eng.geometry.bytes_per_token


def run_config(ckpt: str, name: str, d: int, h: int, s: int, codec: str, ratio: float, live: int,
               session_tokens: int, chunk: int, tmp: Path, policy: str | None = None) -> dict:
    tiers = [TierConfig("device", d, block_bytes=4 << 10)]
    if h:
        tiers.append(TierConfig("host", h, codec=codec, block_bytes=4 << 10))
    if s:
        tiers.append(TierConfig("disk", s, codec=codec, path=str(tmp / f"disk-{name.replace(' ', '_')}")))
    # the live KV of one turn sits next to the device tier: the budget is D plus one session's KV
    cfg = EngineConfig(chunk_tokens=chunk, device="cpu", tiers=tiers, kv_device_budget_bytes=d + live, session_idle_s=0.0,
                       policy=policy)
    with Qwen3VLEngine(ckpt, cfg) as eng:
        session_bytes = session_tokens * eng.geometry.bytes_per_token
        limit = (d + (h + s) * ratio) / session_bytes
        n_try = math.ceil(limit * 1.3) + 2
        texts = {}
        for i in range(n_try):
            sid = f"s{i}"
            texts[sid] = session_text(eng.processor.tokenizer, session_tokens - 16, i)
            r = eng.generate([Request([{"role": "user", "content": texts[sid]}], SamplingParams(max_new_tokens=1), session_id=sid)])[0]
            assert r.ok, r.error
        prompt_tokens = r.metrics.prompt_tokens
        alive = [sid for sid in texts if eng.session_resumable(sid)]
        # resume the oldest surviving session: every old token must come from the store
        resumed_ok = None
        if alive:
            sid = alive[0]
            held = len(eng.sessions.get(sid).token_ids)
            msgs = [{"role": "user", "content": texts[sid]}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "and then?"}]
            r2 = eng.generate([Request(msgs, SamplingParams(max_new_tokens=1), session_id=sid)])[0]
            resumed_ok = r2.ok and r2.metrics.cached_tokens >= held - 1
    return {"config": name, "policy": policy or DEFAULT_POLICY, "device_bytes": d, "host_bytes": h, "disk_bytes": s, "codec": codec,
            "codec_ratio": ratio, "session_tokens": prompt_tokens, "session_bytes": session_bytes,
            "tried": n_try, "sessions": len(alive), "limit": limit, "ratio": len(alive) / limit,
            "resume_without_recompute": resumed_ok}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = options.parser(__doc__, "one JSON list")
    options.add_model(ap, "tiny")
    ap.add_argument("--session-tokens", type=int, default=2000)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--scale-mib", type=float, default=4.0, help="D = scale, H = 2 x scale, S = 4 x scale (MiB)")
    args = ap.parse_args(argv)
    u = int(args.scale_mib * MiB)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen3vl-bench-capacity-") as tmp:
        tmp = Path(tmp)
        ckpt = options.checkpoint(args, tmp)
        sample, live = probe(ckpt, args.session_tokens, args.chunk_tokens)
        for name, codec, dhs, policy in [("D+H+S", "none", (1, 2, 4), "lru"), ("D+H+S", "none", (1, 2, 4), None),
                                         ("device only", "none", (4, 0, 0), "lru"), ("device only", "none", (4, 0, 0), None),
                                         ("D+H+S int8", "int8", (1, 2, 4), "lru"), ("D+H+S kv-int4", "kv-int4", (1, 2, 4), "lru")]:
            r = codec_ratio(codec, sample)
            # compressed tiers get budgets shrunk by the codec ratio so every row runs about as many sessions
            d, h, s = dhs[0] * u, int(dhs[1] * u / r), int(dhs[2] * u / r)
            rows.append(run_config(ckpt, f"{name} {policy or DEFAULT_POLICY}", d, h, s, codec, r, live,
                                   args.session_tokens, args.chunk_tokens, tmp, policy))
    print(f"resumable {args.session_tokens}-token sessions vs (D + H*r + S*r) / session bytes ({args.checkpoint or args.preset})")
    print(f"{'config':26s} {'D/H/S MiB':>14s} {'codec':>8s} {'r':>5s} {'tried':>6s} {'sessions':>9s} {'limit':>7s} {'ratio':>6s} {'resume':>7s}")
    for r in rows:
        dhs = f"{r['device_bytes'] / MiB:.1f}/{r['host_bytes'] / MiB:.1f}/{r['disk_bytes'] / MiB:.1f}"
        print(f"{r['config']:26s} {dhs:>14s} {r['codec']:>8s} {r['codec_ratio']:5.2f} {r['tried']:6d} {r['sessions']:9d} "
              f"{r['limit']:7.1f} {r['ratio']:6.2f} {str(r['resume_without_recompute']):>7s}")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "store"} for r in rows]))
    return rows


if __name__ == "__main__":
    main()
