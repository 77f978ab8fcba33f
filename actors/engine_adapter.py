"""The real Qwen3-VL engine behind the worker's engine protocol (see ``actors.worker.WorkerLogic``).

The engine keeps its own device tier (its ``store``); the adapter makes the Ray layer's prefix reuse work
with it: before a request, the chunks the worker fetched from the agents (local or another node's) are put
into the engine's store under the engine's own keys, so its prefix loader finds them; after it, the new prompt
chunks the engine stored are handed back for the worker to ship to its agent in one batched call.

Configure with ``WorkerConfig(engine="actors.engine_adapter:Qwen3VLEngineAdapter", engine_args={"checkpoint_path":
..., "chunk_tokens": 256, ...}, device_bytes=0)`` (the engine's store is the device tier, so the worker needs
none of its own). Requests are the engine's: ``{"messages": [...], "sampling": {...}}``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from qwen3vl_ray.keys import CacheKey

logger = logging.getLogger(__name__)


class Qwen3VLEngineAdapter:
    def __init__(self, checkpoint_path: str, device_tier_bytes: int = 256 << 20, **engine_config: Any) -> None:
        from qwen3vl_ray.engine.config import EngineConfig
        from qwen3vl_ray.engine.engine import Qwen3VLEngine
        from qwen3vl_ray.tiers.config import TierConfig

        # Host and disk belong to the node agent; the engine's own store is the device tier only.
        engine_config.setdefault("tiers", [TierConfig("device", device_tier_bytes)])
        self.engine = Qwen3VLEngine(checkpoint_path, EngineConfig(**engine_config))
        self.namespace = self.engine.kv_namespace
        self.chunk_tokens = self.engine.config.chunk_tokens

    def _request(self, request: dict) -> Any:
        from qwen3vl_ray.engine.requests import Request, SamplingParams

        sampling = request.get("sampling") or {}
        return Request(messages=request["messages"], sampling=SamplingParams(**sampling),
                       request_id=request.get("id"), session_id=request.get("session_id"))

    def request_keys(self, request: dict) -> list[CacheKey]:
        """The engine's chunk keys for the request's prompt (template, tokens, image hashes folded in)."""
        from qwen3vl_ray.engine.prompt import build_prompt

        e = self.engine
        prompt = build_prompt(e.processor, request["messages"], e.config.max_pixels, e.image_token_id, e.image_memo)
        return e.prefix.keys(prompt.input_ids, [im.span for im in prompt.images])

    def run(self, request: dict, keys: Sequence[CacheKey], cached: Sequence[torch.Tensor]) -> dict:
        store = self.engine.store
        for i, t in enumerate(cached):  # fetched from the agents: make them visible to the prefix loader
            if not store.contains(keys[i]):
                store.put(keys[i], t, keys[i - 1] if i else None)
        [result] = self.engine.generate([self._request(request)])
        if result.error:
            raise RuntimeError(f"engine failed request {result.request_id}: {result.error}")
        new = []
        for k in keys[len(cached):]:
            t = store.get(k, promote=False)
            if t is None:  # the engine stores chunks in order; the first gap ends what it produced
                break
            new.append(t)
        m = result.metrics
        return {"new_chunks": new, "output": result.text, "token_ids": result.token_ids,
                "prompt_tokens": m.prompt_tokens, "ttft_s": m.ttft_s, "engine_cached_tokens": m.cached_tokens}
