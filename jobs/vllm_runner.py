"""The ``vllm`` runner: the job's rows through Ray Data LLM (``ray.data.llm``) on vLLM, KV on the node agents.

The job's validated items become one Ray dataset; ``build_processor`` runs it through Ray's stages (this
runner's preprocess decodes the images, Ray's chat-template stage renders the prompt on CPU actors, then
``num_workers`` vLLM engine actors; Ray 2.60's own multimodal stage imports a vLLM module that 0.32 moved, so
it is off) and the results stream
back batch by batch, so the job makes each batch durable as it arrives (``jobs.output.PartWriter``). vLLM's KV
blocks go through the project's KV connector with ``store="ray"`` (``qwen3vl_ray.serving``): every engine of
the cluster, this job's and the next one's, shares the node agents' host and disk tiers.

What Ray Data LLM gives back, and so what a row holds (Ray 2.60, ``vllm_engine_stage.vLLMOutputData``):
- ``text``, ``prompt_tokens``, ``completion_tokens``: vLLM's generated text and token counts.
- ``ttft_s``: vLLM's per-request ``first_token_latency`` (arrival to first token), when vLLM logs stats.
- ``cached_tokens``: null. vLLM's ``RequestOutput.num_cached_tokens`` is dropped by Ray's output record
  (``vLLMOutputData.from_vllm_engine_output`` keeps the text, token ids and ``metrics``, vLLM's
  ``RequestStateStats``, which has no cached count), and Ray Data LLM offers no hook that sees the
  ``RequestOutput``. Reuse shows per run instead: in the node agents' counters (``qwen3vl-ray status``) and in
  vLLM's own counters on Ray's metrics endpoint (``ray_vllm_prompt_tokens_cached_total``,
  ``ray_vllm_external_prefix_cache_hits_total``: the Grafana row "vLLM on the tiers").
- ``error``: ``should_continue_on_error`` turns a failed generation (a prompt longer than the model's context,
  say) into the row's ``__inference_error__`` and the job goes on. It covers the engine stage only: a row that
  would fail Ray's CPU stages (an image vLLM cannot decode, a malformed chat) is caught before, on the driver,
  by ``jobs.dataset``, and never enters the dataset. A failure of the pipeline itself ends the stream with its
  exception: the rows already written stay, and a rerun resumes after them.

The project's own transformers engine stays as the other runners (``--runner service|engine|plain``,
``jobs.runner``): it is the reference the correctness tests compare cached answers against, token for token,
and it runs what this runner does not (chat sessions, the demo).

Limits: the valid rows of the run (images as bytes) sit in the object store for the run's length, since a
Ray dataset is built from all of them at once (one engine start per run, not per batch). The checkpoint path is
resolved on the driver: on a multi-node cluster it must exist at that path on every node that runs an engine.
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from jobs.dataset import Item
from jobs.engine_platform import engine_platform, platform_engine_kwargs
from jobs.rows import error_row
from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ConfigError

logger = logging.getLogger(__name__)

# Ray's chat-template and multimodal stages only render text and parse images; a whole CPU each would leave a
# 2-core machine no room for the engine.
LIGHT_STAGE_CPUS = 0.25
# the KV connector's options that come from the project's settings (``connector_config.CONNECTOR_OPTIONS``)
CONNECTOR_SETTINGS = ("host_bytes", "disk_bytes", "disk_dir", "host_codec", "disk_codec", "block_bytes",
                      "disk_fsync", "high_watermark", "low_watermark", "policy", "tenant", "fingerprint")


@dataclass(frozen=True)
class VllmJobConfig:
    """What the Ray Data LLM processor of a job is built from (``from_settings``: the project's settings).

    Attributes:
        model_path: checkpoint directory (a preset such as ``tiny`` resolved and generated on the driver).
        concurrency: vLLM engine actors (settings ``num_workers``, default 1).
        batch_size: rows per batch sent to an engine and per part written (settings ``batch_size``, default 8).
        max_new_tokens: generated tokens per row (settings ``max_new_tokens``, default 32).
        temperature: sampling temperature, 0 is greedy (settings ``temperature``, default 0.0).
        seed: sampling seed (settings ``seed``, default 0).
        dtype: model dtype (settings ``dtype``; ``auto`` is float32 on CPU, bfloat16 on CUDA).
        on_gpu: engines get a GPU each (the cluster has GPUs); else one CPU each.
        platform: vLLM's platform where the engines run (``jobs.engine_platform``): ``cpu`` gets vLLM's CPU
            settings (eager, 32-token blocks, an explicit KV cache of ``kv_cache_bytes``).
        kv_cache_bytes: vLLM's own KV cache per engine on CPU (settings ``kv_device_budget_bytes``).
        connector: the KV connector's options (``kv_transfer_config``): ``store="ray"`` plus the settings' tiers.
        max_model_len: the engines' context length in tokens (default 4096).
        env: environment variables of the engine actors (the cluster's address).
    """

    model_path: str
    concurrency: int = 1
    batch_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    on_gpu: bool = False
    platform: str = "cpu"
    kv_cache_bytes: int = 1 << 30
    connector: dict = field(default_factory=lambda: {"store": "ray"})
    max_model_len: int = 4096
    env: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"num_workers must be > 0 for a job, got {self.concurrency}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be > 0, got {self.batch_size}")

    @classmethod
    def from_settings(cls, s: S.Settings, model_path: str, on_gpu: bool, platform: str,
                      ray_address: str) -> "VllmJobConfig":
        connector = {"store": "ray", **{name: s[name] for name in CONNECTOR_SETTINGS}}
        # vLLM runs its engine core in a process of its own under the Ray actor; the connector there attaches to
        # this cluster through RAY_ADDRESS (without it, it would start an embedded Ray of its own and share
        # nothing).
        env = {"RAY_ADDRESS": ray_address}
        return cls(model_path=model_path, concurrency=s.num_workers, batch_size=s.batch_size,
                   max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=s.seed,
                   dtype=S.resolved_dtype(s, on_cuda=platform == "cuda"), on_gpu=on_gpu, platform=platform,
                   kv_cache_bytes=s.kv_device_budget_bytes, connector=connector, env=env)

    def sampling_params(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_new_tokens, "seed": self.seed}

    def processor_config(self):
        from ray.data.llm import vLLMEngineProcessorConfig

        from qwen3vl_ray.serving.connector_config import kv_transfer_config

        engine_kwargs: dict[str, Any] = {"dtype": self.dtype, "max_model_len": self.max_model_len, "seed": self.seed,
                                         "kv_transfer_config": kv_transfer_config(**self.connector)}
        engine_kwargs.update(platform_engine_kwargs(self.platform, self.kv_cache_bytes))
        return vLLMEngineProcessorConfig(
            model_source=self.model_path,
            engine_kwargs=engine_kwargs,
            batch_size=self.batch_size,
            concurrency=self.concurrency,
            runtime_env={"env_vars": self.env},
            # without it Ray Data reserves a GPU per engine
            placement_group_config=None if self.on_gpu else {"bundles": [{"CPU": 1}]},
            should_continue_on_error=True,
            # Ray 2.60's multimodal stage imports vllm.entrypoints.chat_utils, which vLLM 0.32 moved: the images
            # go to vLLM as ``multimodal_data`` from this runner's preprocess instead (``engine_inputs``)
            prepare_multimodal_stage=False,
            chat_template_stage={"enabled": True, "num_cpus": LIGHT_STAGE_CPUS},
            # vLLM tokenizes the prompt text and detokenizes the answer itself: two fewer actor pools
            tokenize_stage=False,
            detokenize_stage=False,
        )


def source_row(item: Item) -> dict:
    """An item as a row of the job's Ray dataset: the chat with each image as a bare ``{"type": "image"}`` part
    (the chat template renders its vision placeholder there, as vLLM's ``LLM.chat`` does for Qwen3-VL's
    template) and the images' file bytes, in order, beside it."""
    messages, images = [], []
    for m in item.messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                images.append(p["image"])
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p["text"]})
        messages.append({"role": m["role"], "content": parts})
    return {"id": item.id, "messages": messages, "images": images}


