"""Block-access traces for policy studies: the Mooncake trace loader and synthetic generators.

A trace is a list of requests; a request is a list of block ids with *prefix* semantics: the same id
means the same prefix up to and including that block, so id ``b`` always follows the same parent id
(the previous block of its request, or nothing for a chain head). Every generator here keeps that
invariant (``check_prefix_property``), so the replay can pass ``parent`` to a policy and a prefix hit can
stop at the first missing block, as in ``../shared/traces/README.md``.

Generators are deterministic for a given seed and use only ``random`` (no numpy), so other modules
(cache benchmarks, tests) can reuse them cheaply.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from pathlib import Path

Trace = list[list[int]]

TRACE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
"""``../shared/traces`` next to the repository root."""

MOONCAKE_TRACE = TRACE_DIR / "mooncake_synthetic_trace.jsonl"


def load_mooncake(path: str | Path = MOONCAKE_TRACE) -> Trace:
    """Requests' ``hash_ids`` in arrival order: by ``timestamp`` when every record has one (stable, so equal
    times keep file order, as the Mooncake traces' multi-turn conversations need), else in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {str(path)!r} not found (expected the Mooncake jsonl trace)")
    records: list[tuple[float | None, list[int]]] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ids = [int(b) for b in rec["hash_ids"]]
                ts = rec.get("timestamp")
                records.append((None if ts is None else float(ts), ids))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{lineno}: not a trace record with a 'hash_ids' list of ints: {e}") from e
    if records and all(ts is not None for ts, _ in records):
        records.sort(key=lambda r: r[0])  # stable
    return [ids for _, ids in records]


def check_prefix_property(trace: Trace) -> None:
    """Raise ``ValueError`` if some block id follows two different parents (not a prefix trace)."""
    parent_of: dict[int, int | None] = {}
    for i, req in enumerate(trace):
        parent = None
        for b in req:
            if parent_of.setdefault(b, parent) != parent:
                raise ValueError(f"request {i}: block {b} follows {parent}, earlier it followed {parent_of[b]}")
            parent = b


class _Zipf:
    """Draws ranks 0..n-1 with P(k) ~ 1/(k+1)^alpha (inverse CDF over a precomputed table)."""

    def __init__(self, n: int, alpha: float, rng: random.Random):
        self._cdf = list(itertools.accumulate(1.0 / (k + 1) ** alpha for k in range(n)))
        self._rng = rng

    def __call__(self) -> int:
        return bisect.bisect_left(self._cdf, self._rng.random() * self._cdf[-1])


def _chain(next_id: itertools.count, length: int) -> list[int]:
    return [next(next_id) for _ in range(length)]


def zipf_documents(n_docs: int = 4000, n_requests: int = 12000, alpha: float = 0.9,
                   max_len: int = 8, seed: int = 1) -> Trace:
    """Independent documents (chains of 1..``max_len`` blocks) requested with Zipf popularity: the
    classic frequency-skewed workload, with a little prefix structure."""
    rng = random.Random(seed)
    ids = itertools.count()
    docs = [_chain(ids, rng.randint(1, max_len)) for _ in range(n_docs)]
    rng.shuffle(docs)  # popularity must not correlate with id order
    pick = _Zipf(n_docs, alpha, rng)
    return [list(docs[pick()]) for _ in range(n_requests)]


def zipf_with_scans(n_docs: int = 3000, n_requests: int = 8000, alpha: float = 0.9, max_len: int = 6,
                    scan_every: int = 50, scan_len: int = 150, seed: int = 2) -> Trace:
    """Zipf documents interrupted by long one-shot prompts (``scan_len`` fresh blocks every
    ``scan_every`` requests): a policy that lets one-hit blocks flush its hot set loses here."""
    rng = random.Random(seed)
    ids = itertools.count()
    docs = [_chain(ids, rng.randint(1, max_len)) for _ in range(n_docs)]
    pick = _Zipf(n_docs, alpha, rng)
    trace: Trace = []
    for i in range(n_requests):
        trace.append(list(docs[pick()]))
        if i % scan_every == scan_every - 1:
            trace.append(_chain(ids, scan_len))
    return trace


def multi_turn_chats(n_conversations: int = 1000, n_system_prompts: int = 20, system_len: tuple[int, int] = (2, 8),
                     turns: tuple[int, int] = (1, 8), turn_len: tuple[int, int] = (1, 6), active: int = 60,
                     alpha: float = 1.1, seed: int = 3) -> Trace:
    """Chat sessions: each starts from a shared system prompt (Zipf-popular), then every turn resends the
    whole history plus a few new blocks. ``active`` conversations are interleaved, so a chat comes back
    after the others have run (minutes in real time) and its chain must have survived to hit."""
    rng = random.Random(seed)
    ids = itertools.count()
    systems = [_chain(ids, rng.randint(*system_len)) for _ in range(n_system_prompts)]
    pick = _Zipf(n_system_prompts, alpha, rng)
    pending = [(list(systems[pick()]), rng.randint(*turns)) for _ in range(n_conversations)]
    pending.reverse()
    live: list[tuple[list[int], int]] = []
    trace: Trace = []
    while pending or live:
        while pending and len(live) < active:
            live.append(pending.pop())
        k = rng.randrange(len(live))
        history, left = live[k]
        history = history + _chain(ids, rng.randint(*turn_len))
        trace.append(history)
        if left > 1:
            live[k] = (history, left - 1)
        else:
            live[k] = live[-1]
            live.pop()
    return trace


SYNTHETIC = {
    "zipf": zipf_documents,
    "zipf+scan": zipf_with_scans,
    "multi-turn": multi_turn_chats,
}
"""Synthetic generators by trace name, each callable with defaults."""
