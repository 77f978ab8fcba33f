"""A deterministic KV workload for exercising the service without model weights.

Not a model: each chunk's "KV" is a seeded random tensor derived from the chunk's chained key (so it depends
on the whole prefix, like real KV), with the shape and dtype of a small Qwen3-VL layer stack. The request's
output is a digest of every chunk's bytes, cached or computed, so any stale, mixed-up or corrupt chunk served
from the cache changes the output and tests catch it by comparing against a cache-free run. Workers use the
real engine (``qwen3vl_ray.engine:Qwen3VLEngine``) through the same interface when configured.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

import torch

from actors.engine_protocol import EngineRun
from qwen3vl_ray.codecs.base import dtype_from_name
from qwen3vl_ray.keys import CacheKey, Namespace, chunk_keys


class SyntheticKVEngine:
    """A ``actors.engine_protocol.WorkerEngine``: ``namespace``, ``chunk_tokens``, ``request_keys(request)``
    and ``run(request, keys, cached)``; requests are ``{"token_ids": [...]}``."""

    def __init__(self, layers: int = 2, kv_heads: int = 2, head_dim: int = 32, chunk_tokens: int = 64,
                 dtype: str = "bfloat16", compute_s_per_chunk: float = 0.0) -> None:
        if compute_s_per_chunk < 0:
            raise ValueError(f"compute_s_per_chunk must be >= 0, got {compute_s_per_chunk}")
        # Simulated prefill time per computed chunk, so fault tests can catch a request in flight.
        self.compute_s_per_chunk = compute_s_per_chunk
        self.layers, self.kv_heads, self.head_dim, self.chunk_tokens = layers, kv_heads, head_dim, chunk_tokens
        self.dtype = dtype_from_name(dtype)
        self.namespace = self.namespace_for(layers, kv_heads, head_dim, chunk_tokens, dtype)

    @staticmethod
    def namespace_for(layers: int = 2, kv_heads: int = 2, head_dim: int = 32, chunk_tokens: int = 64,
                      dtype: str = "bfloat16", **_: object) -> Namespace:
        return Namespace(model="synthetic-kv", dtype=dtype, layout=f"kv:L{layers}xH{kv_heads}xD{head_dim}:chunk{chunk_tokens}")

    @property
    def chunk_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.chunk_tokens * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def chunk_kv(self, key: CacheKey) -> torch.Tensor:
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
        shape = (2, self.layers, self.kv_heads, self.chunk_tokens, self.head_dim)
        return torch.randn(shape, generator=g).to(self.dtype)

    @classmethod
    def route_keys(cls, request: dict, **engine_args) -> list[CacheKey]:
        """The request's chunk keys computed client-side (for prefix-aware routing) from the engine args."""
        ns = cls.namespace_for(**engine_args)
        return chunk_keys(ns, request["token_ids"], engine_args.get("chunk_tokens", 64))

    @classmethod
    def kv_bytes(cls, request: dict, layers: int = 2, kv_heads: int = 2, head_dim: int = 32, chunk_tokens: int = 64,
                 dtype: str = "bfloat16", **_: object) -> int:
        """KV bytes the request's prompt occupies (its chunks, the last one partial): its admission size."""
        per_token = 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype_from_name(dtype)).element_size()
        return len(request["token_ids"]) * per_token

    def request_keys(self, request: dict) -> list[CacheKey]:
        tokens = request.get("token_ids")
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError(f"a synthetic request needs a non-empty 'token_ids' list, got {str(request)[:200]}")
        return chunk_keys(self.namespace, tokens, self.chunk_tokens)

    def run(self, request: dict, keys: Sequence[CacheKey], cached: Sequence[torch.Tensor]) -> EngineRun:
        if request.get("crash_worker"):
            # Fault injection for tests: a request that kills the worker process serving it, wherever it
            # runs (a poison request: an input that crashes the model, or a GPU fault).
            os._exit(17)
        out = self.prefill(request["token_ids"], keys, cached)
        return EngineRun(new_chunks=out["new_chunks"], output=out["output"], prompt_tokens=len(request["token_ids"]))

    def prefill(self, token_ids: Sequence[int], keys: Sequence[CacheKey], cached: Sequence[torch.Tensor]) -> dict:
        """``new_chunks`` (the computed chunks' tensors) and ``output`` (the digest of every chunk's bytes,
        cached and computed); tests call it for the cache-free reference output."""
        if len(cached) > len(keys):
            raise ValueError(f"{len(cached)} cached chunks for a {len(keys)}-chunk prompt")
        new = []
        for k in keys[len(cached):]:
            new.append(self.chunk_kv(k))
            if self.compute_s_per_chunk:
                time.sleep(self.compute_s_per_chunk)
        h = hashlib.blake2b(digest_size=16)
        for t in list(cached) + new:
            h.update(t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes())
        return {"new_chunks": new, "output": h.hexdigest()}
