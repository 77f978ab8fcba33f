"""The real Qwen3-VL engine behind the worker's engine protocol (see ``actors.worker.WorkerLogic``).

This is what workers run by default (``WorkerConfig()``): ``engine_args`` name the model as a checkpoint
directory or a preset (``model="tiny"``, generated on first use into ``checkpoint_dir``, the same rule and
defaults as the users' settings) plus any ``EngineConfig`` field (``chunk_tokens``, ``dtype``, ``device``,
...). ``checkpoint_path`` is accepted as a synonym of ``model`` (what the jobs layer passes).

The adapter owns the engine's store, a TieredCache with the device tier only (host and disk belong to the
node agent), and so owns the worker's device tier (a ``actors.engine_protocol.DeviceTierEngine``). Before a request, the chunks the
worker fetched from the agents (local or another node's) are put into that store under the request's keys,
so the engine's prefix loader finds them (chunks the store already holds, ``held_prefix``, are not fetched);
after it, the new prompt chunks are handed back for the worker to ship to its agent in one batched call. Keys come from ``qwen3vl_ray.engine.request_keys.RequestKeyer``, the
same keys a router computes client-side without weights (``route_keys``), checked against the engine's own
namespace at start-up. The worker attaches its node agent as the tier below the store (``attach_below``):
what the device budget pushes out goes there, and a chat session's entries come back from there.

Requests are the engine's: ``{"messages": [...], "sampling": {...}, "session_id": ...}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Sequence

import torch

from actors.engine_protocol import EngineRun, RoutingSpec
from qwen3vl_ray.keys import CacheKey
from qwen3vl_ray.settings import concrete_dtype, default, env_value

logger = logging.getLogger(__name__)

DEVICE_TIER_BYTES = default("device_bytes")
"""The engine store's device tier without ``tiers`` or ``device_tier_bytes``: the settings' ``device_bytes``."""
_ADAPTER_ONLY = ("model", "checkpoint_path", "checkpoint_dir", "device_tier_bytes")


def _engine_config(device_tier_bytes: int, **engine_config: Any):
    from qwen3vl_ray.engine.config import EngineConfig
    from qwen3vl_ray.tiers.config import TierConfig

    # Host and disk belong to the node agent; the engine's own store is the device tier only.
    engine_config.setdefault("tiers", [TierConfig("device", device_tier_bytes)])
    if engine_config.get("dtype") == "auto":  # the settings' rule, for this worker's device
        engine_config["dtype"] = concrete_dtype("auto", engine_config.get("device", "auto"))
    return EngineConfig(**engine_config)


def _checkpoint(model: str | None, checkpoint_path: str | None, checkpoint_dir: str | None) -> str:
    """The checkpoint directory: the model given, else this node's ``QWEN3VL_RAY_MODEL`` (and
    ``QWEN3VL_RAY_CHECKPOINT_DIR``) read through the settings, so the same defaults and parsing apply."""
    from qwen3vl_ray.engine.request_keys import checkpoint_path_for

    if model and checkpoint_path and os.path.abspath(model) != os.path.abspath(checkpoint_path):
        raise ValueError(f"give model or checkpoint_path, not both ({model!r} vs {checkpoint_path!r})")
    name = model or checkpoint_path or env_value("model")
    cdir = checkpoint_dir or env_value("checkpoint_dir")
    return str(checkpoint_path_for(name, cdir))


_keyers: dict[tuple, Any] = {}
_keyers_lock = threading.Lock()


class Qwen3VLEngineAdapter:
    """A ``WorkerEngine`` and a ``DeviceTierEngine`` (``actors.engine_protocol``): the engine's store is the
    worker's device tier, so the worker keeps none of its own."""

    def __init__(self, model: str | None = None, checkpoint_path: str | None = None, checkpoint_dir: str | None = None,
                 device_tier_bytes: int = DEVICE_TIER_BYTES, *, engine: Any | None = None, **engine_config: Any) -> None:
        from qwen3vl_ray.engine.request_keys import RequestKeyer

        if engine is None:
            from transformers import AutoConfig

            from qwen3vl_ray.cache import CacheConfig, TieredCache
            from qwen3vl_ray.engine.checkpoint import model_fingerprint
            from qwen3vl_ray.engine.engine import Qwen3VLEngine
            from qwen3vl_ray.engine.prefix_kv import KVGeometry, chunk_fitted_tiers
            from qwen3vl_ray.keys import Namespace

            path = _checkpoint(model, checkpoint_path, checkpoint_dir)
            config = _engine_config(device_tier_bytes, **engine_config)
            ns = Namespace(model=model_fingerprint(path, full=config.fingerprint == "full"), dtype=config.dtype,
                           layout="qwen3vl-ray-worker", tenant=config.tenant)
            # the store exists before the engine (it is handed in), so size its blocks from the config here
            text_config = AutoConfig.from_pretrained(path, local_files_only=True).text_config
            chunk_bytes = KVGeometry.from_text_config(text_config, config.torch_dtype).bytes_per_token * config.chunk_tokens
            self.store = TieredCache(CacheConfig(tiers=chunk_fitted_tiers(config.tiers, chunk_bytes),
                                                 policy=config.policy, namespace=ns))
            engine = Qwen3VLEngine(path, config, store=self.store)
            keyer = RequestKeyer(path, config, processor=engine.processor, memo=engine.image_memo,
                                 fingerprint=engine.fingerprint)
        else:  # a ready engine (e.g. from a settings factory): its store is the device tier
            self.store = engine.store
            keyer = RequestKeyer(engine.path, engine.config, processor=engine.processor, memo=engine.image_memo,
                                 fingerprint=engine.fingerprint)
        if keyer.namespace != engine.kv_namespace:
            # Keys that differ from the engine's would make every fetched chunk invisible to it.
            raise RuntimeError(f"request keys' namespace {keyer.namespace} differs from the engine's "
                               f"{engine.kv_namespace}; qwen3vl_ray.engine.request_keys is out of date")
        self.engine, self.keyer = engine, keyer
        self.namespace = keyer.namespace
        self.chunk_tokens = keyer.chunk_tokens
        self.below: Any | None = None

    def attach_below(self, below: Any) -> None:
        """Give the engine's store a tier below it (``qwen3vl_ray.engine.budget.TierBelow``: the node agent's
        host tier). The device budget then hands what it pushes out to ``below`` instead of dropping it,
        and a session's entries found there come back before its next turn. Only a store whose last tier
        is the device tier uses it; one with its own host tier keeps demoting into that."""
        self.below = below
        self.engine.budget.below = below

    @classmethod
    def from_engine(cls, engine: Any) -> "Qwen3VLEngineAdapter":
        return cls(engine=engine)

    @classmethod
    def route_keys(cls, request: dict, **engine_args: Any) -> list[CacheKey]:
        """The request's chunk keys for workers built with ``engine_args``, computed client-side without
        loading weights (one cached ``RequestKeyer`` per configuration)."""
        return cls.keyer_for(**engine_args).keys(request["messages"])

    @classmethod
    def keyer_for(cls, model: str | None = None, checkpoint_path: str | None = None, checkpoint_dir: str | None = None,
                  device_tier_bytes: int = DEVICE_TIER_BYTES, **engine_config: Any):
        from qwen3vl_ray.engine.request_keys import RequestKeyer

        path = _checkpoint(model, checkpoint_path, checkpoint_dir)
        key = (path, device_tier_bytes, repr(sorted(engine_config.items())))
        with _keyers_lock:
            keyer = _keyers.get(key)
            if keyer is None:
                keyer = _keyers[key] = RequestKeyer(path, _engine_config(device_tier_bytes, **engine_config))
            return keyer

    def routing_spec(self) -> RoutingSpec:
        """This engine's keys as a router rebuilds them (``RoutingSpec``)."""
        return RoutingSpec(str(self.engine.path), self.engine.config, self.engine.fingerprint)

    def _request(self, request: dict) -> Any:
        from qwen3vl_ray.engine.requests import Request

        # a dict of SamplingParams fields (unknown names are a RequestError naming the valid ones)
        return Request(messages=request["messages"], sampling=request.get("sampling") or {},
                       request_id=None if request.get("id") is None else str(request["id"]),
                       session_id=request.get("session_id"))

    def request_keys(self, request: dict) -> list[CacheKey]:
        """The engine's chunk keys for the request's prompt (template, tokens, image hashes folded in)."""
        messages = request.get("messages") if isinstance(request, dict) else None
        if not messages:
            raise ValueError(f"a Qwen3-VL request needs a non-empty 'messages' list, got {str(request)[:200]}")
        return self.keyer.keys(messages)

    def held_prefix(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` the engine's store (the worker's device tier) already holds."""
        return self.store.longest_prefix(keys)

    def run(self, request: dict, keys: Sequence[CacheKey], cached: Sequence[torch.Tensor | None]) -> EngineRun:
        t0 = time.perf_counter()
        held, staged = self._stage(keys, cached)
        with contextlib.ExitStack() as pins:
            restored, restored_from = self._restore_session(request.get("session_id"), pins)
            t_stage = time.perf_counter() - t0
            [result] = self.engine.generate([self._request(request)])
        if result.error:  # a bad request (corrupt image, ...): its row's error, not the worker's
            return EngineRun(error=str(result.error))
        new = []
        for k in keys[len(cached):]:
            t = self.store.get(k, promote=False)
            if t is None:  # the engine stores chunks in order; the first gap ends what it produced
                break
            new.append(t)
        m = result.metrics
        # tokens the turn reused from what came back from the agent (the session's chain from its first
        # restored entry on): host hits, though the engine found them in its store
        below_tokens = max(0, m.cached_tokens - restored_from) if restored else 0
        if restored:
            logger.info("request %s: %d entries of session %s came back from the tier below", request.get("id"),
                        restored, request.get("session_id"))
        if staged < len(cached):
            logger.info("request %s: %d of %d fetched chunks fit in the device tier; the engine recomputes the "
                        "rest", request.get("id"), staged, len(cached))
        # staging the fetched chunks is part of the time to the first token
        return EngineRun(new_chunks=new, output=result.text, token_ids=list(result.token_ids),
                         prompt_tokens=m.prompt_tokens, ttft_s=m.ttft_s + t_stage, engine_cached_tokens=m.cached_tokens,
                         device_chunks=held, vision_cache_hits=m.vision_cache_hits, below_tokens=below_tokens)

    def _stage(self, keys: Sequence[CacheKey], cached: Sequence[torch.Tensor | None]) -> tuple[int, int]:
        """Put the chunks fetched from the agents into the engine's store (the device tier), where its prefix
        loader finds them. Returns (leading chunks the store already held, chunks of the prefix now in it).

        Each staged chunk stays pinned until the whole prefix is staged: the store is the device tier alone, so
        making room for chunk i would otherwise evict chunk 0 of the same prefix for good (nothing is below
        it), and a prefix longer than the tier would be fetched and then recomputed from its first token. One
        that does not fit is staged as far as it fits."""
        store = self.store
        held = 0  # leading chunks already in the engine's store (``None`` in ``cached``): device-tier hits
        n = 0
        with contextlib.ExitStack() as pins:
            for i, t in enumerate(cached):
                if store.contains(keys[i]):
                    held += held == i
                elif t is None or not store.put(keys[i], t, keys[i - 1] if i else None):
                    break  # gone since the worker asked, or no room left beside the pinned prefix
                pins.enter_context(store.pinned([keys[i]]))
                n = i + 1
        return held, n

    def _restore_session(self, session_id: Any, pins: contextlib.ExitStack) -> tuple[int, int]:
        """Bring back the session's entries the device budget handed down (its tail; chunks the request's keys
        do not cover), in one batched read from ``below``. They stay pinned in ``pins`` until the turn has
        read them: the budget makes room before the engine resumes the session, and would push the tail
        straight back down. Stops at the first entry missing or not fitting (the session resumes that far).
        Returns (entries restored, the session's token position where the first of them starts)."""
        if self.below is None or session_id is None or session_id not in self.engine.sessions:
            return 0, 0
        missing = self.engine.sessions.missing(session_id)
        if not missing:
            return 0, 0
        try:
            tensors = self.below.get_many([k for k, _ in missing])
        except Exception:
            logger.warning("session %s: the tier below is unreachable; its turn recomputes", session_id, exc_info=True)
            return 0, 0
        start = self.engine.sessions.get(session_id).keys.index(missing[0][0]) * self.chunk_tokens
        n = 0
        for (key, parent), t in zip(missing, tensors):
            if t is None or not self.store.put(key, t, parent):
                break
            pins.enter_context(self.store.pinned([key]))
            n += 1
        return n, start
