"""A request's prefix-KV chunk keys without the model weights (for routing by longest cached prefix).

``RequestKeyer`` loads only what the keys depend on: the checkpoint's processor (tokenizer, chat template,
image processor), its ``config.json`` (KV geometry, image token id) and the model fingerprint. It then
computes the keys through the engine's own public pieces: ``prompt.build_prompt`` (template, tokens,
preprocessed-pixel hashes), ``prefix_kv.KVGeometry`` (layout), ``checkpoint.model_fingerprint`` and
``prefix_kv.PrefixKV.keys`` (chunk chaining with images folded in). A router (the Ray coordinator's client)
can then send a request to the node holding its longest prefix before any worker touches it.

Keys equal ``Qwen3VLEngine.prefix.keys`` for the same checkpoint and ``EngineConfig`` (tests check it); a
keyer built for another config (other chunk size, dtype, tiers' codecs, tenant) produces other keys, which is
a routing miss, never wrong data.

No Ray import here (core library).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from qwen3vl_ray.engine.checkpoint import model_fingerprint
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.loading import check_checkpoint, load_processor
from qwen3vl_ray.engine.prefix_kv import KVGeometry, PrefixKV
from qwen3vl_ray.engine.prompt import ImageMemo, build_prompt
from qwen3vl_ray.keys import CacheKey, Namespace

logger = logging.getLogger(__name__)


def kv_namespace(fingerprint: str, geometry: KVGeometry, config: EngineConfig) -> Namespace:
    """The namespace of the engine's prefix-KV keys: the one definition, used by ``Qwen3VLEngine`` and by the
    weight-free ``RequestKeyer`` (so routing keys and stored keys cannot drift apart)."""
    codecs = "|".join(f"{t.kind}={t.codec}" for t in config.tiers)
    return Namespace(model=fingerprint, dtype=config.dtype, layout=geometry.layout(config.chunk_tokens),
                     codec=codecs, tenant=config.tenant)


class RequestKeyer:
    """Chunk keys of requests for one checkpoint and engine configuration, without loading weights.

    Args:
        checkpoint_path: a local Qwen3-VL checkpoint directory (as given to ``Qwen3VLEngine``).
        config: the ``EngineConfig`` the serving engines use (default ``EngineConfig()``): chunk size,
            dtype, tiers' codecs and tenant are part of the keys.
        processor: an already loaded processor of the same checkpoint (skips loading one).
        memo: an ``ImageMemo`` to share (e.g. the engine's), so an image is preprocessed once.
        fingerprint: the model fingerprint, when the caller already has it (a router gets it from a worker,
            so it never hashes the weights itself); else computed as ``config.fingerprint`` says.
    """

    def __init__(self, checkpoint_path: str | os.PathLike, config: EngineConfig | None = None,
                 processor: Any | None = None, memo: ImageMemo | None = None, fingerprint: str | None = None) -> None:
        from transformers import AutoConfig

        self.config = config or EngineConfig()
        self.path, _ = check_checkpoint(checkpoint_path)  # names a missing path / wrong architecture
        mcfg = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.image_token_id = int(mcfg.image_token_id)
        self.geometry = KVGeometry.from_text_config(mcfg.text_config, self.config.torch_dtype)
        self.fingerprint = fingerprint or model_fingerprint(str(self.path), full=self.config.fingerprint == "full")
        self.namespace = kv_namespace(self.fingerprint, self.geometry, self.config)
        self.processor = processor if processor is not None else load_processor(self.path)
        self.memo = memo if memo is not None else ImageMemo(64 << 20)
        # The engine's key function itself; only its namespace and chunk size are used by ``keys``.
        self._prefix = PrefixKV(None, self.namespace, self.config.chunk_tokens, mcfg.text_config,
                                torch.device("cpu"), self.geometry)

    @property
    def chunk_tokens(self) -> int:
        return self.config.chunk_tokens

    def prompt_keys(self, messages: list[dict[str, Any]]) -> tuple[list[CacheKey], int]:
        """(keys of the prompt's full chunks, prompt length in tokens). Raises the engine's RequestError /
        ImageError for a bad request, naming what is wrong."""
        prompt = build_prompt(self.processor, messages, self.config.max_pixels, self.image_token_id, self.memo)
        return self._prefix.keys(prompt.input_ids, [im.span for im in prompt.images]), len(prompt)

    def keys(self, messages: list[dict[str, Any]]) -> list[CacheKey]:
        """Keys of the full chunks of the prompt the engine builds from ``messages``."""
        return self.prompt_keys(messages)[0]

    def keys_many(self, requests: Sequence[list[dict[str, Any]]]) -> list[list[CacheKey]]:
        return [self.keys(m) for m in requests]

    def __repr__(self) -> str:
        return f"RequestKeyer({str(self.path)!r}, chunk_tokens={self.chunk_tokens}, namespace={self.namespace})"


def checkpoint_path_for(model: str, checkpoint_dir: str | os.PathLike) -> Path:
    """The checkpoint directory for ``model``: an existing directory as is, else a preset name generated on
    first use into ``<checkpoint_dir>/<preset>`` (atomic and idempotent, so concurrent callers agree).
    Same rule as the users' settings (``qwen3vl_ray.settings.resolve_checkpoint``)."""
    from qwen3vl_ray.engine.presets import PRESETS
    from qwen3vl_ray.errors import ConfigError

    if os.path.isdir(model):
        return Path(model).resolve()
    if model in PRESETS and os.path.sep not in model:
        from qwen3vl_ray.engine.checkpoint import make_checkpoint

        return Path(make_checkpoint(model, Path(os.path.expanduser(str(checkpoint_dir))) / model))
    raise ConfigError(f"model {model!r} is neither a checkpoint directory nor a preset ({', '.join(sorted(PRESETS))})")
