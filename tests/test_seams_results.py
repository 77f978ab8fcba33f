"""A request's result has one shape (``actors.results.RequestResult``): served, refused by the client or failed
on a worker, every field is there; it crosses processes as itself, is read by attribute only (the dict it
replaced is gone, key access with it), and the service's row is built from its fields."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from actors.results import RequestResult, error_result
from jobs.rows import service_row


def served() -> RequestResult:
    return RequestResult(id="r1", worker="w0", node="n", output="a cat", prompt_tokens=40, completion_tokens=3,
                         cached_tokens=32, cached_tiers={"host": 16, "remote": 16}, vision_cache_hits=1,
                         computed_chunks=0, ttft_s=0.25, token_ids=[5, 6, 7], attempts=1)


def test_an_error_result_has_every_field_of_a_served_one_empty():
    bad = error_result({"id": "r2"}, "ValueError: bad image")
    assert [f.name for f in dataclasses.fields(bad)] == [f.name for f in dataclasses.fields(served())]
    assert (bad.id, bad.error, bad.output, bad.cached_tokens, bad.cached_tiers, bad.attempts) == \
        ("r2", "ValueError: bad image", None, None, {}, None)
    assert error_result("not a dict", "ValueError: x").id is None


def test_it_pickles_as_itself_and_reads_by_attribute_only():
    r = pickle.loads(pickle.dumps(served()))
    assert r == served()
    assert r.output == "a cat" and r.error is None and r.cached_tiers == {"host": 16, "remote": 16}
    with pytest.raises(TypeError):
        r["output"]  # no mapping shim: a caller still reading by key fails loudly
    assert not hasattr(r, "get")


def test_the_service_row_comes_from_its_fields():
    row = service_row("r1", served())
    assert (row["text"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["tier"],
            row["error"]) == ("a cat", 40, 3, 32, "host+remote", None)
    # generated tokens count when the engine gave no completion count
    row = service_row("r1", dataclasses.replace(served(), completion_tokens=None))
    assert row["completion_tokens"] == 3
    assert service_row("r2", error_result({"id": "r2"}, "ValueError: bad image"))["error"] == "ValueError: bad image"

