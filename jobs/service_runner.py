"""The Ray service as a job runner, and the CLI's ``service`` / ``status`` calls.

Settings become the service's config here (``service_config``), so the CLI, the jobs and the workers read
the same table (``qwen3vl_ray.settings``). With ``engine = qwen3vl`` (the default) each worker runs the real
``Qwen3VLEngine`` through ``actors.engine_adapter``; any other ``module:callable`` is passed through (e.g.
``actors.synthetic_engine:SyntheticKVEngine``, a model-free KV workload).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from jobs.dataset import Item
from jobs.rows import service_row
from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from actors.pressure_report import NodeReport

logger = logging.getLogger(__name__)

# One gRPC call to the GCS answers in milliseconds; ray.init waits ~20 s on a token it lacks and minutes on
# an address where nothing listens.
PROBE_TIMEOUT_S = 5.0
#: ray.init attempts on a cluster the probe found answering, and the pause between them (seconds)
ATTACH_ATTEMPTS = 3
ATTACH_RETRY_S = 2.0
_START_HEAD = "start one with `ray start --head`, or pass --address (or RAY_ADDRESS) of a running cluster's head"
_TOKEN_FIX = ("set RAY_AUTH_MODE=token with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
              "(`ray get-auth-token` on the head prints it)")


def service_config(s: S.Settings, gpus_available: bool = False):
    """The ServiceConfig for these settings (``ServiceConfig.from_settings``): the default engine setting runs
    the real Qwen3-VL engine in the workers through the Ray layer's adapter, on a checkpoint resolved here."""
    from actors.config import ServiceConfig

    return ServiceConfig.from_settings(s, gpus_available)


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def check_cluster(address: str) -> str | None:
    """Raise ClusterError (one line: the address, the problem, the fix) when no Ray cluster answers at
    ``address`` (``host:port`` or ``auto``) or it needs a token this process does not send; else return the
    GCS address probed. Client addresses (``ray://``) and anything the probe cannot judge are left to
    ``ray.init``."""
    if address.startswith("ray://"):
        return _check_client_server(address)
    if "://" in address or address == "local":
        return None
    try:
        import grpc
        from ray._private import services
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray than the one this probe was written against: ray.init decides
        logger.debug("cannot probe the Ray cluster at %s", address, exc_info=True)
        return None
    try:
        gcs = services.canonicalize_bootstrap_address_or_die(address)
    except ConnectionError as e:
        if "multiple" in str(e):
            raise ClusterError(f"--address {address}: {e}") from None
        raise ClusterError(f"no Ray cluster is running on this machine (--address {address}); {_START_HEAD}"
                           ) from None
    except ValueError as e:
        raise ConfigError(f"--address {address!r} is not a Ray address ({e}); use auto, HOST:PORT or "
                          f"ray://HOST:10001") from None
    with grpc.insecure_channel(gcs) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S, metadata=_auth_metadata())
            return gcs
        except grpc.RpcError as e:
            code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        why = "connection refused" if code == grpc.StatusCode.UNAVAILABLE else f"no answer in {PROBE_TIMEOUT_S:g} s"
        raise ClusterError(f"no Ray cluster at {address} ({gcs}: {why}); {_START_HEAD}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if _auth_metadata():
            raise ClusterError(f"the Ray cluster at {address} rejected this process's token; put the cluster's "
                               f"token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` on the head "
                               f"prints it)")
        raise ClusterError(f"the Ray cluster at {address} requires token authentication and this process sends "
                           f"no token; {_TOKEN_FIX}")
    return gcs


def _check_client_server(address: str) -> None:
    """A Ray client address (``ray://host[:10001]``): only whether anything listens there (its protocol and
    token are ``ray.init``'s to check), so that a wrong one fails at once rather than after Ray's retries."""
    import socket

    hostport = address.removeprefix("ray://").split("/", 1)[0]
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise ClusterError(f"no Ray client server at {address} ({type(e).__name__}: {e}); {_START_HEAD} "
                           f"(ray://HOST:10001)") from None
    return None


def _auth_metadata() -> tuple:
    """The token header Ray's own clients send: only with RAY_AUTH_MODE=token, as Ray does."""
    try:
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple)
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:
        return ()
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return ()
    try:
        return _get_authentication_metadata_tuple()
    except Exception:  # ray.exceptions.AuthenticationError: the mode is on but no token is set
        raise ClusterError("RAY_AUTH_MODE=token but no token is set; put the cluster's token in "
                           "~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)"
                           ) from None


