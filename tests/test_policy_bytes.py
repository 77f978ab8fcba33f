"""Hits per GiB in ``benchmarks.policy``: block counts scaled by codec ratios, and the section end to end."""

from __future__ import annotations

import json

import pytest

from benchmarks.policy import (RAW, CodecFit, belady, bytes_budget, bytes_summary, kv_chunks, main,
                               measure_codec, replay, scaled_capacity)
from benchmarks.traces import zipf_documents
from qwen3vl_ray.policies import DEFAULT_POLICY, make_policy

TINY = zipf_documents(n_docs=200, n_requests=600, max_len=4, seed=11)
HALF = CodecFit("half", 2.0, 0.999, 0.25, 0.02)  # made-up fits: the replay only needs the ratio
QUARTER = CodecFit("quarter", 3.76, 0.997, 3.75, 0.07)


def test_scaled_capacity_is_the_budget_over_the_compressed_block_size():
    assert scaled_capacity(100, 1.0) == 100
    assert scaled_capacity(1000, 1.94) == 1940  # not 1939 through float rounding
    assert scaled_capacity(3000, 3.76) == 11280
    assert scaled_capacity(7, 1.5) == 10  # a partial block does not fit
    for bad in [(-1, 2.0), (10, 0.0), (10, -1.0), (10, float("nan"))]:
        with pytest.raises(ValueError, match="ratio"):
            scaled_capacity(*bad)


def test_bytes_budget_replays_each_codec_at_its_scaled_count():
    rows = bytes_budget("tiny", TINY, [20, 60], [HALF, QUARTER])
    by = {(r["budget_blocks"], r["codec"], r["policy"]): r for r in rows}
    # per budget: raw LRU, default, Belady + two policies per codec
    assert len(rows) == 2 * (3 + 2 + 2)
    for budget in (20, 60):
        assert by[(budget, "none", "belady")]["capacity"] == budget
        assert by[(budget, "half", "lru")]["capacity"] == 2 * budget
        assert by[(budget, "quarter", DEFAULT_POLICY)]["capacity"] == scaled_capacity(budget, 3.76)
        # each row is the plain replay at its own block count
        assert by[(budget, "quarter", "lru")]["hit_ratio"] == round(
            replay(make_policy("lru"), TINY, scaled_capacity(budget, 3.76)), 4)
        assert by[(budget, "none", "belady")]["hit_ratio"] == round(belady(TINY, budget), 4)
        # the same bytes hold more compressed blocks, so LRU can only gain on this trace
        assert by[(budget, "quarter", "lru")]["hit_ratio"] >= by[(budget, "half", "lru")]["hit_ratio"] \
            >= by[(budget, "none", "lru")]["hit_ratio"]
        assert by[(budget, "half", "lru")]["cosine"] == 0.999 and by[(budget, "none", "lru")]["cosine"] == 1.0
    summary = bytes_summary(rows)
    assert summary.startswith("tiny: largest LRU->Belady gap @ ") and "half" in summary and "quarter" in summary


def test_bytes_budget_rejects_the_raw_codec_as_a_fit():
    with pytest.raises(ValueError, match="raw baseline"):
        bytes_budget("tiny", TINY, [20], [RAW])


def test_measure_codec_reports_ratio_and_error_of_a_real_codec():
    chunks = kv_chunks(n=1)
    fit = measure_codec("int8", chunks)
    assert 1.9 <= fit.ratio < 2.0  # 1 byte a value plus group scales and a header
    assert fit.cosine >= 0.999 and 0 < fit.max_abs_error < 1 and 0 < fit.rel_error < 0.05


def test_bytes_only_prints_the_table_and_json(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i, "hash_ids": req}) for i, req in enumerate(TINY)) + "\n")
    main(["--bytes-only", "--trace", str(trace), "--no-synthetic", "--capacities", "20,60",
          "--bytes-codecs", "none,int8", "--json"])
    out = capsys.readouterr().out
    assert "hits per GiB" in out and "int8 blocks" in out and "t: largest LRU->Belady gap @ " in out
    rows = json.loads(out.strip().splitlines()[-1])
    assert {r["codec"] for r in rows} == {"none", "int8"}  # "none" is the raw baseline, not measured twice
    int8 = next(r for r in rows if r["codec"] == "int8" and r["budget_blocks"] == 60)
    assert int8["capacity"] == scaled_capacity(60, int8["ratio"]) and int8["capacity"] > 60
    assert all(r["mode"] == "bytes" for r in rows)
