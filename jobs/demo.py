"""``qwen3vl-ray demo``: the store at work in a minute, on one machine.

1. Generates the ``tiny`` checkpoint on first use (into ``checkpoint_dir``; reused afterwards).
2. Starts the service on an embedded Ray (``--runner engine``: one in-process engine, no Ray).
3. Runs the sample batch shipped in ``jobs/data/`` cold, then warm (its prefixes and images are now in the
   store), on the service once more after restarting its workers (their device tiers lost, the node
   agents' host and disk tiers kept), and a three-turn chat about one image.
4. Prints a summary: TTFT cold vs warm, cached-token ratio, hits and bytes per tier (the workers' device
   tiers and the node agents' host and disk tiers), compression ratio, and where the Ray dashboard is (up
   while the demo runs; ``--keep-alive`` keeps it up until Ctrl-C).

The disk tier gets a fresh temporary directory unless ``--disk-dir`` (or ``QWEN3VL_RAY_DISK_DIR``) names one:
the first pass is then cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.dataset import Item, Limits, load, read_image
from jobs.log_levels import apply_log_levels
from jobs.rows import TIER_ORDER
from jobs.runner import RUNNERS, make_runner
from jobs.table import fmt_bytes, render
from qwen3vl_ray import settings as S

DATA = Path(__file__).resolve().parent / "data"
# The sample prompts are short and the tiny model's KV is small (~32 KiB per 32-token chunk): small chunks
# let the shared prefixes (system prompt, images) be reused, and small tiers make entries travel down the
# hierarchy, so the summary shows every tier at work. Flags and QWEN3VL_RAY_* variables override these.
# The lower tiers compress (int8, then int8+zstd on disk), so the summary shows what the codecs save.
DEMO_DEFAULTS = {"chunk_tokens": 32, "max_new_tokens": 12, "block_bytes": 64 << 10, "device_bytes": 256 << 10,
                 "host_bytes": 192 << 10, "disk_bytes": 256 << 20, "kv_device_budget_bytes": 64 << 20,
                 "host_codec": "int8", "disk_codec": "int8+zstd"}
# The service's workers write every new chunk through to their node agent (host, then disk), so those tiers
# fill whatever the device tier holds; the device tier is the worker's engine store alone (nothing below it
# in the process) and must hold a request's whole prefix and images (the longest sample prompt is ~340 KiB of
# KV, an image's features ~80 KiB). 2 MiB holds the sample batch's working set, as a GPU would.
RUNNER_DEFAULTS = {"service": {"device_bytes": 2 << 20}}


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--runner", choices=RUNNERS, default="service",
                   help="service: Ray service on an embedded Ray (default); engine: in-process engine, no Ray")
    p.add_argument("--data", default=str(DATA / "prompts.jsonl"), help="batch to run twice [jobs/data/prompts.jsonl]")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON object (last line)")
    p.add_argument("--keep-alive", action="store_true",
                   help="after the summary, keep the embedded Ray and its dashboard up until Ctrl-C")
    S.add_arguments(p)
    return p


def _settings(args: argparse.Namespace) -> S.Settings:
    """Flags over the environment over the demo's defaults (per runner) over the table's defaults."""
    s = S.from_args(args)
    defaults = {**DEMO_DEFAULTS, **RUNNER_DEFAULTS.get(getattr(args, "runner", "service"), {})}
    demo = {k: v for k, v in defaults.items() if s.source(k) == "default"}
    return s.replace(**demo) if demo else s


def _chat_turns() -> tuple[str, list[dict]]:
    chat = json.loads((DATA / "chat.json").read_text())
    turns = []
    for msg in chat["turns"]:
        content = msg["content"]
        if isinstance(content, list):
            content = [dict(p, image=read_image(p["image"], DATA, Limits())) if p["type"] == "image" else p
                       for p in content]
        turns.append({"role": msg["role"], "content": content})
    return chat["id"], turns


def run_chat(runner, session: str, turns: list[dict]) -> list[dict]:
    """Sends the user turns one by one, each with the whole history so far, under one session."""
    history, rows = [], []
    for msg in turns:
        history.append(msg)
        if msg["role"] != "user":
            continue
        [row] = runner.run([Item(f"{session}-turn{len(rows) + 1}", [dict(m) for m in history])], session=session)
        rows.append(row)
        if row["error"]:
            break
        history.append({"role": "assistant", "content": row["text"] or ""})
    return rows


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _batch_stats(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r["error"]]
    known = [r for r in ok if r["prompt_tokens"] is not None]  # a service result may not report it
    prompt = sum(r["prompt_tokens"] for r in known)
    cached = sum(r["cached_tokens"] or 0 for r in known)
    per_tier: dict[str, int] = {}
    for r in ok:
        for t, n in (r.get("cached_tiers") or {}).items():
            per_tier[t] = per_tier.get(t, 0) + int(n)
    return {"rows": len(rows), "errors": len(rows) - len(ok), "ttft_median_s": _median([r["ttft_s"] for r in ok]),
            "ttft_mean_s": statistics.fmean([r["ttft_s"] for r in ok]) if ok else None,
            "cached_ratio": cached / prompt if prompt else None, "prompt_tokens": prompt,
            "cached_tokens": sum(r["cached_tokens"] or 0 for r in ok),
            "vision_cache_hits": sum(r.get("vision_cache_hits", 0) for r in ok), "cached_tokens_by_tier": per_tier}


def _tier_list(store: dict) -> list[dict]:
    """Tier stats dicts from an engine (``{"store": {"tiers": [...]}}``) or a service status
    (``{"nodes": {node: {"tiers": {name: {...}}}}, "devices": {worker: {...}}}``), each with a ``name``:
    the workers' device tiers first, then each node agent's host and disk tiers."""
    if "nodes" in store:
        out = []
        devices = {w: t for w, t in (store.get("devices") or {}).items() if "error" not in t}
        for worker, t in sorted(devices.items()):
            name = f"device @{str(t.get('node', ''))[:8]}"
            out.append(dict(t, name=f"{name} {worker}" if len(devices) > 1 else name))
        for node, report in sorted(store["nodes"].items()):
            for name, t in (report.get("tiers") or {}).items():
                out.append(dict(t, name=f"{name} @{node[:8]}"))
        return out
    tiers = store.get("store", store).get("tiers", [])
    if isinstance(tiers, dict):
        tiers = [dict(t, name=n) for n, t in tiers.items()]
    return list(tiers)


def _tier_rows(store: dict) -> list[list]:
    rows = []
    for t in _tier_list(store):
        used = t.get("used_bytes", t.get("used"))
        cap = t.get("capacity_bytes", t.get("capacity"))
        ratio = t.get("compression_ratio")
        if ratio is None and t.get("codec") == "none":
            ratio = 1.0  # stored as is
        hits = t.get("hits")
        rows.append([t["name"], t.get("entries"), hits, fmt_bytes(t.get("bytes_read")), fmt_bytes(t.get("bytes_written")),
                     f"{fmt_bytes(used)} / {fmt_bytes(cap)}", f"{ratio:.2f}x" if ratio else None])
    return rows


def _embedded(settings: S.Settings) -> bool:
    """True when the service runner starts its own Ray (no --address / RAY_ADDRESS): it ends with the demo."""
    return not (settings.address or os.environ.get("RAY_ADDRESS"))


def dashboard_url() -> str:
    try:
        import ray

        if ray.is_initialized():
            url = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") else None
            url = url or ray._private.worker.global_worker.node.address_info.get("webui_url")
            if url:
                return url if url.startswith("http") else f"http://{url}"
    except Exception:
        pass
    return "(no Ray in this run)"


def restart_workers(tenant: Any, timeout_s: float = 120.0) -> list[str]:
    """Kill the service's workers (``tenant``'s) and wait until Ray has restarted each (a new process, model
    loaded, registered again with the coordinator): their device tiers are gone, their node agents' host and
    disk tiers are not."""
    import ray

    from actors.config import NAMESPACE
    from actors.coordinator import coordinator_name
    from actors.tenancy import with_tenant

    coordinator = with_tenant(ray.get_actor(coordinator_name(tenant), namespace=NAMESPACE), tenant)
    workers = sorted(ray.get(coordinator.state.remote()).get("workers") or {})
    handles = {w: with_tenant(ray.get_actor(w, namespace=NAMESPACE), tenant) for w in workers}
    pids = dict(zip(workers, ray.get([h.pid.remote() for h in handles.values()])))
    for h in handles.values():
        ray.kill(h.actor, no_restart=False)
    deadline = time.monotonic() + timeout_s
    for w, h in handles.items():
        while True:  # pid answers once __init__ (model load, registration) is done
            try:
                if ray.get(h.pid.remote(), timeout=max(1.0, deadline - time.monotonic())) != pids[w]:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {w} did not restart within {timeout_s:g} s")
            time.sleep(0.2)
    return workers


def run_demo(settings: S.Settings, runner_kind: str, data: str) -> dict:
    t0 = time.perf_counter()
    ckpt = S.resolve_checkpoint(settings)  # generated on first use
    t_ckpt = time.perf_counter() - t0
    runner = make_runner(settings, runner_kind)
    try:
        limits = Limits(max_pixels=settings.max_pixels, max_image_bytes=settings.max_image_bytes)
        items = list(load(data, limits))
        runs = {}
        # service: a third pass after the workers restart (their device tiers empty): the node agents' host
        # and disk tiers serve it, as they would a new worker or one on another node. Only on the demo's own
        # embedded Ray: the workers of a cluster it attached to serve others.
        restart = runner_kind == "service" and _embedded(settings)
        phases = ("cold", "warm", "restart") if restart else ("cold", "warm")
        for phase in phases:
            if phase == "restart":
                restart_workers(runner.handle.config.tenant)
            rows = []
            for i in range(0, len(items), settings.batch_size):
                rows += runner.run(items[i:i + settings.batch_size])
            runs[phase] = rows
        session, turns = _chat_turns()
        try:
            chat = run_chat(runner, session, turns)
        finally:
            runner.end_session(session)
        store = runner.stats()  # on the service: the agents' tiers and the workers' device tiers ("devices")
        url = dashboard_url()
    finally:
        runner.close()
    return {"checkpoint": ckpt, "checkpoint_s": t_ckpt, "runner": runner_kind, "disk_dir": settings.disk_dir,
            "embedded_ray": runner_kind == "service" and _embedded(settings),
            **{phase: _batch_stats(rows) for phase, rows in runs.items()},
            "chat": [{k: r.get(k) for k in ("id", "prompt_tokens", "cached_tokens", "ttft_s", "tier", "error")}
                     for r in chat],
            "store": store, "dashboard": url, "answers": {r["id"]: r["text"] for r in runs["warm"]},
            "errors": [f"{r['id']}: {r['error']}" for rows in [*runs.values(), chat] for r in rows if r["error"]]}


def render_summary(s: dict, keep_alive: bool = False) -> str:
    cold, warm = s["cold"], s["warm"]
    phases = [p for p in ("cold", "warm", "restart") if p in s]
    label = {"cold": "cold", "warm": "warm", "restart": "warm, workers restarted"}
    speed = cold["ttft_median_s"] / warm["ttft_median_s"] if cold["ttft_median_s"] and warm["ttft_median_s"] else None
    by_tier = [s[p]["cached_tokens_by_tier"] for p in phases]
    out = [render(["batch", "rows", "errors", "TTFT median s", "TTFT mean s", "cached-token ratio", "vision hits"],
                  [[label[p], s[p]["rows"], s[p]["errors"], s[p]["ttft_median_s"], s[p]["ttft_mean_s"],
                    f"{s[p]['cached_ratio']:.0%}" if s[p]["cached_ratio"] is not None else f"{s[p]['cached_tokens']} tok",
                    s[p]["vision_cache_hits"]] for p in phases],
                  title=f"Sample batch ({cold['rows']} requests) run {len(phases)} times; warm TTFT speedup: "
                        f"{speed:.1f}x" if speed else "Sample batch run twice"),
           "warm: each prompt's KV and image features come from the store and only its last token is computed; "
           "the tiny model prefills a prompt in ~10 ms on a CPU, so the gap is ms here (README: bench-2b).",
           *(["workers restarted: their device tiers are empty; the node agent's host and disk tiers serve the "
              "prompts' KV (on the tiny model a fetch costs about what recomputing does)."] if "restart" in s else []),
           "",
           render(["cached tokens from", *[label[p] for p in phases]],
                  [[t, *[b.get(t, 0) for b in by_tier]]
                   for t in sorted(set().union(*by_tier) | {"device"},
                                   key=lambda t: (TIER_ORDER.index(t) if t in TIER_ORDER else 9, t))]),
           "",
           render(["chat turn", "prompt tokens", "cached tokens", "TTFT s", "from tier"],
                  [[r["id"], r["prompt_tokens"], r["cached_tokens"], r["ttft_s"], r["tier"] or r["error"]]
                   for r in s["chat"]], title="Three-turn chat (one session)"),
           ""]
    tiers = _tier_rows(s["store"])
    if tiers:
        out += [render(["tier", "entries", "hits", "bytes read", "bytes written", "used / budget", "compression"],
                       tiers, title="Store (after the passes and the chat)"), ""]
    out += [f"checkpoint: {s['checkpoint']}" + (f" (generated in {s['checkpoint_s']:.1f} s)" if s["checkpoint_s"] > 1 else ""),
            f"disk tier:  {s['disk_dir']}" + ("  (a fresh directory for this run, so the first pass is cold; "
                                               "--disk-dir keeps one)" if s.get("fresh_disk_dir") else "")]
    if not s["dashboard"].startswith("http"):
        out.append(f"dashboard:  {s['dashboard']}")
    elif s.get("embedded_ray") and not keep_alive:
        out.append(f"dashboard:  {s['dashboard']} (qwen3vl_ray_* metrics) is up only while the demo runs: it stops "
                   f"with the demo's embedded Ray; --keep-alive keeps it up until Ctrl-C")
    elif s.get("embedded_ray"):
        out.append(f"dashboard:  {s['dashboard']} (qwen3vl_ray_* metrics), up until Ctrl-C (--keep-alive)")
    else:
        out.append(f"dashboard:  {s['dashboard']} (qwen3vl_ray_* metrics in its Metrics view)")
    if s["errors"]:
        out += ["errors:"] + [f"  {e}" for e in s["errors"]]
    return "\n".join(out)


def _wait_for_ctrl_c(url: str) -> None:
    print(f"qwen3vl-ray demo: Ray and its dashboard ({url}) stay up; Ctrl-C stops them", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("qwen3vl-ray demo: stopping", file=sys.stderr, flush=True)


def _stop_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None, prog: str = "python -m jobs.demo") -> int:
    args = build_parser(prog).parse_args(argv)
    settings = _settings(args)
    apply_log_levels(settings)
    print(f"qwen3vl-ray demo: runner={args.runner}, model={settings.model}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="qwen3vl-ray-demo-", ignore_cleanup_errors=True) as tmp:
        fresh = settings.source("disk_dir") == "default"
        if fresh:
            # The disk tier outlives the process (that is its point), so with the shared directory the "cold"
            # pass would be served from an earlier run's entries.
            settings = settings.replace(disk_dir=os.path.join(tmp, "disk-tier"))
        try:
            summary = run_demo(settings, args.runner, args.data)
            summary["fresh_disk_dir"] = fresh
            print(render_summary(summary, keep_alive=args.keep_alive))
            if args.json:
                print(json.dumps({k: v for k, v in summary.items() if k != "answers"}, default=str))
            sys.stdout.flush()
            if args.keep_alive and summary.get("embedded_ray") and summary["dashboard"].startswith("http"):
                _wait_for_ctrl_c(summary["dashboard"])
        finally:
            if args.runner == "service" and _embedded(settings):
                _stop_ray()  # before its disk tier's directory goes
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
