"""A chunk on its way to a node agent is one typed ``actors.wire.WireChunk``: its bytes travel as a numpy view
(bf16 as int16) and come back as the same tensor, and ``put_chunks`` refuses anything else by name."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from actors.config import AgentConfig
from actors.node_agent import NodeAgentLogic
from actors.wire import WireChunk
from qwen3vl_ray.keys import CacheKey

CHUNK = 4096


def key(i: int) -> CacheKey:
    return CacheKey(i.to_bytes(16, "little"))


def test_a_bf16_chunk_travels_as_an_int16_view_and_comes_back_equal():
    t = (torch.arange(2048, dtype=torch.float32) * 0.001).to(torch.bfloat16).reshape(2, 1024)
    c = WireChunk.of(key(1), t, parent=key(0))
    assert (c.data.dtype, c.dtype, c.nbytes, c.parent) == (np.dtype(np.int16), "bfloat16", CHUNK, key(0))
    back = pickle.loads(pickle.dumps(c))  # as a Ray actor call carries it
    assert back.key == key(1) and torch.equal(back.tensor(), t) and back.tensor().dtype == torch.bfloat16


def test_an_agent_stores_wire_chunks_with_their_parents_and_refuses_bare_tuples(tmp_path):
    a = NodeAgentLogic("a" * 32, AgentConfig(host_bytes=4 * CHUNK, disk_bytes=0, disk_dir=str(tmp_path),
                                             policy="lru"))
    chunks = [torch.full((2, 1024), float(i), dtype=torch.bfloat16) for i in range(2)]
    assert a.put_chunks([WireChunk.of(key(0), chunks[0]), WireChunk.of(key(1), chunks[1], key(0))]) == ["host"] * 2
    assert a.cache.parents([key(1), key(0)]) == [key(0), None]
    assert all(torch.equal(x, y) for x, y in zip(a.get_tensors([key(0), key(1)]), chunks))
    with pytest.raises(TypeError, match="WireChunk"):
        a.put_chunks([(key(2), chunks[0], None)])
