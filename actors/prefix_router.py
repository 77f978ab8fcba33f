"""Ray Serve request router: a request goes to a replica on the node holding its longest cached prefix, as the
coordinator's directory of stored KV blocks says.

How it decides (``DirectoryPrefixRouter.choose_replicas``):

1. **Keys.** The router renders the request as vLLM's OpenAI frontend does (the checkpoint's chat template to
   text, then tokens without special tokens; a completion's prompt with them), cuts the token ids into full
   blocks and hashes them with vLLM's own ``hash_block_tokens``, hash function and ``NONE_HASH`` seed, then keys
   them under the connector's namespace (``qwen3vl_ray.serving.block_keys``). These are the very keys
   ``TierKVConnector`` stores blocks under, so routing needs no index of its own.
2. **Directory.** One batched ``lookup`` on the tenant's coordinator: per key, the node whose agent holds it.
   Per node, the number of blocks it holds in the request's cluster-wide held prefix (up to the first block held
   nowhere).
3. **Ranks.** Replicas on the node holding the most come first, then the other holding nodes, then two random
   replicas (power of two choices). Serve's base class takes the least-loaded replica with room in the first
   rank that has one, so a saturated node hands its requests to the next rank instead of queueing them.
   No held prefix, a failed lookup or an unparseable request: two random replicas, as Serve's default router.

Why vLLM's block hashes and not the project's text-only chunk keys (``qwen3vl_ray.keys.chunk_keys``): the
directory holds what the connector stored, keyed by vLLM's block hashes; chunk keys are another key space, which
nothing under vLLM writes, so they would never be found. Computing the hashes is cheap: one tokenizer pass and one
sha256 per block, off the event loop. **Where it stops**: at the first image or video token. A block holding
image tokens is hashed with the image's ``mm_hash`` (a blake3 of the decoded pixels and processor settings) and
the image's token count depends on the processor's resize; reproducing that means decoding images in the router.
So the leading text blocks (system prompt, earlier text turns) decide; a prompt that opens with an image is
load-balanced. Routing only ever changes where a request runs: keys that miss (another chat template, tools,
LoRA) cost locality, never correctness.

Compared with Ray's ``PrefixCacheAffinityRouter`` (``ray.llm._internal.serve.routing_policies.prefix_aware``):
that router keeps a prefix tree of the request *text* it sent to each *replica* (in a detached actor) and sends a
request to the replica with the longest matching characters while load is balanced. It knows only what it
routed: a restarted replica's entries are dropped with it, blocks that vLLM evicted stay in the tree, and
images are ignored. This router reads the cluster-wide directory of KV blocks actually stored on the node agents:
it survives replica restarts (blocks live on the agents, and their disk tiers survive the agents), sees blocks
that any replica, deployment or batch job of the same model and tenant stored, forgets what the agents evicted,
and scores nodes, since every replica on a node reads that node's agent without a network transfer. What it does
not see is each replica's own vLLM prefix cache (accelerator memory); the connector saves every full block to
the agents as soon as it is computed, so the directory knows of those blocks too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from qwen3vl_ray.keys import CacheKey, Namespace
from qwen3vl_ray.serving.block_keys import KVLayout, block_keys, block_namespace, codec_tag

# Under Serve's logger: Serve writes only its own loggers' records into the replica logs (logs/serve/), where
# whoever runs the endpoint looks for why routing degraded.
logger = logging.getLogger("ray.serve." + __name__)

R = TypeVar("R")  # a replica (Serve's RunningReplica, or a test's stand-in)

#: vLLM hash functions whose NONE_HASH seed is fixed across processes without PYTHONHASHSEED
_SHAREABLE_HASHES = ("sha256", "sha256_cbor")


@dataclass(frozen=True)
class PrefixRouterConfig:
    """What the router needs to compute the connector's keys and reach the directory. Goes to Serve as
    ``request_router_kwargs`` (plain JSON types, shown in Serve's config: no secrets here; a non-default tenant's
    key is read from ``QWEN3VL_RAY_TENANT_KEY`` in the router's environment, as the connector reads it).

    Attributes:
        model_path: checkpoint directory on the router's node (tokenizer, chat template, config.json).
        block_size: vLLM's KV block size in tokens (the engine's ``block_size``).
        namespace: the connector's block namespace as ``Namespace`` fields (``connector_namespace``).
        tenant: tenant name; its coordinator holds the directory.
        hash_algo: vLLM's ``prefix_caching_hash_algo`` (default ``sha256``); only algorithms whose seed is shared
            across processes (sha256, sha256_cbor) can be reproduced here.
        lookup_timeout_s: longest wait for the directory (seconds, default 1.0); past it the request is
            load-balanced.
        min_blocks: held blocks a node needs before it is preferred (default 1).
    """

    model_path: str
    block_size: int
    namespace: dict
    tenant: str = "default"
    hash_algo: str = "sha256"
    lookup_timeout_s: float = 1.0
    min_blocks: int = 1

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.min_blocks <= 0 or self.lookup_timeout_s <= 0:
            raise ValueError(f"block_size ({self.block_size}), min_blocks ({self.min_blocks}) and lookup_timeout_s "
                             f"({self.lookup_timeout_s}) must be positive")
        if self.hash_algo not in _SHAREABLE_HASHES and os.environ.get("PYTHONHASHSEED") is None:
            raise ValueError(f"hash_algo {self.hash_algo!r} seeds vLLM's block hashes at random per process unless "
                             f"PYTHONHASHSEED is set; use one of {', '.join(_SHAREABLE_HASHES)}")

    def to_kwargs(self) -> dict:
        return asdict(self)


def connector_namespace(model_path: str, fingerprint: str, block_size: int, dtype: str, platform: str,
                        host_codec: str, disk_codec: str, tenant: str) -> Namespace:
    """The namespace ``TierKVConnector`` keys this model's blocks under, derived without starting vLLM.

    Mirrors ``TierKVConnector.__init__`` and ``kv_connector._layout`` (which read vLLM's KV cache spec): one
    attention layer per text layer, the text model's KV heads (no tensor parallelism) and head size, the model
    dtype (vLLM's ``kv_cache_dtype="auto"``). tests/test_serve.py checks the two agree on a running engine."""
    import vllm

    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    layout = KVLayout.from_text_config(config.get("text_config", config), block_size, dtype, platform, vllm.__version__)
    return block_namespace(fingerprint, layout, codec_tag(host_codec, disk_codec), tenant)


class PromptKeys:
    """A request body -> the connector's keys of its leading text-only blocks (see the module docstring)."""

    def __init__(self, config: PrefixRouterConfig) -> None:
        from transformers import AutoTokenizer
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import resolve_none_hash_seed

        self.block_size = config.block_size
        self.namespace = Namespace(**config.namespace)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self._hash = get_hash_fn_by_name(config.hash_algo)
        # vLLM's NONE_HASH is a module global set when an engine starts; this process runs none, so derive it the
        # same way instead of relying on (or setting) the global
        self._none_hash = self._hash(resolve_none_hash_seed(self._hash))
        with open(os.path.join(config.model_path, "config.json")) as f:
            model_config = json.load(f)
        self._stop_ids = {model_config[k] for k in ("vision_start_token_id", "image_token_id", "video_token_id")
                          if isinstance(model_config.get(k), int)}

    def token_ids(self, body: Any) -> list[int] | None:
        """The prompt's token ids as vLLM's frontend renders them, up to the first image or video token; None
        when this router cannot reproduce the rendering (tools, a request-supplied chat template)."""
        messages = getattr(body, "messages", None)
        if messages is not None:
            if getattr(body, "tools", None) or getattr(body, "chat_template", None):
                return None
            text = self.tokenizer.apply_chat_template(
                [_plain_message(m) for m in messages], tokenize=False,
                add_generation_prompt=getattr(body, "add_generation_prompt", True),
                continue_final_message=getattr(body, "continue_final_message", False),
                **(getattr(body, "chat_template_kwargs", None) or {}))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            prompt = getattr(body, "prompt", None)
            if not isinstance(prompt, str):
                return None
            ids = self.tokenizer.encode(prompt, add_special_tokens=getattr(body, "add_special_tokens", True))
        cut = next((i for i, t in enumerate(ids) if t in self._stop_ids), len(ids))
        return ids[:cut]

    def keys(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[CacheKey]:
        """Keys of the full blocks of ``token_ids``, chained as vLLM chains its block hashes."""
        bs, parent, hashes = self.block_size, self._none_hash, []
        for b in range(len(token_ids) // bs):
            # vLLM salts the first block only (kv_cache_utils.generate_block_hash_extra_keys)
            extra = (("cache_salt", cache_salt),) if b == 0 and cache_salt else None
            parent = self._hash((parent, tuple(token_ids[b * bs:(b + 1) * bs]), extra))
            hashes.append(parent)
        return block_keys(self.namespace, hashes)

    def for_request(self, body: Any) -> list[CacheKey]:
        ids = self.token_ids(body)
        return [] if ids is None else self.keys(ids, getattr(body, "cache_salt", None))


def _plain_message(message: Any) -> dict:
    """A chat message as the template sees it: a dict, image and video parts as ``{"type": "image"}`` /
    ``{"type": "video"}`` (their placeholder tokens end the routed prefix, so their contents never matter)."""
    m = dict(message) if isinstance(message, dict) else message.model_dump(exclude_none=True)
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for p in content:
            p = dict(p) if isinstance(p, dict) else p.model_dump(exclude_none=True)
            kind = p.get("type", "")
            if kind == "text":
                parts.append({"type": "text", "text": p.get("text", "")})
            elif "video" in kind:
                parts.append({"type": "video"})
            elif "image" in kind:
                parts.append({"type": "image"})
        m["content"] = parts
    return m


def held_by_node(holders: Sequence[str | None]) -> dict[str, int]:
    """Per node, how many blocks of the held prefix it holds: ``holders`` is the directory's node per key (None:
    held nowhere), and the prefix ends at the first None (a later block cannot be used without it)."""
    held: dict[str, int] = defaultdict(int)
    for node in holders:
        if node is None:
            break
        held[node] += 1
    return dict(held)


def rank_replicas(held: dict[str, int], replicas: Sequence[R], node_of: Callable[[R], str | None],
                  min_blocks: int = 1, fallback: int = 2) -> list[list[R]]:
    """Replicas grouped best first: one rank per holding node, most held blocks first (node id breaks ties, so the
    order is stable), then ``fallback`` random replicas off those nodes."""
    by_node: dict[str, list[R]] = defaultdict(list)
    for r in replicas:
        by_node[node_of(r)].append(r)
    nodes = sorted((n for n, c in held.items() if c >= min_blocks and by_node.get(n)), key=lambda n: (-held[n], n))
    ranks = [by_node[n] for n in nodes]
    preferred = set(nodes)
    rest = [r for r in replicas if node_of(r) not in preferred]
    if rest:
        ranks.append(random.sample(rest, min(fallback, len(rest))))
    return ranks


class PrefixRouting:
    """The router's logic without Serve: request -> keys -> directory -> ranked replicas. ``lookup`` is the
    coordinator's ``lookup`` (awaitable: per key ``(node, tier)`` or None)."""

    def __init__(self, keys_for: Callable[[Any], list[CacheKey]],
                 lookup: Callable[[list[CacheKey]], Awaitable[list[tuple[str, str] | None]]],
                 config: PrefixRouterConfig) -> None:
        self.keys_for, self.lookup, self.config = keys_for, lookup, config
        self._warned: set[str] = set()

    async def rank(self, body: Any, replicas: Sequence[R], node_of: Callable[[R], str | None]) -> list[list[R]]:
        held: dict[str, int] = {}
        try:
            keys = await asyncio.to_thread(self.keys_for, body)  # tokenizing a long prompt: off the event loop
            if keys:
                located = await asyncio.wait_for(self.lookup(keys), self.config.lookup_timeout_s)
                held = held_by_node([loc[0] if loc is not None else None for loc in located])
        except Exception as e:  # noqa: BLE001 - routing degrades to load balancing, never fails a request
            self._warn_once(type(e).__name__, "prefix routing unavailable (%s); load-balancing instead", e)
        return rank_replicas(held, replicas, node_of, self.config.min_blocks)

    def _warn_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(msg, *args, exc_info=True)


try:
    from ray.serve.request_router import RequestRouter
except ImportError:  # Serve not installed: the logic above stays usable
    RequestRouter = object  # type: ignore[assignment,misc]


class DirectoryPrefixRouter(RequestRouter):  # type: ignore[misc,valid-type]
    """Serve's request router over ``PrefixRouting``. Configure with ``request_router_config={
    "request_router_class": "actors.prefix_router:DirectoryPrefixRouter", "request_router_kwargs":
    PrefixRouterConfig(...).to_kwargs()}`` (``jobs.serve`` does)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._config = PrefixRouterConfig(**kwargs)
        self._routing: PrefixRouting | None = None
        self._setup_warned = False

    def _get_routing(self) -> PrefixRouting:
        # built on first use: the tokenizer load and the coordinator lookup need not slow replica start-up
        if self._routing is None:
            import ray

            from actors.config import NAMESPACE
            from actors.coordinator import coordinator_name
            from actors.tenancy import Tenant, with_tenant
            from qwen3vl_ray import settings as settings_mod

            tenant = Tenant.from_settings(settings_mod.resolve({"tenant": self._config.tenant}))
            coordinator = with_tenant(ray.get_actor(coordinator_name(tenant), namespace=NAMESPACE), tenant)

            async def lookup(keys: list[CacheKey]) -> list[tuple[str, str] | None]:
                return await coordinator.lookup.remote(keys)

            self._routing = PrefixRouting(PromptKeys(self._config).for_request, lookup, self._config)
            logger.info("prefix router ready: blocks of %d tokens, namespace %s, tenant %s", self._config.block_size,
                        Namespace(**self._config.namespace).hex[:12], tenant.name)
        return self._routing

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # when every rank is full, Serve retries with backoff instead of spinning
            pending_request.routing_context.should_backoff = True
        body = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if body is None:
            return rank_replicas({}, candidate_replicas, _node_of)
        try:
            routing = self._get_routing()
        except Exception as e:  # noqa: BLE001 - no coordinator (yet) or no tokenizer: load-balance, retry next time
            if not self._setup_warned:
                self._setup_warned = True
                logger.warning("prefix routing unavailable (%s); load-balancing instead", e, exc_info=True)
            return rank_replicas({}, candidate_replicas, _node_of)
        return await routing.rank(body, candidate_replicas, _node_of)


def _node_of(replica: Any) -> str | None:
    return replica.node_id
