"""Batch inference job: a JSONL/Parquet dataset of chats -> a Parquet file of answers.

    python -m jobs.infer --input data.jsonl --output out.parquet --model tiny          # embedded Ray
    ray job submit --working-dir . -- python -m jobs.infer --input ... --output ...    # on a cluster

Inside ``ray job submit`` a plain ``ray.init()`` attaches to the cluster (``RAY_ADDRESS``); run by hand it
starts an embedded Ray. ``--address`` attaches to a given cluster instead.

The default runner, ``vllm``, runs the rows on Ray Data LLM's vLLM processor with the project's KV connector on
the node agents (``jobs.vllm_runner``; its rows have no ``cached_tokens``: Ray Data LLM does not report vLLM's
count). ``--runner service|engine|plain`` runs the project's own transformers engine, kept as the reference
the correctness tests compare against (``jobs.runner``).

Output columns: id, text, prompt_tokens, completion_tokens, cached_tokens, ttft_s, tier, error. A bad row
(missing or corrupt image, too large, malformed messages) gets its error in its row and the job goes on;
``--fail-on-error`` makes the exit status 1 when any row has an error (its one line, like the summary, names
the first failed ids and counts the errors per kind). Finished rows are made durable per
batch (``jobs.output``): a rerun with the same ``--output`` skips the ids already done (``--retry-errors``
redoes rows that failed), and a killed job loses no finished row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from jobs.dataset import DatasetError, Item, Limits, ids_in_order, load
from jobs.metrics import JobMetrics, attach_for_metrics
from jobs.output import OutputBusyError, PartWriter
from jobs.log_levels import apply_log_levels
from jobs.rows import error_row
from jobs.runner import JOB_RUNNERS, Runner, make_runner
from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ClusterError, ConfigError, error_line

logger = logging.getLogger(__name__)

# A batch that raises is retried row by row; this many batches in a row failing entirely means the runner
# itself is broken (cluster gone, model unloadable), and finishing the dataset with errors would only hide it.
MAX_FAILED_BATCHES = 3
# The summary and --fail-on-error name this many failed ids (the error column has them all).
FAILED_IDS_SHOWN = 5


def build_parser(prog: str = "python -m jobs.infer") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="dataset: .jsonl or .parquet (rows: id + messages, or id + prompt + images)")
    p.add_argument("--output", required=True, help="result .parquet (parts are kept in OUTPUT.parts/ while running)")
    p.add_argument("--runner", choices=JOB_RUNNERS, default="vllm",
                   help="vllm: Ray Data LLM on vLLM, KV on the node agents (default); service: the Ray service "
                        "(the project's engine); engine: one in-process engine, no Ray; plain: transformers "
                        "generate without the store (reference)")
    p.add_argument("--fail-on-error", action="store_true", help="exit with status 1 if any row has an error")
    p.add_argument("--retry-errors", action="store_true", help="redo rows whose earlier result was an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    S.add_arguments(p)
    return p


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _run_batch(runner: Runner | None, batch: list[Item], state: dict) -> list[dict]:
    """Output rows for ``batch`` in order: invalid items keep their error; valid ones go to the runner."""
    valid = [it for it in batch if it.error is None]
    by_id: dict[str, dict] = {it.id: error_row(it.id, it.error) for it in batch if it.error is not None}
    if valid:
        try:
            rows = runner.run(valid)
            if len(rows) != len(valid):
                raise RuntimeError(f"runner returned {len(rows)} rows for {len(valid)} requests")
            state["failed_batches"] = 0
        except Exception as e:
            logger.warning("batch of %d failed (%s: %s); retrying row by row", len(valid), type(e).__name__, e,
                           exc_info=True)
            rows = []
            for it in valid:
                try:
                    rows += runner.run([it])
                except Exception as e1:
                    rows.append(error_row(it.id, error_line(e1)))
            if all(r["error"] for r in rows):
                state["failed_batches"] += 1
                if state["failed_batches"] >= MAX_FAILED_BATCHES:
                    raise RuntimeError(f"{MAX_FAILED_BATCHES} batches in a row failed entirely; last error: "
                                       f"{rows[-1]['error']}") from e
            else:
                state["failed_batches"] = 0
        for r in rows:
            by_id[r["id"]] = r
    return [by_id[it.id] for it in batch]


def _batched(items: Iterable[Item], size: int, start, stats: dict) -> Iterator[list[dict]]:
    """Output rows batch by batch from a runner that takes batches; ``start()`` returns the runner (called only
    for a batch with a valid item)."""
    for batch in _batches(items, size):
        yield _run_batch(start() if any(it.error is None for it in batch) else None, batch, stats)


def _streamed(items: Iterable[Item], size: int, start) -> Iterator[list[dict]]:
    """Output rows for a streaming runner (``jobs.runner.StreamingRunner``): the invalid items' errors in batches
    of ``size`` first, then every valid item in one ``stream`` call of the runner ``start()`` returns (called
    only if there is one: a dataset of bad rows starts nothing)."""
    valid, bad = [], []
    for it in items:
        if it.error is None:
            valid.append(it)
        else:
            bad.append(error_row(it.id, it.error))
            if len(bad) == size:
                yield bad
                bad = []
    if bad:
        yield bad
    if valid:
        yield from start().stream(valid)


def run(input_path: str, output: str, settings: S.Settings, runner: Runner | str = "vllm",
        retry_errors: bool = False, progress: bool = True) -> dict:
    """Run the dataset; returns a summary dict. Raises DatasetError/ConfigError/OutputBusyError for
    problems with the job as a whole."""
    limits = Limits(max_pixels=settings.max_pixels, max_image_bytes=settings.max_image_bytes)
    order = ids_in_order(input_path)
    t0 = time.perf_counter()
    with PartWriter(output) as writer:
        done = writer.done()
        skip = {rid for rid, failed in done.items() if not (failed and retry_errors)}
        already = len(skip.intersection(order))
        items = load(input_path, limits, skip)  # lazily: also checks duplicate ids before the first row
        todo = len(order) - already
        stats = {"rows": 0, "errors": 0, "prompt_tokens": 0, "cached_tokens": 0, "cached_total": 0,
                 "cached_unknown": 0, "failed_batches": 0}
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(order), initial=already, unit="row", desc="infer", dynamic_ncols=True,
                       file=sys.stderr)
        own_runner = isinstance(runner, str)
        kind, active = (runner, None) if own_runner else (None, runner)
        metrics = None

        def start() -> Runner:
            nonlocal active
            if active is None:
                # Lazily: a dataset of bad rows (or a resumed one) never starts Ray or loads a model.
                if kind not in ("service", "vllm"):  # those two attach to Ray themselves
                    attach_for_metrics(settings.address)
                active = make_runner(settings, kind)
            return active

        if todo:
            try:
                if kind == "vllm" or hasattr(active, "stream"):
                    results = _streamed(items, settings.batch_size, start)
                else:
                    results = _batched(items, settings.batch_size, start, stats)
                for rows in results:
                    writer.write(rows)  # durable before it counts as done
                    if metrics is None and active is not None:
                        metrics = JobMetrics.create(Path(output).name)  # Ray is up once the runner is
                    if metrics is not None:
                        metrics.record(rows)
                    for r in rows:
                        stats["rows"] += 1
                        stats["errors"] += r["error"] is not None
                        stats["cached_total"] += r["cached_tokens"] or 0
                        stats["cached_unknown"] += r["error"] is None and r["cached_tokens"] is None
                        # hit ratio over rows that report their prompt size and their cached tokens (the vllm
                        # runner reports no cached tokens: its rows would only dilute the ratio)
                        if r["prompt_tokens"] and r["cached_tokens"] is not None:
                            stats["prompt_tokens"] += r["prompt_tokens"]
                            stats["cached_tokens"] += r["cached_tokens"]
                    if bar is not None:
                        bar.update(len(rows))
                        hit = f"{_ratio(stats):.0%}" if stats["prompt_tokens"] else f"{stats['cached_total']} tok"
                        bar.set_postfix(hit=hit, err=stats["errors"], refresh=False)
                if metrics is not None:
                    metrics.flush()
            finally:
                if bar is not None:
                    bar.close()
                if own_runner and active is not None:
                    active.close()
        total = writer.compact(order)
    summary = {
        "output": str(Path(output).resolve()),
        "rows_total": len(order),
        "rows_run": stats["rows"],
        "rows_skipped": already,
        "errors_run": stats["errors"],
        **_errors(output, set(order)),
        "hit_ratio": round(_ratio(stats), 4) if stats["prompt_tokens"] else None,
        # null when no finished row reported it (the vllm runner), rather than a 0 that claims no reuse
        "cached_tokens": None if stats["cached_unknown"] and not stats["cached_total"] else stats["cached_total"],
        "rows_per_s": round(stats["rows"] / max(time.perf_counter() - t0, 1e-9), 3),
        "rows_in_output": total,
    }
    return summary


def _ratio(stats: dict) -> float:
    return stats["cached_tokens"] / stats["prompt_tokens"] if stats["prompt_tokens"] else 0.0


def _errors(output: str, ids: set[str]) -> dict:
    """The output's failed rows among ``ids``: how many, the first few ids, and a count per error kind."""
    import pyarrow.parquet as pq

    t = pq.read_table(output, columns=["id", "error"])
    failed = [(rid, err) for rid, err in zip(t.column("id").to_pylist(), t.column("error").to_pylist())
              if rid in ids and err is not None]
    kinds: dict[str, int] = {}
    for _, err in failed:
        kinds[error_kind(err)] = kinds.get(error_kind(err), 0) + 1
    return {"errors_total": len(failed), "failed_ids": [rid for rid, _ in failed[:FAILED_IDS_SHOWN]],
            "error_kinds": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))}