def engine_inputs(row: dict, sampling: dict) -> dict:
    """The preprocess of one dataset row (on a Ray worker): the images decoded as vLLM's chat decodes them (RGB
    PIL images, so vLLM hashes the same pixels), the sampling parameters, and the chat with the bare image
    parts only (Ray Data fills the fields a struct lacks with nulls, and Qwen3-VL's template reads any part
    with an ``image`` key as an image).

    A message without images becomes one string (its text parts joined, as Qwen3-VL's template joins them): a
    batch without images reaches Ray's chat-template stage as Arrow-backed numpy, where a list of parts is an
    ``ndarray`` the template renders as the literal text ``<ndarray>``; a string stays a string. (A batch with
    an image holds PIL images, which Arrow cannot take, and reaches the stage as Python lists.)"""
    from PIL import Image

    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in row["images"]]
    messages = [{"role": m["role"], "content": _content(m["content"])} for m in row["messages"]]
    return {"messages": messages, "multimodal_data": {"image": images} if images else None,
            "sampling_params": sampling}


def _content(parts) -> str | list[dict]:
    if all(p["type"] != "image" for p in parts):
        return "".join(p["text"] for p in parts)
    return [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]} for p in parts]


def result_row(row: dict) -> dict:
    """One row of the processor's output (``_output_columns``) -> the job's output row."""
    rid = str(row["id"])
    error = row.get("__inference_error__") or ""
    if error:
        return error_row(rid, error)
    ttft = row.get("first_token_latency")
    return {"id": rid, "text": row.get("generated_text"), "prompt_tokens": int(row["num_input_tokens"]),
            "completion_tokens": int(row["num_generated_tokens"]),
            "cached_tokens": None,  # not in Ray Data LLM's output (see the module docstring)
            "ttft_s": float(ttft) if ttft else None, "tier": None, "error": None}


