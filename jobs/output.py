"""Durable, resumable Parquet output: finished rows go to part files, then one compaction.

Layout for ``--output out.parquet``::

    out.parquet            the compacted result (present after a finished run)
    out.parquet.parts/     part-000001.parquet, ... one per batch, while a run is in progress
                           .lock (flock: one writer per output)

Why parts: a killed job must lose no finished row and leave no corrupt file. Each part is written to a
temporary name, fsynced, renamed into place and the directory fsynced, so a part either exists whole or
not at all; a temporary left by a kill is deleted on the next start. Compaction writes the merged table
the same way and only then removes the parts, so a kill during compaction leaves the parts (and the old
output, if any) and the next run compacts again. Rows are keyed by ``id``; when an id appears twice (an
error retried with ``--retry-errors``) the newest wins.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("cached_tokens", pa.int32()),
    pa.field("ttft_s", pa.float64()),
    pa.field("tier", pa.string()),
    pa.field("error", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
_PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


class OutputBusyError(RuntimeError):
    """Another process is writing the same output."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(table: pa.Table, dest: Path) -> None:
    """Write ``table`` to ``dest`` atomically: temp file in the same dir, fsync, rename, fsync dir."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(dest.parent)


def to_table(rows: Iterable[dict]) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


class PartWriter:
    """Writes finished rows durably and merges them into the final Parquet file.

    Use as a context manager: it holds an exclusive lock on the output for its lifetime.
    """

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output).resolve()
        if self.output.suffix.lower() != ".parquet":
            raise ValueError(f"output {str(output)!r} must end in .parquet")
        self.parts_dir = self.output.with_name(self.output.name + ".parts")
        self._lock_fd: int | None = None
        self._next = 1

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> "PartWriter":
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.parts_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(f"another job is writing {str(self.output)!r} (lock {self.parts_dir / '.lock'})") from None
        self._lock_fd = fd
        self._clean_temporaries()
        parts = self._parts()
        self._next = (int(_PART_RE.match(parts[-1].name).group(1)) + 1) if parts else 1
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            # Unlocking before the directory is removed by compact() is harmless: flock lives on the inode.
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clean_temporaries(self) -> None:
        for d in (self.parts_dir, self.output.parent):
            prefix = "." if d == self.parts_dir else f".{self.output.name}."
            for p in d.glob(f"{prefix}*.tmp"):
                logger.info("removing %s left by an interrupted run", p)
                p.unlink(missing_ok=True)

    def _parts(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        found = [p for p in self.parts_dir.iterdir() if _PART_RE.match(p.name)]
        return sorted(found, key=lambda p: int(_PART_RE.match(p.name).group(1)))

    # -- reading what is done --------------------------------------------------------------------------
    def _tables(self) -> list[pa.Table]:
        """The final output (oldest) then the parts in order; unreadable files are set aside, not trusted."""
        tables = []
        for p in ([self.output] if self.output.exists() else []) + self._parts():
            try:
                t = pq.read_table(p)
                if t.schema.names[: len(COLUMNS)] != list(COLUMNS):
                    raise ValueError(f"columns {t.schema.names} != {list(COLUMNS)}")
                tables.append(t.select(list(COLUMNS)).cast(SCHEMA))
            except Exception as e:
                # Parts are fsynced before they get their name, so this means outside damage or another
                # program's file. Keep it for inspection, redo its rows.
                bad = p.with_name(p.name + ".unreadable")
                logger.warning("cannot read %s (%s); moving it to %s and redoing its rows", p, e, bad)
                os.replace(p, bad)
        return tables

    def done(self) -> dict[str, bool]:
        """id -> whether its newest row has an error, over the final output and every part."""
        out: dict[str, bool] = {}
        for t in self._tables():
            for rid, err in zip(t.column("id").to_pylist(), t.column("error").to_pylist()):
                out[rid] = err is not None
        return out

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, rows: list[dict]) -> Path | None:
        """Make ``rows`` durable as one part file. Returns its path (None for no rows)."""
        assert self._lock_fd is not None, "use PartWriter as a context manager"
        if not rows:
            return None
        dest = self.parts_dir / f"part-{self._next:06d}.parquet"
        _write_durable(to_table(rows), dest)
        self._next += 1
        return dest

    def compact(self, order: list[str] | None = None) -> int:
        """Merge the final output and all parts into the final output; returns its row count.

        ``order``: ids in input order; the output follows it, rows not in it go last in id order.
        """
        assert self._lock_fd is not None, "use PartWriter as a context manager"
        tables = self._tables()
        merged: dict[str, dict] = {}
        for t in tables:
            for row in t.to_pylist():
                merged[row["id"]] = row  # newest wins
        rank = {rid: i for i, rid in enumerate(order or [])}
        ids = sorted(merged, key=lambda r: (rank.get(r, len(rank)), r))
        _write_durable(to_table(merged[r] for r in ids), self.output)
        # Only after the merged file is durable may the parts go.
        for p in self._parts():
            p.unlink()
        (self.parts_dir / ".lock").unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:  # set-aside .unreadable files stay for inspection
            logger.warning("kept %s: it holds files set aside as unreadable", self.parts_dir)
        return len(ids)
