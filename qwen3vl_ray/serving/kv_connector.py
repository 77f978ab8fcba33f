"""``TierKVConnector``: vLLM v1's KV connector on the project's tiers.

Load it with ``kv_transfer_config=qwen3vl_ray.serving.connector_config.kv_transfer_config(...)``.

Scheduler side (one instance in the scheduler): for a new request, the longest run of its full blocks found in
the store (keyed by vLLM's own block hashes, which carry image hashes, under our namespace) becomes external
hits; after allocation, the metadata of the step tells the worker which block ids to fill from which keys, and
which freshly computed full blocks to save. Worker side (one instance per worker): fills those blocks, saves
the new full blocks, and reports every block it could not load, which vLLM then recomputes
(``kv_load_failure_policy="recompute"``): a block that is gone or corrupt is never served.

How the store's work meets vLLM's step (``block_transfers``): saves copy the blocks out of the paged KV in the
step and store them on a background thread (``save_mode="async"``, the default); loads run in the step before
the forward pass (``load_mode="sync"``, the default) or, with ``load_mode="async"``, while vLLM parks the
request and the other requests' steps go on (vLLM's ``WAITING_FOR_REMOTE_KVS``).

Blocks are saved as soon as they are full and computed, prompt and generated ones alike, so a preempted
request finds its KV in the tiers when it resumes, and the next turn of a chat finds the previous answer's.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.core.sched.output import SchedulerOutput

from qwen3vl_ray.engine.checkpoint import model_fingerprint
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.serving.block_keys import KVLayout, block_keys, block_namespace, codec_tag
from qwen3vl_ray.serving.block_store import BlockStore, shared_store
from qwen3vl_ray.serving.block_transfers import (
    BlockMove,
    LoadResult,
    StagingBuffers,
    save_blocks,
    transfers_for,
)
from qwen3vl_ray.serving.connector_config import connector_config
from qwen3vl_ray.serving.connector_metrics import TierConnectorPromMetrics, TierConnectorStats
from qwen3vl_ray.serving.paged_blocks import PagedBlocks

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

__all__ = ["BlockMove", "TierConnectorMetadata", "TierKVConnector"]


@dataclass
class TierConnectorMetadata(KVConnectorMetadata):
    """What the workers do in one step: loads before the forward pass, saves after it, and asynchronous loads
    (request id -> its blocks) to start."""

    loads: list[BlockMove] = field(default_factory=list)
    saves: list[BlockMove] = field(default_factory=list)
    async_loads: dict[str, list[BlockMove]] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)  # requests of ``loads``: the lookup may have read theirs ahead


@dataclass(slots=True)
class _Tracked:
    """Scheduler-side state of one running request."""

    request: Request
    block_ids: list[int]
    saved_blocks: int  # leading full blocks already in the store (loaded, found, or saved)


@dataclass(slots=True)
class _PendingLoad:
    request: Request
    first_block: int  # index in the request's block list of the first block to load
    num_blocks: int


class TierKVConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        tc = self._kv_transfer_config
        config = connector_config(tc.kv_connector_extra_config)
        settings = config.settings
        if tc.kv_load_failure_policy != "recompute":
            log.warning("kv_load_failure_policy=%r: a block that fails to load fails its request; "
                        "use kv_transfer_config() (\"recompute\") to recompute it instead", tc.kv_load_failure_policy)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            # each rank holds a slice of the heads or layers: one key per block would mix slices
            raise ConfigError(f"the KV connector serves engines of one worker (tensor_parallel_size 1, "
                              f"pipeline_parallel_size 1), got {parallel.tensor_parallel_size} and "
                              f"{parallel.pipeline_parallel_size}: run one engine per GPU (data parallel)")
        self.block_size = vllm_config.cache_config.block_size
        self.layout = _layout(vllm_config, kv_cache_config)
        model_path = vllm_config.model_config.model
        try:
            fingerprint = model_fingerprint(model_path, full=settings.fingerprint == "full")
        except FileNotFoundError as e:
            raise ConfigError(f"the KV connector keys blocks by the checkpoint's fingerprint and needs its files on "
                              f"disk: {e}") from None
        self.namespace = block_namespace(fingerprint, self.layout, codec_tag(settings.host_codec, settings.disk_codec),
                                         settings.tenant)
        self.load_mode, self.save_mode = config.load_mode, config.save_mode
        self.store: BlockStore = shared_store(settings, config.store)
        self.transfers = transfers_for(self.store)
        if role == KVConnectorRole.WORKER:
            _WORKER_STORES.add(self.store)
        # scheduler side
        # looked up, not yet scheduled: the request, the tokens vLLM's own prefix cache had for it, and whether
        # its load (if any) is asynchronous
        self._waiting: dict[str, tuple[Request, int, bool]] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, _PendingLoad] = {}
        self._async_loads: dict[str, list[BlockMove]] = {}  # allocated, not yet sent to the worker
        # worker side
        self._paged: PagedBlocks | None = None
        self._staging: StagingBuffers | None = None
        self._lock = threading.Lock()  # the transfer thread reports into what follows
        self._load_errors: set[int] = set()
        self._loads_done: list[tuple[str, list[int]]] = []  # asynchronous loads done: request id, failed blocks
        self._stats = TierConnectorStats()
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else 0

    # ================================================================ scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        self._waiting[request.request_id] = (request, num_computed_tokens, False)
        keys = block_keys(self.namespace, request.block_hashes)
        # at least one token is left to compute: vLLM needs a forward pass to produce the next token
        usable = keys[:min(len(keys), (request.num_tokens - 1) // self.block_size)]
        found = self.store.longest_prefix(usable)
        # blocks still on their way into the store are held too: the transfer thread stores them before any
        # load submitted after this lookup runs
        for on_its_way in self.transfers.pending(usable[found:]):
            if not on_its_way:
                break
            found += 1
        external = found * self.block_size - num_computed_tokens
        if external <= 0:
            return 0, False
        load_async = self.load_mode == "async"
        if not load_async and _covers_an_image(request, num_computed_tokens, external):
            if self.store in _WORKER_STORES:
                # read the hit now and report only what came back: the step's load then cannot fail (see
                # _covers_an_image), and stays in the step (a parked request waits through empty steps)
                first = num_computed_tokens // self.block_size
                found = first + self.transfers.fetch(request.request_id, usable[first:found])
                external = found * self.block_size - num_computed_tokens
                if external <= 0:
                    return 0, False
            else:  # the worker is another process (it could not take what this one read): load asynchronously
                load_async = True
        self._waiting[request.request_id] = (request, num_computed_tokens, load_async)
        return external, load_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            self.transfers.drop_fetched(request.request_id)  # anything read ahead is for nothing: vLLM takes none
            return
        _, num_local, load_async = self._waiting[request.request_id]
        pending = _PendingLoad(request, num_local // self.block_size, num_external_tokens // self.block_size)
        if load_async:
            # the request waits (WAITING_FOR_REMOTE_KVS) with these blocks reserved: send them in the next step
            self._async_loads[request.request_id] = self._moves(pending, blocks.get_block_ids()[0])
        else:
            self._pending_loads[request.request_id] = pending

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = TierConnectorMetadata(async_loads=self._async_loads)
        self._async_loads = {}
        for new in scheduler_output.scheduled_new_reqs:
            waiting = self._waiting.pop(new.req_id, None)
            if waiting is None:
                continue
            request = waiting[0]
            state = self._tracked[new.req_id] = _Tracked(request, list(new.block_ids[0]), 0)
            self._take_loads(new.req_id, state, meta)
            # what vLLM had (its prefix cache, or loaded from the store) needs no saving
            state.saved_blocks = new.num_computed_tokens // self.block_size
            self._add_saves(state, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id], meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._tracked.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._waiting.pop(req_id, None)
                # back from preemption: its blocks were freed, this is the whole new list
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
                self._take_loads(req_id, state, meta)
                state.saved_blocks = cached.num_computed_tokens[i] // self.block_size
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            self._add_saves(state, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id], meta)
        self._drop_saved_already(meta)
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # saves copy their blocks out inside the step that computed them (wait_for_save): the blocks can go now.
        # An asynchronous load already sent still reports its request, which is when vLLM frees its blocks.
        for table in (self._waiting, self._tracked, self._pending_loads):
            table.pop(request.request_id, None)
        self.transfers.drop_fetched(request.request_id)
        return False, None

    def _moves(self, pending: _PendingLoad, block_ids: list[int]) -> list[BlockMove]:
        end = pending.first_block + pending.num_blocks
        keys = block_keys(self.namespace, pending.request.block_hashes[pending.first_block:end])
        return [BlockMove(block_ids[b], key) for b, key in zip(range(pending.first_block, end), keys)]

    def _take_loads(self, req_id: str, state: _Tracked, meta: TierConnectorMetadata) -> None:
        """Queue the pending synchronous load of ``req_id`` (if any) into this step."""
        pending = self._pending_loads.pop(req_id, None)
        if pending is not None:
            meta.loads.extend(self._moves(pending, state.block_ids))
            meta.fetched.append(req_id)  # the worker takes what the lookup read ahead for it, if anything

    def _add_saves(self, state: _Tracked, computed_after_step: int, meta: TierConnectorMetadata) -> None:
        """Queue the blocks this step completes: full, computed by the end of it, and hashed by vLLM."""
        full = min(computed_after_step // self.block_size, len(state.request.block_hashes), len(state.block_ids))
        first = state.saved_blocks
        if full <= first:
            return
        # keys of the new blocks and of the one before them (their chain parent): not the whole prefix each step
        start = max(0, first - 1)
        keys = block_keys(self.namespace, state.request.block_hashes[start:full])
        for b in range(first, full):
            parent = keys[b - 1 - start] if b else None
            meta.saves.append(BlockMove(state.block_ids[b], keys[b - start], parent))
        state.saved_blocks = full

    def _drop_saved_already(self, meta: TierConnectorMetadata) -> None:
        """A block another request (or engine) already stored, or is storing, is not copied again."""
        if meta.saves:
            keys = [m.key for m in meta.saves]
            held = [a or b for a, b in zip(self.store.contains_many(keys), self.transfers.pending(keys))]
            meta.saves = [m for m, h in zip(meta.saves, held) if not h]

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._paged = PagedBlocks(kv_caches, self._num_blocks, head_size=self.layout.head_size)
        self._staging = StagingBuffers(self._paged.entry_shape, self._paged.dtype)
        log.info("KV connector: %d layers, block entry %s %s (%d B), namespace %s, loads %s, saves %s",
                 len(kv_caches), self._paged.entry_shape, self._paged.dtype, self._paged.entry_nbytes,
                 self.namespace.hex[:12], self.load_mode, self.save_mode)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierConnectorMetadata)
        if self._paged is None:
            return
        for req_id, moves in meta.async_loads.items():
            self.transfers.submit_load(self._paged, moves, self.block_size,
                                       lambda result, req_id=req_id: self._async_load_done(req_id, result))
        if meta.loads:
            # what the lookup read ahead, then the rest on the transfer thread: after the queued saves of
            # these very blocks, if any
            fetched = {}
            for req_id in meta.fetched:
                fetched.update(self.transfers.take_fetched(req_id))
            result = self.transfers.load_now(self._paged, meta.loads, self.block_size, fetched)
            with self._lock:
                self._load_errors.update(result.failed_block_ids)
                self._record_load(result)

    def _async_load_done(self, req_id: str, result: LoadResult) -> None:
        with self._lock:
            self._loads_done.append((req_id, result.failed_block_ids))
            self._record_load(result)

    def _record_load(self, result: LoadResult) -> None:
        self._stats.record_load(result.tokens_per_tier, result.nbytes, result.seconds, len(result.failed_block_ids))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # a block entry holds every layer: it is loaded whole, before the forward pass or asynchronously

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # a block entry holds every layer: saved once the whole forward pass is done (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierConnectorMetadata)
        if not meta.saves or self._paged is None:
            return
        ids = [m.block_id for m in meta.saves]
        nbytes = len(ids) * self._paged.entry_nbytes
        if self.save_mode == "sync":
            t0 = time.perf_counter()
            saved = save_blocks(self.store, meta.saves, self._paged.gather(ids))
            with self._lock:
                self._stats.record_save(saved * self.block_size, saved * self._paged.entry_nbytes,
                                        time.perf_counter() - t0)
            return
        # the copy out of the paged KV happens now (vLLM may reuse the blocks after this step); the store's work
        # happens on the transfer thread while the engine goes on
        assert self._staging is not None
        t0 = time.perf_counter()
        buf = self._staging.acquire(len(ids))
        entries = self._paged.gather(ids, out=buf)
        # Counted now, as handed to the tiers: vLLM only collects stats in engine steps, and an engine that goes
        # idle right after this one would hold the counts of a save that finishes later until its next request.
        # The store's time follows with the next step's stats; a block the store then refuses is in its
        # counters (save_rejected), not here.
        with self._lock:
            self._stats.record_save(len(ids) * self.block_size, nbytes, time.perf_counter() - t0)
        staging = self._staging

        def done(saved: int, seconds: float) -> None:
            staging.release(buf)
            with self._lock:
                self._stats.record_save(0, 0, seconds)

        self.transfers.submit_save(meta.saves, entries, done)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # an asynchronous load's failed blocks are reported in the same step as its request (vLLM requires
        # them no later than that): both leave here under one lock
        with self._lock:
            done, self._loads_done = self._loads_done, []
            for _, failed in done:
                self._load_errors.update(failed)
        return None, ({req_id for req_id, _ in done} or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self.transfers.drain(timeout=60.0)

    # ================================================================ metrics (vLLM carries them)
    def get_kv_connector_stats(self) -> TierConnectorStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, TierConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TierConnectorStats:
        return TierConnectorStats(data=data) if data is not None else TierConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> TierConnectorPromMetrics:
        return TierConnectorPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


#: stores that a worker-side connector of this process uses: a lookup can hand them blocks it read ahead
_WORKER_STORES: "weakref.WeakSet[BlockStore]" = weakref.WeakSet()


def _covers_an_image(request: "Request", num_computed_tokens: int, external: int) -> bool:
    """Whether the external hit ends past the end of one of the request's images (or videos).

    Such a hit must not fail in a synchronous load: vLLM 0.32 sends the worker a new request without the pixel
    data of every item its computed tokens cover (``strip_covered_mm_data``), and counts a synchronous load's
    tokens as computed before the load has run. If that load then failed, vLLM would recompute the image's
    tokens with no pixels to encode and fail the whole engine step. So the lookup reads such a hit's blocks
    itself and reports only those it got (``BlockTransfers.fetch``; the step's load takes them from memory),
    or, where the worker runs in another process, the load is asynchronous (its outcome is known before vLLM
    builds the new request, so a failed one keeps the pixels)."""
    end = num_computed_tokens + external
    return any(num_computed_tokens < f.mm_position.offset + f.mm_position.length <= end
               for f in (request.mm_features or ()))


def _layout(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> KVLayout:
    from vllm.platforms import current_platform

    if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) != 1:
        raise ConfigError("the KV connector supports models with one KV cache group (full attention in every "
                          "layer, as Qwen3-VL has)")
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    dtype = str(spec.dtype).removeprefix("torch.")
    return KVLayout(num_layers=len(group.layer_names), num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
                    block_size=spec.block_size, dtype=dtype, platform=current_platform.device_type,
                    engine=vllm.__version__)
