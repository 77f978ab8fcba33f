"""Plain-text tables for the CLI (no dependency: the output is read in terminals and CI logs)."""

from __future__ import annotations

from typing import Any, Sequence


def fmt_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Columns padded to width; numbers right-aligned, text left-aligned."""
    cells = [[fmt(c) for c in r] for r in rows]
    numeric = [[isinstance(c, (int, float)) and not isinstance(c, bool) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = ([title] if title else []) + [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, nums)).rstrip()
            for r, nums in zip(cells, numeric)]
    return "\n".join(out)
