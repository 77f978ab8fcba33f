"""``qwen3vl-ray``: the command line.

    qwen3vl-ray demo                         embedded Ray, tiny checkpoint, cold vs warm + a chat, summary
    qwen3vl-ray infer --input D --output O   a dataset, locally or against --address (same flags as jobs.infer)
    qwen3vl-ray serve [--address A] [--num-workers N] [--port P]
                                             an OpenAI-compatible endpoint (Ray Serve LLM + vLLM, KV on the tiers,
                                             requests routed to the node holding their cached prefix)
    qwen3vl-ray status [--address A]         per-node, per-tier table from the coordinator
    qwen3vl-ray service --address A [--num-workers N]
                                             start (or reuse) the coordinator, node agents and workers on a
                                             running cluster (refused on an embedded Ray, which would stop with it)
    qwen3vl-ray make-checkpoint tiny|bench-2b [--path P]
    qwen3vl-ray warm-kernels [--dtypes D ...] [--codecs C ...] [--jobs N]
                                             compile the fused codec kernels into numba's disk cache before
                                             serving (a cold process compiles each on first use, seconds each)
    qwen3vl-ray bench [NAME [ARGS...]]       list the benchmarks, or run one
    qwen3vl-ray config [--markdown]          the resolved settings, or the configuration reference

Every option also has an environment variable (``QWEN3VL_RAY_*``): see docs/configuration.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import subprocess
import sys
import time

from jobs.log_levels import FORMAT, apply_log_levels
from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ClusterError, ConfigError

logger = logging.getLogger(__name__)
PROG = "qwen3vl-ray"


# -- make-checkpoint -------------------------------------------------------------------------------------

def cmd_make_checkpoint(argv: list[str]) -> int:
    from qwen3vl_ray.engine.checkpoint import make_checkpoint
    from qwen3vl_ray.engine.presets import PRESETS

    p = argparse.ArgumentParser(prog=f"{PROG} make-checkpoint", description="Write a generated checkpoint.")
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--path", help="target directory [default <checkpoint_dir>/<preset>]")
    p.add_argument("--seed", type=int, default=0)
    S.add_arguments(p, sections=["model"], skip=["model", "device", "dtype"])
    args = p.parse_args(argv)
    s = S.from_args(args)
    path = args.path or os.path.join(s.checkpoint_dir, args.preset)
    out = make_checkpoint(args.preset, path, seed=args.seed)
    print(out)
    return 0


# -- warm-kernels ----------------------------------------------------------------------------------------

def cmd_warm_kernels(argv: list[str]) -> int:
    from qwen3vl_ray.codecs import warmup

    p = argparse.ArgumentParser(prog=f"{PROG} warm-kernels", description=warmup.__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=list(warmup.DTYPES), metavar="DTYPE",
                   help=f"the tensor dtypes to compile for, any of {', '.join(warmup.DTYPES)} [default: all]; a "
                        "model's KV and vision features take its dtype (bfloat16 for Qwen3-VL)")
    p.add_argument("--codecs", nargs="+", default=list(warmup.CODECS), metavar="CODEC",
                   help=f"the codecs whose kernels to compile, any of {', '.join(warmup.CODECS)} [default: all; "
                        "kv-int8 and kv-int4 run int8's and int4's kernels]")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes compiling at once [default: this process's cores]")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a line per item")
    args = p.parse_args(argv)

    def line(w):
        if not args.json:
            print(f"{w.codec:12} {w.dtype:9} {w.seconds:7.1f} s", flush=True)

    start = time.perf_counter()
    done = warmup.warm_kernels(args.dtypes, jobs=args.jobs, progress=line, codecs=args.codecs)
    if args.json:
        print(json.dumps([vars(w) for w in done]))
    else:
        print(f"{len(done)} codec/dtype pairs warm in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


# -- bench -----------------------------------------------------------------------------------------------

def list_benchmarks() -> list[tuple[str, str]]:
    """(name, first docstring line) of each benchmark in ``benchmarks/``: a module with a ``main``
    (helpers such as trace loaders have none)."""
    import benchmarks

    out = []
    for m in pkgutil.iter_modules(benchmarks.__path__):
        if m.name.startswith("_") or m.ispkg:
            continue
        try:
            mod = importlib.import_module(f"benchmarks.{m.name}")
        except Exception as e:  # a benchmark whose imports are missing is still listed
            out.append((m.name, f"(cannot import: {type(e).__name__}: {e})"))
            continue
        if callable(getattr(mod, "main", None)):
            out.append((m.name, ((mod.__doc__ or "").strip().splitlines() or [""])[0]))
    return out


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-l", "--list", "list"):
        from jobs.table import render

        rows = list_benchmarks()
        print(render(["benchmark", "what it measures"], rows) if rows else "no benchmarks found in benchmarks/")
        print(f"\nrun one: {PROG} bench NAME [--json] [ARGS...]  (same as python -m benchmarks.NAME)")
        return 0
    if argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} bench [NAME [ARGS...]]\nWith no NAME, lists the benchmarks.")
        return 0
    name, rest = argv[0], argv[1:]
    known = [n for n, _ in list_benchmarks()]
    if name not in known:
        print(f"error: unknown benchmark {name!r}; known: {', '.join(known) or '(none)'}", file=sys.stderr)
        return 2
    # A child process: a benchmark owns its process (Ray, torch threads) and its exit status.
    return subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *rest])


# -- infer / serve / service / status / demo -------------------------------------------------------------

def cmd_infer(argv: list[str]) -> int:
    from jobs import infer

    return infer.main(argv, prog=f"{PROG} infer")


def cmd_serve(argv: list[str]) -> int:
    from jobs import serve

    return serve.main(argv, prog=f"{PROG} serve")


def cmd_service(argv: list[str]) -> int:
    from jobs import service_runner

    p = argparse.ArgumentParser(prog=f"{PROG} service",
                                description="Start (or reuse) the coordinator, the node agents and N workers "
                                            "(0: jobs add them) on the running cluster at --address / "
                                            "RAY_ADDRESS, then exit; they are detached and keep running.")
    S.add_arguments(p)
    args = p.parse_args(argv)
    s = S.from_args(args)
    apply_log_levels(s)
    info = service_runner.start_service(s)
    print(json.dumps(info, indent=1, default=str))
    return 0


def cmd_status(argv: list[str]) -> int:
    from jobs import service_runner
    from jobs.status import render_status

    p = argparse.ArgumentParser(prog=f"{PROG} status", description="Per-node, per-tier table from the coordinator.")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    S.add_arguments(p, sections=["jobs"], skip=["batch_size"])
    args = p.parse_args(argv)
    s = S.from_args(args)
    apply_log_levels(s)
    status = service_runner.cluster_status(s.address or "auto")
    print(json.dumps(status, indent=1, default=str) if args.json else render_status(status))
    return 0


def cmd_demo(argv: list[str]) -> int:
    from jobs import demo

    return demo.main(argv, prog=f"{PROG} demo")


def cmd_config(argv: list[str]) -> int:
    return S.main(argv)


COMMANDS = {
    "demo": (cmd_demo, "embedded Ray + tiny checkpoint: a batch cold then warm and a chat, then a summary"),
    "infer": (cmd_infer, "run a dataset (.jsonl/.parquet) to a Parquet file, locally or against --address"),
    "serve": (cmd_serve, "OpenAI-compatible endpoint: Ray Serve LLM + vLLM on the tiers, prefix-aware routing"),
    "status": (cmd_status, "per-node, per-tier table (used/budget, entries, hit ratio, pressure)"),
    "service": (cmd_service, "start or reuse the coordinator, node agents and workers on a cluster"),
    "make-checkpoint": (cmd_make_checkpoint, "write a generated tiny or bench-2b checkpoint"),
    "warm-kernels": (cmd_warm_kernels, "compile the fused codec kernels into numba's disk cache before serving"),
    "bench": (cmd_bench, "list the benchmarks, or run one"),
    "config": (cmd_config, "print the resolved settings (or --markdown: the configuration reference)"),
}


def _usage() -> str:
    lines = [f"usage: {PROG} COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", f"{PROG} COMMAND --help shows a command's options; every option also has an environment",
              "variable QWEN3VL_RAY_* (docs/configuration.md)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Exit status 2: the command could not run as asked (a setting, the checkpoint, the cluster), said in one
    # line with the fix; anything else is a bug and keeps its traceback.
    try:
        logging.basicConfig(level=S.env_value("log_level"), format=FORMAT)
        return COMMANDS[name][0](rest)
    except (ConfigError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
