"""A chunk on its way to a node agent: what ``put_chunks`` takes from workers, the KV connector and tests.

Data side: it carries the chunk's bytes as a numpy view, which Ray passes through its object store without a
copy (a torch tensor would be pickled), plus the dtype name to view them back as (bf16 travels as int16,
which numpy lacks). Reads go the other way as ``actors.node_agent.ChunkRef`` (a handle, not bytes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from actors.object_store_tier import tensor_to_array
from qwen3vl_ray.keys import CacheKey


def to_wire(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """The form a chunk crosses process boundaries in: a numpy view (zero-copy through Ray) + dtype name."""
    return tensor_to_array(t), str(t.dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class WireChunk:
    """One chunk to store.

    Attributes:
        key: the chunk's cache key.
        data: its values as a numpy array, in the wire dtype (``to_wire``: a view of the tensor, no copy).
        dtype: the torch dtype name the values are (``"bfloat16"``, ``"float16"``, ...).
        parent: the key of the chunk before it in its chain; None for a chain's head. The agent never gives
            up a parent before its children (``NodeAgentLogic._victim_order``).
    """

    key: CacheKey
    data: np.ndarray
    dtype: str
    parent: CacheKey | None = None

    @classmethod
    def of(cls, key: CacheKey, tensor: torch.Tensor, parent: CacheKey | None = None) -> "WireChunk":
        arr, dtype = to_wire(tensor)
        return cls(key, arr, dtype, parent)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def tensor(self) -> torch.Tensor:
        """The chunk as a tensor of ``dtype``, sharing ``data``'s memory (read it, never write it: under Ray it
        is the object store's read-only buffer)."""
        from qwen3vl_ray.codecs.base import dtype_from_name

        with warnings.catch_warnings():  # torch warns about read-only arrays; the tensor is never written
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.asarray(self.data))
        want = dtype_from_name(self.dtype)
        return t.view(want) if t.dtype != want else t