def _output_columns(row: dict) -> dict:
    """Only what ``result_row`` reads travels back to the driver (not the images, prompts or token ids). Runs on
    every row: failed ones bypass the processor's postprocess and carry ``__inference_error__`` instead."""
    metrics = row.get("metrics") or {}
    return {"id": row["id"], "generated_text": row.get("generated_text"),
            "num_input_tokens": row.get("num_input_tokens"), "num_generated_tokens": row.get("num_generated_tokens"),
            "first_token_latency": metrics.get("first_token_latency") if isinstance(metrics, dict) else None,
            "__inference_error__": row.get("__inference_error__") or ""}


class VllmRunner:
    """Rows -> Ray Data LLM's vLLM processor, results streamed back in batches (``stream``)."""

    name = "vllm"

    def __init__(self, settings: S.Settings):
        if settings.num_workers < 1:  # as the service runner says it: a job needs an engine to run on
            raise ConfigError(f"num_workers must be > 0 for a job, got {settings.num_workers}")
        model_path = S.resolve_checkpoint(settings)  # a bad --model is one line, before Ray starts
        import ray

        from jobs.service_runner import _init_ray

        _init_ray(settings, settings.address)
        on_gpu = ray.cluster_resources().get("GPU", 0) > 0
        platform = engine_platform(on_gpu, settings.worker_start_timeout_s)
        self.settings = settings
        self.config = VllmJobConfig.from_settings(settings, model_path, on_gpu, platform,
                                                  ray.get_runtime_context().gcs_address)

    def stream(self, items: list[Item]) -> Iterator[list[dict]]:
        """Output rows of ``items`` (valid ones), in batches as the engines finish them, in no set order."""
        import ray
        from ray.data.llm import build_processor

        sampling = self.config.sampling_params()
        processor = build_processor(
            self.config.processor_config(),
            preprocess=functools.partial(engine_inputs, sampling=sampling),
            preprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS},
            postprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS})
        ds = ray.data.from_items([source_row(it) for it in items])
        out = processor(ds).map(_output_columns, num_cpus=LIGHT_STAGE_CPUS)
        batch: list[dict] = []
        for row in out.iter_rows():
            batch.append(result_row(row))
            if len(batch) >= self.config.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def run(self, items: list[Item], session: str | None = None) -> list[dict]:
        """The ``Runner`` call: one pipeline (and engine start) per call, so the job uses ``stream`` instead."""
        if session is not None:
            raise ConfigError("the vllm runner runs independent rows; chat sessions need --runner service")
        by_id = {r["id"]: r for rows in self.stream(items) for r in rows}
        return [by_id[it.id] for it in items]

    def end_session(self, session: str) -> None:
        return None  # no sessions (see run)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        # Ray Data stops its engine actors when the dataset is consumed; the agents stay for the next job.
        return None
