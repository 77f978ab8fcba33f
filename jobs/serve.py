"""``qwen3vl-ray serve``: an OpenAI-compatible endpoint (Ray Serve LLM, vLLM) with the tiers as its KV cache.

    qwen3vl-ray serve --model tiny                       # embedded Ray, http://127.0.0.1:8000/v1
    qwen3vl-ray serve --address auto --num-workers 4     # a running cluster: one replica per GPU

Each replica is a vLLM engine (``ray.serve.llm``'s ``LLMServer``) whose KV connector keeps blocks on the node
agents (``store="ray"``: ``actors.kv_block_store``), so every replica on every node finds what any of them stored,
and a restarted replica finds it again. Requests go to the replica whose node holds the longest cached prefix of
the prompt (``actors.prefix_router``). One replica per GPU on a GPU cluster; on a CPU-only one, ``--num-workers``
replicas of one CPU each. Runs until Ctrl-C, then removes the application (an embedded Ray stops with it).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.engine_platform import CPU_BLOCK_SIZE, engine_platform, platform_engine_kwargs
from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ConfigError

logger = logging.getLogger(__name__)

APP_NAME = "qwen3vl-ray"

#: settings the endpoint does not use: vLLM's paged KV is the device level, the replicas are not the project's
#: workers, and the device follows the cluster (a GPU per replica when it has GPUs)
IGNORED_OPTIONS = ("device", "device_bytes", "device_codec", "prefix_cache", "vision_cache", "engine", "worker_gpus",
                   "worker_cpus", "worker_start_timeout_s", "max_retries", "batch_size")


@dataclass(frozen=True)
class ServeConfig:
    """What ``serve`` deploys.

    Attributes:
        model_path: the checkpoint directory (each replica's node must have it at this path).
        model_id: the name clients put in ``"model"`` (default: the ``--model`` setting's last path part).
        num_replicas: vLLM engines (``--num-workers``; without it, one per GPU of a GPU cluster).
        on_gpu: replicas take one GPU each; else one CPU each.
        platform: vLLM's platform where the replicas run (``jobs.engine_platform``): ``cuda`` (bf16 by default,
            vLLM's defaults) or ``cpu`` (float32 by default; eager mode, an explicit KV cache of
            ``kv_cache_bytes``, a block size that is a multiple of 32).
        kv_cache_bytes: vLLM's own KV cache per replica on CPU (settings ``kv_device_budget_bytes``).
        dtype: model and KV dtype (the settings' ``dtype``, auto resolved for the replicas' device).
        block_size: vLLM's KV block size in tokens (default 32; vLLM's CPU attention needs a multiple of 32); the
            connector's blocks and the router's keys are whole blocks of it.
        max_model_len: longest prompt plus answer, tokens (default 4096).
        host, port: where Serve's HTTP proxy listens (default 127.0.0.1:8000; a cluster's Serve keeps the
            options it was first started with).
        connector: the KV connector's extra config (``store="ray"`` and the settings' tier options, resolved here
            so every replica uses the values this command saw, not its node's environment).
        router: the request router's kwargs (``actors.prefix_router.PrefixRouterConfig``); None: Serve's default
            (power of two choices).
        env: environment of the replicas' processes: these settings as ``QWEN3VL_RAY_*`` variables, and
            ``RAY_ADDRESS`` (vLLM's engine core runs in a process of its own under the replica; its connector
            attaches to this cluster through it instead of starting an embedded Ray).
    """

    model_path: str
    model_id: str
    num_replicas: int
    on_gpu: bool
    dtype: str
    platform: str = "cpu"
    kv_cache_bytes: int = 1 << 30
    block_size: int = 32
    max_model_len: int = 4096
    host: str = "127.0.0.1"
    port: int = 8000
    connector: dict = field(default_factory=dict)
    router: dict | None = None
    env: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ConfigError(f"serve needs at least one replica: --num-workers must be > 0, got {self.num_replicas}")
        if self.block_size < 1 or (self.platform == "cpu" and self.block_size % CPU_BLOCK_SIZE):
            raise ConfigError(f"--block-size must be a positive multiple of 32 on CPU (vLLM's CPU attention), "
                              f"got {self.block_size}")
        if self.max_model_len < self.block_size:
            raise ConfigError(f"--max-model-len ({self.max_model_len}) must be at least --block-size "
                              f"({self.block_size})")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def llm_config(self):
        """The ``ray.serve.llm.LLMConfig`` of the replicas."""
        from ray.serve.llm import LLMConfig

        from qwen3vl_ray.serving.connector_config import kv_transfer_config

        engine_kwargs: dict[str, Any] = {
            "dtype": self.dtype, "block_size": self.block_size, "max_model_len": self.max_model_len,
            "kv_transfer_config": kv_transfer_config(**self.connector),
            # usage.prompt_tokens_details.cached_tokens in every answer: what vLLM's cache and the tiers served
            "enable_prompt_tokens_details": True,
        }
        # the CPU platform's needs (eager, an explicit KV cache); this config's own block size wins
        engine_kwargs.update({k: v for k, v in platform_engine_kwargs(self.platform, self.kv_cache_bytes).items()
                              if k != "block_size"})
        deployment: dict[str, Any] = {"num_replicas": self.num_replicas}
        if self.router is not None:
            deployment["request_router_config"] = {
                "request_router_class": "actors.prefix_router:DirectoryPrefixRouter",
                "request_router_kwargs": self.router}
        bundle = {"GPU": 1, "CPU": 1} if self.on_gpu else {"CPU": 1}
        return LLMConfig(model_loading_config={"model_id": self.model_id, "model_source": self.model_path},
                         placement_group_config={"bundles": [bundle]}, deployment_config=deployment,
                         engine_kwargs=engine_kwargs, runtime_env={"env_vars": dict(self.env)})

    def app(self):
        """The Serve application: Ray's OpenAI ingress in front of the replicas."""
        from ray.serve.llm import build_openai_app

        # The ingress only parses, routes and streams: no CPU reserved (as Ray's own LLMRouter ingress), so that on
        # a CPU-only cluster every CPU can go to a replica.
        return build_openai_app({"llm_configs": [self.llm_config()],
                                 "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})


def serve_config(s: S.Settings, model_path: str, on_gpu: bool, platform: str, ray_address: str | None, *,
                 model_id: str | None = None,
                 block_size: int = 32, max_model_len: int = 4096, host: str = "127.0.0.1", port: int = 8000,
                 route: bool = True) -> ServeConfig:
    """The ``ServeConfig`` of the settings, for replicas on GPUs (``on_gpu``) or CPUs of the cluster at
    ``ray_address`` (its GCS address, for the replicas' own processes), running vLLM on ``platform``."""
    from actors.prefix_router import PrefixRouterConfig, connector_namespace
    from qwen3vl_ray.engine.checkpoint import model_fingerprint
    from qwen3vl_ray.serving.connector_config import CONNECTOR_OPTIONS

    dtype = S.resolved_dtype(s, on_cuda=platform == "cuda")
    connector = {"store": "ray", **{name: s[name] for name in CONNECTOR_OPTIONS}}
    # The replicas' connectors start (or check) the service from their settings: give them this command's, so a
    # node's own environment cannot make them disagree with the service started here. Never the tenant's key:
    # runtime_env shows in the dashboard (the nodes' environment carries it, as for every actor of the tenant).
    env = {k: v for k, v in s.to_env().items() if k not in (S.option("tenant_key").env, S.option("address").env)}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    router = None
    if route:
        # the router keys prompts as the connector keys blocks: same fingerprint, layout, codecs and tenant
        fingerprint = model_fingerprint(model_path, full=s.fingerprint == "full")
        namespace = connector_namespace(model_path, fingerprint, block_size, dtype, platform,
                                        s.host_codec, s.disk_codec, s.tenant)
        router = PrefixRouterConfig(model_path=model_path, block_size=block_size, tenant=s.tenant, namespace={
            k: getattr(namespace, k) for k in ("model", "dtype", "layout", "codec", "tenant")}).to_kwargs()
    return ServeConfig(model_path=model_path, model_id=model_id or os.path.basename(s.model.rstrip("/")),
                       num_replicas=s.num_workers, on_gpu=on_gpu, dtype=dtype, platform=platform,
                       kv_cache_bytes=s.kv_device_budget_bytes, block_size=block_size,
                       max_model_len=max_model_len, host=host, port=port, connector=connector, router=router, env=env)


def start(s: S.Settings, **options: Any) -> ServeConfig:
    """Attach to the cluster (or start an embedded Ray), make sure the coordinator and node agents run, deploy the
    endpoint and wait until it answers; returns its config (``.url``). ``options`` go to ``serve_config``."""
    import ray
    from ray import serve

    from jobs.service_runner import ensure

    # one line, before Ray starts, for the common mistakes: no replica, a bad --model
    if s.num_workers < 1:
        raise ConfigError(f"serve needs at least one replica: --num-workers must be > 0, got {s.num_workers}")
    model_path = S.resolve_checkpoint(s)
    ensure(s, num_workers=0)  # the directory and the agents the connector and the router use; no project workers
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = gpus > 0
    if on_gpu and s.source("num_workers") == "default":
        s = s.replace(num_workers=gpus)  # one replica per GPU of the cluster unless told otherwise
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a Ray Client driver has none; the replicas' own RAY_ADDRESS then applies
        address = os.environ.get("RAY_ADDRESS")
    platform = engine_platform(on_gpu, s.worker_start_timeout_s)
    config = serve_config(s, model_path, on_gpu, platform, address, **options)
    serve.start(http_options={"host": config.host, "port": config.port})
    t0 = time.monotonic()
    serve.run(config.app(), name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("endpoint up in %.0f s", time.monotonic() - t0)
    return config


def main(argv: list[str] | None = None, prog: str = "qwen3vl-ray serve") -> int:
    from jobs.log_levels import apply_log_levels

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address [default 127.0.0.1]")
    p.add_argument("--port", type=int, default=8000, help="HTTP port [default 8000]")
    p.add_argument("--model-id", help="model name clients send [default the --model setting's last path part]")
    p.add_argument("--block-size", type=int, default=32, help="vLLM KV block size, tokens [default 32]")
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + answer limit, tokens [default 4096]")
    p.add_argument("--no-prefix-routing", action="store_true",
                   help="Serve's default router (power of two choices) instead of routing by cached prefix")
    # the options a vLLM replica, its connector and the service honour; the rest (the project's own engine and
    # workers) would be silently ignored, so they are not offered
    S.add_arguments(p, sections=["model", "tiers", "cache", "service", "jobs"], skip=IGNORED_OPTIONS)
    args = p.parse_args(argv)
    s = S.from_args(args)
    apply_log_levels(s)
    embedded = (s.address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    config = start(s, model_id=args.model_id, block_size=args.block_size, max_model_len=args.max_model_len,
                   host=args.host, port=args.port, route=not args.no_prefix_routing)
    print(f"serving {config.model_id} at {config.url} ({config.num_replicas} replica(s)); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    from ray import serve

    # an attached cluster keeps running: take the endpoint off it (an embedded Ray ends with this process anyway)
    if embedded:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
