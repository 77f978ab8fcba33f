"""Qwen3-VL worker: serves requests with the engine, reusing cached prefixes from any node.

``WorkerLogic`` is plain Python over ports (the local agent, other nodes' agents, the coordinator): it finds a
request's cached prefix (its own device tier first, then the local agent, then the cluster directory), fetches it in one batched call per
node plus one batched object-store read (a cross-node hit is Ray's object transfer from the holder's store),
runs the engine for the rest, and ships the new chunks to the agent the coordinator places them on in one
batched call. The device tier is the worker's own (a core TieredCache with one device tier: hot chunks
never leave the process); host and disk are the agents', and the local agent is the tier below it
(``AgentBelow``: what the device budget pushes out goes there, not away). Agent failures turn into misses:
a request never fails because the cache did.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from typing import Any, Callable

import ray

from actors.cluster_chunks import ClusterChunks
from actors.config import NAMESPACE, ServiceConfig, WorkerConfig, configure_actor_logging
from actors.engine_protocol import ENGINE_MEMBERS, DeviceTierEngine, EngineRun, WorkerEngine
from actors.metrics import Metrics
from actors.node_agent import materialize
from actors.object_store_tier import ObjectStore
from actors.results import RequestResult, error_result
from actors.tenancy import tenant_checked, with_tenant
from actors.wire import WireChunk

logger = logging.getLogger(__name__)


def load_engine(spec: str, args: dict) -> Any:
    """Call the ``module:callable`` factory with ``args``. A bare ``Qwen3VLEngine`` (e.g. from a settings
    factory, or ``qwen3vl_ray.engine:Qwen3VLEngine``) is wrapped in the adapter that speaks the worker protocol."""
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"engine {spec!r} cannot be loaded ({exc}); expected 'module:callable'") from exc
    engine = factory(**args)
    # Only a factory that built one has loaded the engine module: no import (torch, transformers) otherwise.
    engine_module = sys.modules.get("qwen3vl_ray.engine.engine")
    if engine_module is not None and isinstance(engine, engine_module.Qwen3VLEngine):
        from actors.engine_adapter import Qwen3VLEngineAdapter

        engine = Qwen3VLEngineAdapter.from_engine(engine)
    if not isinstance(engine, WorkerEngine):
        missing = [m for m in ENGINE_MEMBERS if not hasattr(engine, m)]
        raise ValueError(f"engine {spec!r} built a {type(engine).__name__} without {', '.join(map(repr, missing))}; "
                         "see actors.engine_protocol.WorkerEngine for the engine protocol")
    return engine


class AgentBelow:
    """The node agent's host tier as the tier below a worker's device store (``qwen3vl_ray.engine.budget.TierBelow``).

    Hierarchy across worker and agent: inclusive for full prompt chunks (the worker writes them through to an
    agent as it computes them, and keeps its device copy), exclusive for what only the worker had (a chat
    session's tail and answer chunks): the device budget hands those down here when it pushes them out, and
    drops only device copies an agent holds. Bytes are counted where they lie: the worker's device row is its
    device tier, the agent's host row its host tier; a written-through chunk is in both because both hold it.
    """

    def __init__(self, chunks: ClusterChunks) -> None:
        self.chunks = chunks

    def contains_many(self, keys: list) -> list[bool]:
        """Held by this node's agent, or by another node's as the directory knows it (a chunk written through
        to where the coordinator placed it)."""
        return [holder is not None for holder in self.chunks.holders(keys)]

    def put_many(self, items: list) -> list[bool]:
        """Hand ``(key, tensor, parent)`` items to this node's agent in one batched call."""
        c = self.chunks
        tiers = c.agent_for(c.node_id).put_chunks([WireChunk.of(k, t, p) for k, t, p in items])
        keys = [k for k, _, _ in items]
        try:
            c.coordinator.record(c.node_id, keys, tiers)
        except Exception:  # the directory learns them at the next journal sync
            logger.warning("recording %d handed-down entries failed", len(keys), exc_info=True)
        return [t is not None for t in tiers]

    def get_many(self, keys: list) -> list:
        """Tensors from this node's agent (one batched call and one batched object-store read)."""
        c = self.chunks
        return materialize(c.agent_for(c.node_id).get_chunks(keys), c.store)


class WorkerLogic:
    """Serves one request at a time with an engine that follows ``actors.engine_protocol.WorkerEngine``
    (``request_keys``, then ``run`` with the fetched prefix, returning an ``EngineRun``). An engine that is also a
    ``DeviceTierEngine`` keeps the device tier itself: the worker keeps no copy, fetches only the chunks after
    those it holds (passing ``None`` in ``cached`` for those) and attaches its node agent below the engine's
    store (``AgentBelow``). Optionally the engine class has ``route_keys(request, **engine_args)`` (keys
    without a model) and ``kv_bytes(request, **engine_args)``, which the service's client uses to route by
    longest cached prefix and to size admission, and the engine ``routing_spec()`` (``Worker.routing_spec``).

    ``actors.engine_adapter.Qwen3VLEngineAdapter`` (the real model, the default) and
    ``actors.synthetic_engine.SyntheticKVEngine`` (model-free test/benchmark workload) implement it.
    """

    def __init__(self, worker_id: str, node_id: str, engine: WorkerEngine, agent_for: Callable[[str], Any], coordinator: Any,
                 store: ObjectStore, config: WorkerConfig, metrics: Metrics | None = None) -> None:
        self.worker_id, self.node_id = worker_id, node_id
        self.engine, self.agent_for, self.coordinator, self.store = engine, agent_for, coordinator, store
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(node_id)
        self.chunks = ClusterChunks(node_id, agent_for, coordinator, store, self.metrics)
        self.device = None
        # An engine that keeps its own device tier (the real engine's store) needs no second copy here.
        self.engine_device = engine if isinstance(engine, DeviceTierEngine) else None
        if config.device_bytes and self.engine_device is None:
            from qwen3vl_ray.cache import CacheConfig, TieredCache
            from qwen3vl_ray.tiers.config import TierConfig

            self.device = TieredCache(CacheConfig(tiers=[TierConfig("device", config.device_bytes)],
                                                  namespace=engine.namespace, prefetch_threads=0))
        # The engine's device store has nothing below it in this process: the node's agent is its tier below.
        if self.engine_device is not None:
            self.engine_device.attach_below(AgentBelow(self.chunks))

    def _fetch_prefix(self, keys: list) -> tuple[list, list[str]]:
        """The longest cached prefix as tensors, and per chunk the tier it came from: ``device`` (this
        worker's own tier), ``host``/``disk`` (the local agent's) or ``remote`` (another node's agent)."""
        on_device: list = []
        if self.engine_device is not None:
            # The engine's own device tier serves these: no copy out of it, no fetch from an agent.
            on_device = [None] * self.engine_device.held_prefix(keys)
        elif self.device is not None:
            for t in self.device.get_many(keys[:self.device.longest_prefix(keys)]):
                if t is None:
                    break
                on_device.append(t)
        if len(on_device) == len(keys):
            return on_device, ["device"] * len(on_device)
        rest, sources = self._fetch_from_agents(keys[len(on_device):])
        if self.device is not None and rest:
            first = len(on_device)
            self.device.put_many([(keys[first + i], t, keys[first + i - 1] if first + i else None) for i, t in enumerate(rest)])
        return on_device + rest, ["device"] * len(on_device) + sources

    def _fetch_from_agents(self, keys: list) -> tuple[list, list[str]]:
        return self.chunks.fetch_prefix(keys)

    def process(self, request: dict) -> RequestResult:
        """Serve one request. A request the engine rejects (bad image, bad messages, ``Result.error``) is a
        result with ``error`` set, never an exception: the service's other requests go on. Failures of the
        service itself (coordinator, a crashed worker) still raise, so the service retries elsewhere."""
        t0 = time.perf_counter()
        try:
            keys = self.engine.request_keys(request)
        except Exception as exc:  # a bad request, not a broken worker: report it on its row
            return self._rejected(request, exc)
        cached, sources = self._fetch_prefix(keys)
        t_fetch = time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            result = self.engine.run(request, keys, cached)
        except Exception as exc:
            return self._rejected(request, exc)
        if not isinstance(result, EngineRun):  # a broken engine, not a bad request: raised, as the worker's
            raise TypeError(f"{type(self.engine).__name__}.run returned a {type(result).__name__}, not an EngineRun")
        if result.error:
            return self._rejected(request, result.error)
        return self._finish(request, keys, cached, sources, result, t_fetch, t1)

    def _rejected(self, request: Any, error: Any) -> RequestResult:
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        logger.warning("request %s failed: %s", request.get("id") if isinstance(request, dict) else None, text)
        self.metrics.inc("qwen3vl_ray_requests", result="error")
        return self._error(request, text)

    def _error(self, request: Any, error: str) -> RequestResult:
        return error_result(request, error, self.worker_id, self.node_id)

    def _finish(self, request: dict, keys: list, cached: list, sources: list[str], result: EngineRun,
                t_fetch: float, t1: float) -> RequestResult:
        # the engine's own TTFT (when it reports one) excludes decoding; add the prefix fetch before it
        ttft = t_fetch + (result.ttft_s if result.ttft_s is not None else time.perf_counter() - t1)
        new = result.new_chunks
        stored = 0
        if new:
            first = len(cached)
            items = [(keys[first + j], t, keys[first + j - 1] if first + j else None) for j, t in enumerate(new)]
            if self.device is not None:
                self.device.put_many(items)
            stored = sum(1 for t in self.chunks.store_chunks(items) if t)
        cached_tiers = self._cached_tiers(sources, result)
        cached_tokens = sum(cached_tiers.values())
        n_tok = result.prompt_tokens or len(keys) * self.engine.chunk_tokens
        token_ids = result.token_ids
        self._record(cached_tiers, cached_tokens, n_tok, ttft)
        return RequestResult(id=request.get("id"), worker=self.worker_id, node=self.node_id, output=result.output,
                             prompt_tokens=result.prompt_tokens,
                             completion_tokens=len(token_ids) if token_ids is not None else None,
                             cached_tokens=cached_tokens, cached_tiers=cached_tiers,
                             vision_cache_hits=int(result.vision_cache_hits or 0),
                             device_chunks=sources.count("device"), cross_node_chunks=sources.count("remote"),
                             computed_chunks=len(new), stored_chunks=stored, ttft_s=ttft, fetch_s=t_fetch,
                             engine_cached_tokens=result.engine_cached_tokens, token_ids=token_ids)

    def _record(self, cached_tiers: dict[str, int], cached_tokens: int, n_tok: int, ttft: float) -> None:
        """Hits and misses in prompt tokens, as the rows count them: a hit per tier that served tokens (here,
        where the request's outcome is known, not in the agents, which see chunks and not tokens), a miss for
        every token recomputed, a cold request's whole prompt included."""
        for tier, n in cached_tiers.items():
            self.metrics.inc("qwen3vl_ray_hits", n, tier=tier)
        self.metrics.inc("qwen3vl_ray_misses", max(0, n_tok - cached_tokens))
        self.metrics.observe("qwen3vl_ray_ttft_seconds", ttft)
        self.metrics.observe("qwen3vl_ray_cached_token_ratio", min(1.0, cached_tokens / n_tok) if n_tok else 0.0)
        self.metrics.inc("qwen3vl_ray_requests", result="ok")
        for tier in getattr(self._device_store(), "tiers", ()):  # the worker's own device tier
            if tier.name == "device":
                self.metrics.set("qwen3vl_ray_bytes_used", tier.used_bytes, tier="device")
                self.metrics.set("qwen3vl_ray_bytes_budget", tier.capacity_bytes, tier="device")
                self.metrics.set("qwen3vl_ray_entries", len(tier), tier="device")

    def _device_store(self) -> Any:
        """The store holding this worker's device tier: its own, or its engine's (a ``DeviceTierEngine``)."""
        return self.device if self.engine_device is None else self.engine_device.store

    def device_stats(self) -> dict | None:
        """This worker's device tier as the agents report theirs (entries, used and budget bytes, hits, bytes
        read and written): the device row of ``demo`` and ``status``. None without a device tier."""
        store = self._device_store()
        if store is None:
            return None
        stats = store.stats()
        tiers = stats.get("tiers", [])
        for tier in tiers:
            if tier.get("name") == "device":
                out = {**tier, "used": tier.get("used_bytes"), "capacity": tier.get("capacity_bytes"),
                       "worker": self.worker_id, "node": self.node_id}
                if len(tiers) == 1:  # the store's misses are this tier's (nothing below it in the process)
                    out["misses"] = stats.get("misses")
                return out
        return None

    def _cached_tiers(self, sources: list[str], result: EngineRun) -> dict[str, int]:
        """Reused prompt tokens per tier. An engine that owns the device tier reports how many of the fetched
        chunks it already held (``device_chunks``: those are device hits, not the agent's) and how many
        tokens it reused (``engine_cached_tokens``): more than fetched are extra hits in its device tier, fewer
        leave the chunks it did not use uncounted."""
        ct = self.engine.chunk_tokens
        sources = list(sources)
        d = min(int(result.device_chunks or 0), len(sources))
        sources[:d] = ["device"] * d
        per_token = [s for s in sources for _ in range(ct)]
        engine_cached = result.engine_cached_tokens
        if engine_cached is not None:
            engine_cached = int(engine_cached)
            # Fewer than fetched: chunks the engine did not use (a prefix longer than its device tier) are
            # recomputed, not reused, and do not count. Within the last used chunk they still count: the
            # engine recomputes a fully cached prompt's last token, but that chunk was loaded.
            del per_token[-(-engine_cached // ct) * ct:]
            per_token += ["device"] * max(0, engine_cached - len(per_token))
            below = min(int(result.below_tokens or 0), max(0, engine_cached - len(sources) * ct))
            if below:  # past the fetched chunks: brought back from the local agent by the engine, not held
                per_token[-below:] = ["host"] * below
        out: dict[str, int] = {}
        for s in per_token:
            out[s] = out.get(s, 0) + 1
        return out


@tenant_checked
class Worker:
    """Ray actor wrapper (``num_gpus=1`` per worker on GPU clusters, CPU workers otherwise). One tenant's: every
    method runs only with its key (``auth``), and it calls only that tenant's agents and coordinator."""

    def __init__(self, worker_id: str, config: ServiceConfig) -> None:
        from actors.cluster_chunks import connect
        from actors.metrics import RayMetrics

        configure_actor_logging()
        self._config = config
        self.tenant = config.tenant
        node = ray.get_runtime_context().get_node_id()
        metrics = RayMetrics(node)
        ports = connect(config.tenant, config.agent, metrics)
        engine = load_engine(config.worker.engine, config.worker.engine_args)
        self.logic = WorkerLogic(worker_id, node, engine, ports.agent_for, ports.coordinator, ports.store,
                                 config.worker, metrics)
        ports.coordinator.register_worker(worker_id, node)

    def process(self, request):
        return self.logic.process(request)

    # Control calls run in their own concurrency group so they answer while a request is being served
    # (a restarted coordinator asks every worker for its node while the workers wait on it).
    @ray.method(concurrency_group="control")
    def node_id(self):
        return self.logic.node_id

    @ray.method(concurrency_group="control")
    def routing_spec(self):
        """The engine's key configuration for client-side prefix routing (an ``actors.engine_protocol.RoutingSpec``;
        None for an engine without one)."""
        spec = getattr(self.logic.engine, "routing_spec", None)
        return spec() if spec is not None else None

    @ray.method(concurrency_group="control")
    def device_stats(self):
        return self.logic.device_stats()

    @ray.method(concurrency_group="control")
    def pid(self):
        return os.getpid()

    @ray.method(concurrency_group="control")
    def config_fields(self):
        """Canonical fields of this worker's config (``actors.config_check.worker_fields``)."""
        from actors.config_check import worker_fields

        return worker_fields(self._config.worker)

    @ray.method(concurrency_group="control")
    def service_config(self):
        """The whole ServiceConfig this worker was built with (a driver without its own config adopts it)."""
        return self._config


def device_stats_of(worker_ids: list[str], tenant: Any = None, timeout_s: float = 30.0) -> dict[str, dict]:
    """The device tier of each named worker (``Worker.device_stats``) of ``tenant`` (an ``actors.tenancy.Tenant``;
    None: the default one), by worker id: the tier the node agents do not hold, so a cluster's status asks the
    workers for it. A worker that does not answer gets ``{"error": ...}``; one without a device tier is left out."""
    from actors.tenancy import Tenant

    tenant = tenant if tenant is not None else Tenant()
    out: dict[str, dict] = {}
    refs = {}
    for w in worker_ids:
        try:
            refs[w] = with_tenant(ray.get_actor(w, namespace=NAMESPACE), tenant).device_stats.remote()
        except Exception as e:  # gone since the coordinator listed it
            out[w] = {"error": f"{type(e).__name__}: {e}"}
    for w, ref in refs.items():
        try:
            stats = ray.get(ref, timeout=timeout_s)
        except Exception as e:
            out[w] = {"error": f"{type(e).__name__}: {e}"}
            continue
        if stats is not None:
            out[w] = stats
    return out


def worker_class():
    """The Worker actor class: requests run one at a time; control methods in a separate group."""
    return ray.remote(concurrency_groups={"control": 1})(Worker)


def worker_options(worker_id: str, config: WorkerConfig) -> dict:
    """Named, detached, restarted; one GPU each on a GPU cluster (``num_gpus=None``), else CPU workers."""
    gpus = config.num_gpus
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return dict(name=worker_id, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1,
                max_task_retries=0, num_cpus=config.num_cpus, num_gpus=gpus, scheduling_strategy="SPREAD")