def _init_ray(s: S.Settings, address: str | None, quiet: bool = False) -> None:
    """``actors.service.attach_ray`` (the cluster at ``address`` / ``RAY_ADDRESS``, else an embedded Ray) with
    the settings' Prometheus port for an embedded one. Attaching, ``check_cluster`` first turns an address
    without a cluster or a missing token into one line, and an explicit ``--actor-log-level`` goes into the job's
    runtime env (``jobs.log_levels.actor_runtime_env``; an embedded Ray's actors inherit it from this process).
    ``quiet``: none of Ray's connection messages or the cluster's log lines (a command that prints a table)."""
    import ray

    from actors.service import attach_ray
    from jobs.log_levels import actor_runtime_env

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        if s.metrics_export_port:
            kwargs["_metrics_export_port"] = s.metrics_export_port
    else:
        check_cluster(address)
        runtime_env = actor_runtime_env(s)
        if runtime_env:
            kwargs["runtime_env"] = runtime_env
    if quiet:
        kwargs.update(logging_level=logging.WARNING, log_to_driver=False)
    # The probe above found the cluster answering: a connect that still fails is a busy head (its GCS or raylet
    # slow to answer while new actors start on a loaded node), so it is tried again before it is an error.
    attempts = 1 if address == "local" else ATTACH_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            attach_ray(address, **kwargs)
            return
        except ray.exceptions.AuthenticationError:
            raise ClusterError(f"the Ray cluster at {address} refused this process's authentication; "
                               f"{_TOKEN_FIX}") from None
        except ConnectionError as e:
            text = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            if attempt == attempts:
                raise ClusterError(f"cannot attach to the Ray cluster at {address}: {text}") from None
            # A head that went down meanwhile is the probe's one line now, not more attempts that each wait out
            # Ray's own connect timeouts (a minute or more, some of it in its C++ client's retries).
            check_cluster(address)
            logger.warning("attaching to the Ray cluster at %s failed (%s); trying again", address, text)
            time.sleep(ATTACH_RETRY_S)


def ensure(s: S.Settings, num_workers: int | None = None):
    """Attach to (or start) Ray and make sure the service exists; returns the service handle."""
    import ray

    from actors.service import ensure_service

    # One line, before anything is generated or started: the cluster to attach to (if any), then the model
    # (a bad --model would otherwise be a worker's abort after Ray started).
    address = s.address or os.environ.get("RAY_ADDRESS")
    if address and not ray.is_initialized():
        check_cluster(address)
    if s.engine == "qwen3vl":
        S.resolve_checkpoint(s)
    _init_ray(s, s.address)
    cfg = service_config(s, _cluster_has_gpus())
    # Ray is initialised above, so ensure_service only creates (or finds) the actors.
    return ensure_service(cfg, num_workers=s.num_workers if num_workers is None else num_workers,
                          worker_start_timeout_s=s.worker_start_timeout_s)