# "ValueError: ...", "ray.exceptions.RayTaskError: ...", "preprocessing failed: ValueError: ..."
_KIND_RE = re.compile(r"^(?:[\w ]+: )?(?:[\w]+\.)*([A-Z]\w*(?:Error|Exception|Exit|Timeout))\s*:")


def error_kind(error: str) -> str:
    """The exception class a row's ``error`` names (``"ImageError: ..."`` -> ``ImageError``, also after a
    prefix such as ``preprocessing failed:``). The dataset's own checks write their message bare: those are
    ``RowError`` (``jobs.dataset``)."""
    m = _KIND_RE.match(error)
    return m.group(1) if m else "RowError"


def failed_rows_text(summary: dict) -> str:
    """``3 row(s) have errors (RowError: 2, ImageError: 1); failed ids: a, b, c``, for one line."""
    kinds = ", ".join(f"{k}: {n}" for k, n in summary["error_kinds"].items())
    shown = summary["failed_ids"]
    more = f" and {summary['errors_total'] - len(shown)} more" if summary["errors_total"] > len(shown) else ""
    return (f"{summary['errors_total']} row(s) have errors ({kinds}); failed ids: {', '.join(map(str, shown))}"
            f"{more} (the error column of {summary['output']})")


def main(argv: list[str] | None = None, prog: str = "python -m jobs.infer") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        settings = S.from_args(args)
        apply_log_levels(settings)
        address = settings.address or os.environ.get("RAY_ADDRESS")
        if address and args.runner != "service":  # the job attaches for its metrics: a bad address is one line
            from jobs.service_runner import check_cluster

            check_cluster(address)
        summary = run(args.input, args.output, settings, runner=args.runner, retry_errors=args.retry_errors,
                      progress=not args.no_progress)
    except (DatasetError, ConfigError, ClusterError, OutputBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("summary: " + json.dumps(summary), flush=True)
    if summary["errors_total"]:
        if args.fail_on_error:
            print(f"error: {failed_rows_text(summary)} (--fail-on-error)", file=sys.stderr)
            return 1
        print(f"warning: {failed_rows_text(summary)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
