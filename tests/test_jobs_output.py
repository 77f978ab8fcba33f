"""jobs.output.PartWriter: durable parts, resume, compaction, and a SIGKILL mid-write leaves no corruption."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from jobs.output import SCHEMA, OutputBusyError, PartWriter


def _row(i, error=None):
    return {"id": str(i), "text": f"t{i}", "prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 5,
            "ttft_s": 0.1, "tier": "host", "error": error}


def test_parts_then_compaction_in_input_order(tmp_path):
    out = tmp_path / "out.parquet"
    with PartWriter(out) as w:
        w.write([_row(2), _row(0)])
        w.write([_row(1, error="boom")])
        assert w.done() == {"2": False, "0": False, "1": True}
        assert not out.exists()  # nothing final until compaction
        assert w.compact(order=["0", "1", "2"]) == 3
    t = pq.read_table(out)
    assert t.schema.equals(SCHEMA)
    assert t.column("id").to_pylist() == ["0", "1", "2"]
    assert t.column("error").to_pylist() == [None, "boom", None]
    assert not (tmp_path / "out.parquet.parts").exists()


def test_rerun_merges_new_rows_and_newest_wins(tmp_path):
    out = tmp_path / "out.parquet"
    with PartWriter(out) as w:
        w.write([_row(0), _row(1, error="transient")])
        w.compact()
    with PartWriter(out) as w:
        assert w.done() == {"0": False, "1": True}
        w.write([_row(1), _row(2)])  # retried row 1, new row 2
        w.compact(order=["0", "1", "2"])
    t = pq.read_table(out)
    assert t.column("id").to_pylist() == ["0", "1", "2"]
    assert t.column("error").to_pylist() == [None, None, None]


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "out.parquet"
    with PartWriter(out):
        with pytest.raises(OutputBusyError):
            PartWriter(out).__enter__()


def test_unreadable_part_is_set_aside_and_its_rows_redone(tmp_path):
    out = tmp_path / "out.parquet"
    with PartWriter(out) as w:
        w.write([_row(0)])
        p = w.write([_row(1)])
    p.write_bytes(p.read_bytes()[:20])  # outside damage
    with PartWriter(out) as w:
        assert w.done() == {"0": False}
    assert (tmp_path / "out.parquet.parts" / (p.name + ".unreadable")).exists()


_WRITER = """
import sys
from jobs.output import PartWriter
with PartWriter(sys.argv[1]) as w:
    i = 0
    while True:
        w.write([{"id": str(i * 50 + k), "text": "x" * 2000, "error": None} for k in range(50)])
        print(i, flush=True)
        i += 1
"""


def test_sigkill_mid_write_loses_no_finished_part(tmp_path):
    out = tmp_path / "out.parquet"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.dirname(__file__)))
        # wait until a few parts are durable, then kill at an arbitrary point of the next write
        finished = -1
        while finished < 2 + attempt:
            finished = int(proc.stdout.readline())
        time.sleep(0.003 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with PartWriter(out) as w:
            done = w.done()
            # every part the child reported finished is there, whole; nothing unreadable
            assert set(str(i) for i in range(50 * (finished + 1))) <= set(done)
            assert len(done) % 50 == 0
            assert not list((tmp_path / "out.parquet.parts").glob("*.unreadable"))
            assert not list((tmp_path / "out.parquet.parts").glob(".*.tmp"))
        out.unlink(missing_ok=True)
        import shutil
        shutil.rmtree(tmp_path / "out.parquet.parts")
