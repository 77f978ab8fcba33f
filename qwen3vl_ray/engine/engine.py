"""Qwen3-VL generation on the tiered store: prefix KV reuse, vision-feature cache and chat sessions.

Per request: build the prompt (template, tokens, preprocessed pixels, image hashes); load the longest
cached prefix (a session's stored turn, else shared prompt chunks) from whichever tier holds it; prefill
only the rest; store new full chunks; decode.

Correctness of the partial prefill (see shared/NOTES.md): cached keys already carry their rotary
embedding, so the suffix's 3-D MRoPE positions are computed for the *whole* prompt by ``get_rope_index``
and sliced, and ``rope_deltas`` from the whole prompt drive decode positions. The suffix's embeddings get
the matching slice of each image's features (even when the cut falls inside an image), and the DeepStack
features of the suffix's image tokens are passed with the suffix's visual mask.

Attention runs through transformers' fused kernels (SDPA by default, flash-attention where installed):
the attention-score matrix is never materialised, so unlike the original design sketch nothing
"compresses attention scores" — there are none to compress; memory is saved on KV instead.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.engine.budget import DeviceBudget
from qwen3vl_ray.engine.checkpoint import model_fingerprint
from qwen3vl_ray.engine.config import EngineConfig
from qwen3vl_ray.engine.loading import check_checkpoint, load_model_and_processor
from qwen3vl_ray.engine.prefix_kv import KVGeometry, PrefixKV, chunk_fitted_tiers, is_kv_chunk_shape
from qwen3vl_ray.engine.prompt import ImageMemo, Prompt, build_prompt
from qwen3vl_ray.engine.request_keys import kv_namespace
from qwen3vl_ray.engine.requests import Metrics, Request, RequestError, Result, SamplingParams
from qwen3vl_ray.engine.sampling import Sampler
from qwen3vl_ray.engine.sessions import Sessions
from qwen3vl_ray.engine.vision_cache import ImageFeatures, VisionCache
from qwen3vl_ray.errors import CapacityError, CodecError
from qwen3vl_ray.keys import Namespace

logger = logging.getLogger(__name__)

class Qwen3VLEngine:
    """Generates for Qwen3-VL chats, reusing KV and vision features from a TieredCache.

    ``store`` injects a ready cache (e.g. one with the Ray object-store host tier); otherwise one is built
    from ``config.tiers`` under a namespace carrying this checkpoint's fingerprint. Requests run one at a
    time; a failing request gets ``Result.error`` and the others still run.
    """

    def __init__(self, checkpoint_path: str | Path, config: EngineConfig | None = None, store: Any | None = None):
        self.config = config or EngineConfig()
        # a missing path or another architecture fails here, naming what was found
        self.path, _ = check_checkpoint(checkpoint_path)
        self.device = self.config.resolved_device()
        self.model, self.processor = load_model_and_processor(
            self.path, dtype=self.config.torch_dtype, device=self.device, attn_implementation=self.config.attn_implementation
        )
        self.model.eval()
        mcfg = self.model.config
        self.text_config = mcfg.text_config
        self.image_token_id = int(mcfg.image_token_id)
        self.n_deepstack = len(mcfg.vision_config.deepstack_visual_indexes)
        self.geometry = KVGeometry.from_text_config(self.text_config, self.config.torch_dtype)
        self.fingerprint = model_fingerprint(str(self.path), full=self.config.fingerprint == "full")
        codecs = "|".join(f"{t.kind}={t.codec}" for t in self.config.tiers)
        ns = dict(model=self.fingerprint, dtype=self.config.dtype, codec=codecs, tenant=self.config.tenant)
        self.kv_namespace = kv_namespace(self.fingerprint, self.geometry, self.config)  # the one definition
        self.vision_namespace = Namespace(layout=f"vision:deepstack{self.n_deepstack}", **ns)
        self._owns_store = store is None
        self.store = store if store is not None else TieredCache(CacheConfig(
            tiers=chunk_fitted_tiers(self.config.tiers, self.geometry.bytes_per_token * self.config.chunk_tokens),
            policy=self.config.policy, namespace=Namespace(layout="qwen3vl-engine", **ns)))
        self.image_memo = ImageMemo()
        self.prefix = PrefixKV(self.store, self.kv_namespace, self.config.chunk_tokens, self.text_config, self.device,
                              self.geometry)
        self.vision = VisionCache(self.store, self.vision_namespace)
        self.sessions = Sessions(self.store, self.prefix, self.config.session_idle_s)
        # KV chunks go to a tier below when the device pushes them out; vision features are recomputed instead
        self.budget = DeviceBudget(self.store, self.config.kv_device_budget_bytes, self.sessions.idle_keys,
                                   hand_down=is_kv_chunk_shape)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.eos_ids = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        logger.info("engine ready: %s on %s, %d KV bytes/token, chunk %d", self.path, self.device,
                    self.geometry.bytes_per_token, self.config.chunk_tokens)

    # -- public --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request | dict], sampling: SamplingParams | None = None) -> list[Result]:
        """Run each request; ``sampling`` is the default for requests given as plain dicts."""
        results = []
        for i, req in enumerate(requests):
            rid = str(i)
            try:
                req = self._as_request(req, sampling)
                rid = req.request_id or rid
                with self.sessions.running(req.session_id):
                    results.append(self._run(req, rid))
            except (ValueError, OSError) as exc:
                # Caller mistakes and "can never fit" (ValueError subclasses) fail only their own request.
                logger.info("request %s failed: %s", rid, exc)
                results.append(Result(rid, error=f"{type(exc).__name__}: {exc}"))
            except Exception as exc:  # noqa: BLE001 - isolation: one request's bug must not fail the batch
                logger.error("request %s failed unexpectedly", rid, exc_info=True)
                results.append(Result(rid, error=f"{type(exc).__name__}: {exc}"))
        return results

    def session_resumable(self, session_id: str) -> bool:
        """True if the session's whole KV is still in some tier (its next turn recomputes nothing old)."""
        return self.sessions.resumable(session_id)

    def close_session(self, session_id: str) -> None:
        self.sessions.close(session_id)

    def stats(self) -> dict[str, Any]:
        return {"store": self.store.stats(), "demoted_for_room": self.budget.demoted}

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "Qwen3VLEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- one request ---------------------------------------------------------------------------
    @staticmethod
    def _as_request(req: Request | dict, sampling: SamplingParams | None) -> Request:
        if isinstance(req, Request):
            return req
        if isinstance(req, dict) and "messages" in req:
            # ``sampling`` may be a SamplingParams or a plain dict of its fields (a request read from JSON);
            # ``id`` is accepted for ``request_id`` (the jobs' row id).
            rid = req.get("request_id", req.get("id"))
            return Request(messages=req["messages"], sampling=req.get("sampling") or sampling or SamplingParams(),
                           session_id=req.get("session_id"), request_id=None if rid is None else str(rid),
                           return_logits=bool(req.get("return_logits", False)))
        raise RequestError(f"a request must be a Request or a dict with 'messages', got {type(req).__name__}")

    @torch.inference_mode()
    def _run(self, req: Request, rid: str) -> Result:
        t0 = time.perf_counter()
        sp = req.sampling
        prompt = build_prompt(self.processor, req.messages, self.config.max_pixels, self.image_token_id, self.image_memo)
        n = len(prompt)
        need = (n + sp.max_new_tokens) * self.geometry.bytes_per_token
        self.budget.check(need, f"request {rid} ({n} prompt + {sp.max_new_tokens} new tokens)")
        spans = [im.span for im in prompt.images]
        keys = self.prefix.keys(prompt.input_ids, spans) if self.config.prefix_cache else []
        tail = self.prefix.tail_key(prompt.input_ids, spans, keys) if self.config.prefix_cache else None
        if not self.budget.make_room(need, protect=keys):
            logger.warning("request %s: device KV budget still short after offloading everything movable", rid)
        metrics = Metrics(prompt_tokens=n)

        # At least the last prompt token is computed: its logits give the first new token.
        loaded = None
        capacity = n + sp.max_new_tokens
        if req.session_id is not None:
            loaded = self.sessions.resume(req.session_id, prompt.input_ids.tolist(), spans, n - 1, capacity)
        if loaded is None and self.config.prefix_cache:
            loaded = self.prefix.load(keys, n - 1, tail, capacity)
        cut = loaded.n_tokens if loaded else 0
        cache = loaded.cache if loaded else self.prefix.new_cache(capacity)
        if loaded:
            metrics.cached_tokens, metrics.cached_tiers = cut, dict(loaded.tiers)

        logits, rope_delta = self._prefill(prompt, cut, cache, metrics)
        sampler = Sampler(sp, self.device)
        token = sampler(logits)
        metrics.ttft_s = time.perf_counter() - t0
        if self.config.prefix_cache and req.session_id is None:
            metrics.stored_chunks = self._store_safely(self._store_prompt, cache, keys, tail, n)

        generated = [token]
        steps = [logits] if req.return_logits else None
        t1 = time.perf_counter()
        pos = n
        while len(generated) < sp.max_new_tokens and not (sp.stop_on_eos and token in self.eos_ids):
            logits = self._decode_step(token, pos, rope_delta, cache)
            token = sampler(logits)
            generated.append(token)
            if steps is not None:
                steps.append(logits)
            pos += 1
        decode_s = time.perf_counter() - t1
        if len(generated) > 1 and decode_s > 0:
            metrics.decode_tokens_per_s = (len(generated) - 1) / decode_s

        if req.session_id is not None:
            # The cache holds the prompt and every generated token but the last (never fed back).
            held = prompt.input_ids.tolist() + generated[:-1]
            metrics.stored_chunks = self._store_safely(self.sessions.save, req.session_id, cache, held, spans)
        text = self.processor.tokenizer.decode(generated, skip_special_tokens=True)
        return Result(rid, text=text, token_ids=generated, metrics=metrics,
                      logits=torch.stack(steps).float().cpu() if steps is not None else None)

    def _store_prompt(self, cache: DynamicCache, keys: list, tail: Any, n: int) -> int:
        stored = self.prefix.store_new(cache, keys)
        if tail is not None:
            c = self.config.chunk_tokens
            stored += self.prefix.store_tail(cache, tail, len(keys) * c, n, keys[-1] if keys else None)
        return stored

    @staticmethod
    def _store_safely(fn: Any, *args: Any) -> int:
        # The answer is already computed: a store that cannot take an entry costs reuse, not the request.
        try:
            return fn(*args)
        except (CapacityError, CodecError) as exc:
            logger.warning("KV not stored: %s", exc)
            return 0

    def _prefill(self, prompt: Prompt, cut: int, cache: DynamicCache, metrics: Metrics) -> tuple[torch.Tensor, int]:
        """Compute prompt tokens [cut, n) on top of ``cache``; returns last-position logits and rope delta."""
        dev = self.device
        ids = prompt.input_ids.to(dev)
        n = ids.shape[0]
        position_ids, delta = self._positions(prompt, cut)

        suffix = ids[cut:]
        embeds = self.model.model.get_input_embeddings()(suffix[None])
        visual_mask = None
        deepstack = None
        need = [im for im in prompt.images if im.end > cut]
        if need:
            feats = self._image_features(prompt, need, metrics)
            rows_embed, rows_ds = [], [[] for _ in range(self.n_deepstack)]
            for im, f in zip(need, feats):
                lo = max(im.start, cut) - im.start  # first feature row in the suffix (cut may split an image)
                rows_embed.append(f.embeds[lo:])
                for d in range(self.n_deepstack):
                    rows_ds[d].append(f.deepstack[d][lo:])
            visual_mask = (suffix == self.image_token_id)[None]
            img = torch.cat(rows_embed).to(dev, embeds.dtype)
            assert int(visual_mask.sum()) == img.shape[0], (int(visual_mask.sum()), img.shape)
            embeds = embeds.masked_scatter(visual_mask[..., None].expand_as(embeds), img)
            deepstack = [torch.cat(r).to(dev, embeds.dtype) for r in rows_ds]
        out = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=position_ids, cache=cache, use_cache=True,
            visual_pos_masks=visual_mask, deepstack_visual_embeds=deepstack,
        )
        logits = self.model.lm_head(out.last_hidden_state[:, -1])[0]
        return logits, delta

    def _positions(self, prompt: Prompt, cut: int) -> tuple[torch.Tensor, int]:
        """Position ids ``[4 (text, t, h, w), 1, n - cut]`` of prompt tokens [cut, n) and the rope delta.

        The 3-D MRoPE positions come from the WHOLE prompt (``get_rope_index``) and are sliced, because the
        cached keys were rotated with them. When the suffix lies after every image (a full or text-only
        hit), its positions are text positions shifted by the images' total offset, computed from the grids
        without the per-token pass (each image advances the position by max(h, w) / merge while taking
        t*h*w / merge^2 tokens); tests check this against ``get_rope_index``."""
        dev = self.device
        n = len(prompt)
        text_pos = torch.arange(cut, n, device=dev).view(1, 1, n - cut)
        merge = self.model.config.vision_config.spatial_merge_size
        if all(im.end <= cut for im in prompt.images):
            delta = sum(max(int(im.grid_thw[1]), int(im.grid_thw[2])) // merge - (im.end - im.start) for im in prompt.images)
            return torch.cat([text_pos, (text_pos + delta).expand(3, 1, n - cut)], dim=0), delta
        ids = prompt.input_ids.to(dev)
        grid = prompt.image_grid_thw.to(dev) if prompt.image_grid_thw is not None else None
        pos3, delta = self.model.model.get_rope_index(
            ids[None], mm_token_type_ids=prompt.mm_token_type_ids.to(dev)[None], image_grid_thw=grid
        )
        return torch.cat([text_pos, pos3.to(dev)[:, :, cut:]], dim=0), int(delta.flatten()[0])

    def _decode_step(self, token: int, pos: int, rope_delta: int, cache: DynamicCache) -> torch.Tensor:
        dev = self.device
        embeds = self.model.model.get_input_embeddings()(torch.tensor([[token]], device=dev))
        position_ids = torch.tensor([pos] + [pos + rope_delta] * 3, device=dev).view(4, 1, 1)
        out = self.model.model.language_model(inputs_embeds=embeds, position_ids=position_ids, cache=cache, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1])[0]

    def _image_features(self, prompt: Prompt, images: list, metrics: Metrics) -> list[ImageFeatures]:
        """Features of ``images``: from the vision cache where present, else one encoder pass for the rest."""
        merge = self.model.config.vision_config.spatial_merge_size ** 2
        feats: list[ImageFeatures | None] = []
        for im in images:
            f = self.vision.get(im.content_hash, im.end - im.start, self.n_deepstack) if self.config.vision_cache else None
            feats.append(f)
        missing = [i for i, f in enumerate(feats) if f is None]
        metrics.vision_cache_hits += len(images) - len(missing)
        if missing:
            pv = torch.cat([prompt.pixel_values[images[i].patch_start:images[i].patch_end] for i in missing]).to(self.device)
            grid = torch.stack([images[i].grid_thw for i in missing]).to(self.device)
            t0 = time.perf_counter()
            out = self.model.model.get_image_features(pv, grid, return_dict=True)
            metrics.vision_encode_s += time.perf_counter() - t0
            for j, i in enumerate(missing):
                f = ImageFeatures(out.pooler_output[j], [ds[j] for ds in out.deepstack_features])
                assert f.embeds.shape[0] * merge == int(grid[j].prod()), (f.embeds.shape, grid[j])
                feats[i] = f
                if self.config.vision_cache:
                    self.vision.put(images[i].content_hash, f)
            metrics.images_encoded += len(missing)
        return feats  # type: ignore[return-value]
