"""``qwen3vl-ray status``: one row per node and tier from the coordinator and the node agents."""

from __future__ import annotations

from jobs.table import fmt_bytes, render


def _pressure(used, cap, high) -> str:
    if not cap:
        return "-"
    frac = used / cap
    flag = " HIGH" if high is not None and frac >= high else ""
    return f"{frac:.0%}{flag}"


def render_status(status: dict) -> str:
    """Per-node, per-tier table: used / budget, entries, hit ratio, pressure (the workers' device tiers when
    ``status["devices"]`` has them, then each node agent's tiers); then the workers."""
    rows = []
    # the workers' own device tiers (``actors.worker.device_stats_of``), when the status carries them
    for worker, t in sorted((status.get("devices") or {}).items()):
        if "error" in t:
            rows.append([str(t.get("node", ""))[:12], "device", "-", "-", "-", f"worker {worker} unreachable: {t['error']}"])
            continue
        hits, misses = t.get("hits"), t.get("misses")
        ratio = f"{hits / (hits + misses):.0%}" if hits is not None and misses is not None and hits + misses else "-"
        rows.append([str(t.get("node", ""))[:12], "device", f"{fmt_bytes(t.get('used'))} / {fmt_bytes(t.get('capacity'))}",
                     t.get("entries"), ratio, _pressure(t.get("used", 0), t.get("capacity"), None)])
    for node, report in sorted(status.get("nodes", {}).items()):
        short = node[:12]
        if "error" in report:
            rows.append([short, "-", "-", "-", "-", f"agent unreachable: {report['error']}"])
            continue
        for tier, t in report.get("tiers", {}).items():
            hits, misses = t.get("hits"), t.get("misses")
            ratio = f"{hits / (hits + misses):.0%}" if hits is not None and misses is not None and hits + misses else "-"
            rows.append([short, tier, f"{fmt_bytes(t.get('used'))} / {fmt_bytes(t.get('capacity'))}",
                         t.get("entries"), ratio, _pressure(t.get("used", 0), t.get("capacity"), t.get("high"))])
    coord = status.get("coordinator", {})
    out = [render(["node", "tier", "used / budget", "entries", "hit ratio", "pressure"], rows,
                  title=f"{len(status.get('nodes', {}))} node(s), {coord.get('entries', 0)} entries in the directory")]
    workers = coord.get("workers", {})
    if workers:
        out += ["", render(["worker", "node", "in flight", "available"],
                           [[w, v.get("node", "")[:12], v.get("inflight"), v.get("available")]
                            for w, v in sorted(workers.items())])]
    if coord.get("budget"):
        out += ["", f"admission: {fmt_bytes(coord.get('reserved', 0))} reserved of {fmt_bytes(coord['budget'])}"]
    return "\n".join(out)
