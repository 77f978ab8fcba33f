"""Runners: the seam between the batch job and whatever generates. Rows in, output rows out.

A runner takes validated ``Item``s (``jobs.dataset``) and returns one output row per item, in order, with
the columns of ``jobs.output.SCHEMA``. A per-request failure is that row's ``error``; an exception from
``run`` means the runner itself is broken (the job retries rows one by one, then gives up).

- ``vllm`` (``jobs.vllm_runner``): Ray Data LLM's vLLM processor with the project's KV connector on the node
  agents. The batch job's default. It streams (``StreamingRunner``): one pipeline for the whole run, its rows
  coming back batch by batch.
- ``service``: the Ray service (coordinator + node agents + Qwen3-VL workers) through
  ``actors.service.ensure_service``: attaches to ``--address`` / ``RAY_ADDRESS`` (inside ``ray job submit``)
  or starts an embedded Ray.
- ``engine``: one in-process ``qwen3vl_ray.Qwen3VLEngine`` (tiered store, no Ray).
- ``plain``: transformers ``generate`` with no store: the reference a cached run is compared against.

The project's own transformers engine (``service``, ``engine``, ``plain``) stays beside vLLM: it is the
reference the correctness tests compare cached runs against (its tiers, sessions and vision cache are checked
token for token against ``plain``), and what the demo and the multi-turn chats run on.
"""

from __future__ import annotations

import io
import itertools
import logging
import time
from typing import Any, Iterator, Protocol

from jobs.dataset import Item
from jobs.rows import engine_row, error_row
from qwen3vl_ray.settings import Settings

logger = logging.getLogger(__name__)

RUNNERS = ("service", "engine", "plain")
"""Runners that take rows batch by batch and chat sessions (the demo's)."""
JOB_RUNNERS = ("vllm", *RUNNERS)
"""The batch job's runners, its default first."""


class Runner(Protocol):
    name: str

    def run(self, items: list[Item], session: str | None = None) -> list[dict]: ...

    def end_session(self, session: str) -> None:
        """The chat ``session`` is over: release what it holds beyond its cached prefix."""

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class StreamingRunner(Runner, Protocol):
    """A runner that takes the whole run at once and yields output rows in batches as they finish (any order):
    for runners whose start is costly per call (an engine start per pipeline)."""

    def stream(self, items: list[Item]) -> Iterator[list[dict]]: ...


def make_runner(settings: Settings, kind: str = "service") -> Runner:
    if kind == "vllm":
        from jobs.vllm_runner import VllmRunner

        return VllmRunner(settings)
    if kind == "service":
        from jobs.service_runner import ServiceRunner

        return ServiceRunner(settings)
    if kind == "engine":
        return EngineRunner(settings)
    if kind == "plain":
        return PlainRunner(settings)
    raise ValueError(f"unknown runner {kind!r}; allowed: {', '.join(JOB_RUNNERS)}")


def build_requests(items: list[Item], settings: Settings, session: str | None = None) -> list:
    from qwen3vl_ray.engine.requests import Request, SamplingParams

    sampling = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              seed=settings.seed)
    return [Request(messages=it.messages, sampling=sampling, session_id=session, request_id=it.id) for it in items]


class EngineRunner:
    """One in-process engine with its tiered store (no Ray)."""

    name = "engine"

    def __init__(self, settings: Settings):
        from qwen3vl_ray import settings as S
        from qwen3vl_ray.engine import Qwen3VLEngine

        # idle expiry runs in the node agents, on the coordinator's pass: one process with no agent never ticks it
        S.refuse_unhonoured(settings, ["idle_ttl_s"], "the in-process engine (no node agents)",
                            "unset it or run on the Ray service (--runner service)")
        self.settings = settings
        self.engine = Qwen3VLEngine(S.resolve_checkpoint(settings), S.engine_config(settings))

    def run(self, items: list[Item], session: str | None = None) -> list[dict]:
        results = self.engine.generate(build_requests(items, self.settings, session))
        return [engine_row(it.id, r) for it, r in zip(items, results)]

    def end_session(self, session: str) -> None:
        self.engine.close_session(session)

    def stats(self) -> dict:
        out = self.engine.stats()
        ratios = codec_ratios(self.engine.store)
        for t in out.get("store", {}).get("tiers", []):
            if t.get("name") in ratios:
                t["compression_ratio"] = ratios[t["name"]]
        return out

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close:
            close()


def codec_ratios(store: Any, sample: int = 8) -> dict[str, float]:
    """Per tier: raw bytes / encoded bytes of its codec, measured on up to ``sample`` of its stored entries.

    The tiers' own byte counts are in whole pool blocks (or files with headers), so they show occupancy,
    not what the codec saves; this re-encodes real entries with the tier's codec to measure that.
    """
    from qwen3vl_ray.codecs import make_codec

    out = {}
    for tier in getattr(store, "tiers", []):
        spec = tier.stats().get("codec", "none")
        raw = enc = 0
        codec = make_codec(spec)
        for key in list(itertools.islice(tier.keys(), sample)):
            t = tier.get(key)
            if t is None:
                continue
            raw += t.numel() * t.element_size()
            enc += len(codec.encode(t))
        if enc:
            out[tier.name] = raw / enc
    return out


class PlainRunner:
    """transformers ``generate`` on the same checkpoint, no store: the uncached reference.

    One request at a time (no padding effects on greedy output); TTFT is the time to the first logits
    processor call, i.e. prefill plus the first decode step's sampling.
    """

    name = "plain"

    def __init__(self, settings: Settings):
        from qwen3vl_ray import settings as S
        from qwen3vl_ray.engine.loading import load_model_and_processor

        self.settings = settings
        self.device = S.resolved_device(settings)
        self.model, self.processor = load_model_and_processor(
            S.resolve_checkpoint(settings), dtype=S.resolved_dtype(settings), device=self.device,
            attn_implementation=settings.attn_implementation)

    def _inputs(self, messages: list[dict]):
        from PIL import Image

        msgs = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = [dict(p, image=Image.open(io.BytesIO(p["image"])).convert("RGB"))
                           if p["type"] == "image" and isinstance(p.get("image"), bytes) else p for p in content]
            msgs.append({"role": m["role"], "content": content})
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt").to(self.device)

    def run(self, items: list[Item], session: str | None = None) -> list[dict]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        rows = []
        for it in items:
            try:
                inputs = self._inputs(it.messages)
            except Exception as e:  # the processor's message for a bad chat/image is the useful part
                rows.append(error_row(it.id, f"preprocessing failed: {type(e).__name__}: {e}"))
                continue
            first: list[float] = []

            class _FirstToken(LogitsProcessor):
                def __call__(self, input_ids, scores):
                    if not first:
                        first.append(time.perf_counter())
                    return scores

            n_prompt = int(inputs["input_ids"].shape[1])
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False,
                                          logits_processor=LogitsProcessorList([_FirstToken()]))
            new = out[0, n_prompt:].tolist()
            rows.append({"id": it.id, "text": self.processor.decode(new, skip_special_tokens=True),
                         "prompt_tokens": n_prompt, "completion_tokens": len(new), "cached_tokens": 0,
                         "ttft_s": (first[0] if first else time.perf_counter()) - t0, "tier": None, "error": None})
        return rows

    def end_session(self, session: str) -> None:
        # Plain transformers recomputes every turn from scratch: a session holds nothing here.
        return None

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        self.model = None