def start_service(s: S.Settings) -> dict:
    """Start (or reuse) the detached service on the cluster at ``--address`` / ``RAY_ADDRESS``. Refused
    without one: on an embedded Ray the detached actors would stop with this command."""
    if (s.address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        raise ConfigError("`service` needs a running Ray cluster: pass --address (auto, or the head's host:port) "
                          "or set RAY_ADDRESS; an embedded Ray and its service would stop with this command "
                          "(`ray start --head` starts a local cluster)")
    handle = ensure(s)
    return handle.state()


class ServiceRunner:
    """Rows -> the Ray service (coordinator routes, workers generate, agents hold host and disk tiers)."""

    name = "service"

    def __init__(self, settings: S.Settings):
        if settings.num_workers < 1:  # 0 suits `qwen3vl-ray service` only: a job needs a worker to run on
            raise ConfigError(f"num_workers must be > 0 for a job, got {settings.num_workers}")
        self.settings = settings
        self.handle = ensure(settings)

    def run(self, items: list[Item], session: str | None = None) -> list[dict]:
        requests = [{"id": it.id, "messages": it.messages, "session_id": session,
                     "sampling": S.sampling_kwargs(self.settings)} for it in items]
        # A bad row (a corrupt image, malformed messages, no room in the cluster) comes back with its error;
        # the service runs the others.
        results = self.handle.process(requests)
        rows = [service_row(it.id, r) for it, r in zip(items, results)]
        if session is not None and any(r.error for r in results):
            self.handle.release(session)  # a broken chat holds no reservation
        return rows

    def end_session(self, session: str) -> None:
        """The chat is over: release its admission reservation (its KV stays cached as cold entries)."""
        self.handle.release(session)

    def stats(self) -> dict:
        return cluster_status_from(self.handle)

    def close(self) -> None:
        # The service is detached and stays up for the next job; only this driver's connection goes.
        pass


def cluster_status(address: str) -> dict:
    """The status of this environment's tenant's service (``QWEN3VL_RAY_TENANT`` / ``_KEY``) on the cluster."""
    s = S.resolve({"address": address})
    _init_ray(s, address, quiet=True)
    from actors.config import NAMESPACE
    from actors.coordinator import coordinator_name
    from actors.tenancy import Tenant, with_tenant
    import ray

    tenant = Tenant.from_settings(s)
    try:
        coordinator = with_tenant(ray.get_actor(coordinator_name(tenant), namespace=NAMESPACE), tenant)
    except ValueError:
        who = "" if tenant.is_default else f" of tenant {tenant.name!r}"
        raise ClusterError(f"no qwen3vl-ray coordinator{who} on the Ray cluster at {address}; start it with "
                           f"`qwen3vl-ray service --address {address}`") from None
    return _collect(ray.get(coordinator.state.remote()), tenant)


def cluster_status_from(handle: Any) -> dict:
    return _collect(handle.state(), handle.config.tenant)


def _collect(state: dict, tenant: Any) -> dict:
    """Coordinator state plus each agent's pressure report (per tier: used, capacity, entries, ...)."""
    import ray

    from actors.config import NAMESPACE
    from actors.node_agent import agent_name
    from actors.tenancy import with_tenant

    nodes = {}
    for node in state.get("nodes", []):
        try:
            agent = with_tenant(ray.get_actor(agent_name(node, tenant), namespace=NAMESPACE), tenant)
            report, stats = ray.get([agent.pressure.remote(), agent.stats.remote()], timeout=30)
            nodes[node] = _merge_stats(report, stats)
        except Exception as e:  # a dead agent is a row saying so, not a failed status
            nodes[node] = {"error": f"{type(e).__name__}: {e}"}
    from actors.worker import device_stats_of

    # the workers' own device tiers: no agent holds them
    devices = device_stats_of(sorted(state.get("workers") or {}), tenant)
    return {"coordinator": state, "nodes": nodes, "devices": devices}


# Not the tiers' own hit counters: the agent serves chunks by reference (get_chunks), which those do not
# count; its own counts of those (``served``) become each tier's ``served_hits`` (and the agent's misses),
# and the ``hits``/``misses`` that ``status`` and ``demo`` show.
_STAT_KEYS = ("compression_ratio", "bytes_read", "bytes_written", "codec")


def _merge_stats(report: NodeReport, stats: dict) -> dict:
    """Pressure report (``NodeReport.to_dict``: used/capacity/entries/watermarks per tier) + the agent's tier
    stats (hits, codec, compression) in one JSON-ready dict per tier.

    The agent looks a chunk up top-down (host, then disk), so a tier's misses are the lookups that reached it
    and were not found there: the hits of the tiers below it plus the agent's misses."""
    out = report.to_dict()
    per_tier = {t.get("name"): t for t in (stats.get("cache") or {}).get("tiers", []) if isinstance(t, dict)}
    served = stats.get("served") or {}
    served_hits = served.get("hits") or {}
    if "misses" in served:
        out["served_misses"] = served["misses"]
    names = list(out["tiers"])
    for j, name in enumerate(names):
        tier = out["tiers"][name]
        if name in served_hits:
            tier["served_hits"] = served_hits[name]
            if "misses" in served:
                tier["hits"] = served_hits[name]
                tier["misses"] = sum(served_hits.get(n, 0) for n in names[j + 1:]) + served["misses"]
        for src in (stats.get(name) or {}, per_tier.get(name) or {}):
            for k in _STAT_KEYS:
                if k in src and k not in tier:
                    tier[k] = src[k]
    return out
