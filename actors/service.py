"""Start-up helper and client of the Ray service (used by the CLI and the jobs).

``ensure_service`` attaches to the running cluster (``address`` or ``RAY_ADDRESS``) or starts an embedded one
(``ray.init()`` with no address), then makes sure the coordinator, one agent per alive node (the coordinator
creates them) and ``num_workers`` workers exist. Everything is named and detached in the ``qwen3vl_ray``
namespace and created with ``get_if_exists``, so a second call reuses what is there.

``ServiceHandle.process`` computes each request's keys and KV size on the client (a bad request gets its own
error result), reserves the size at the coordinator (admission control: back-pressure, then reject or queue),
routes it through the coordinator and retries a request whose worker died on another worker. Those decisions are
``actors.service_logic.ServiceLogic``'s (plain Python, tested without Ray); ``RayServicePort`` is its remote
calls. Ray's token authentication stays on (its default); nothing here disables it.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
import uuid
from typing import Any, Callable, Sequence

from actors.config import NAMESPACE, ServiceConfig
from actors.config_check import agent_fields, check_same_config, coordinator_fields, worker_fields
from actors.coordinator import coordinator_name, get_or_create_coordinator, is_worker_of, worker_prefix
from actors.tenancy import Tenant, with_tenant
from actors.errors import ServiceStartError, WorkersUnavailableError, remote_cause
from actors.results import RequestResult
from actors.service_logic import Route, ServiceLogic, WorkerLostError, WorkerRaisedError
from actors.worker import worker_class, worker_options

logger = logging.getLogger(__name__)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServiceHandle:
    """Client side: validates requests before any remote call, routes, retries on worker failure."""

    def __init__(self, coordinator: Any, workers: dict[str, Any], config: ServiceConfig) -> None:
        self.coordinator = coordinator
        self.workers = workers
        self.config = config
        module, _, name = config.worker.engine.partition(":")
        cls = getattr(importlib.import_module(module), name)
        # Routing by cached prefix needs the request's keys on the client; an engine that cannot compute them
        # without its model (no ``route_keys``) is routed by load only.
        self._route_keys = getattr(cls, "route_keys", None)
        self._kv_bytes = getattr(cls, "kv_bytes", None)  # admission size of a request without a keyer
        self._keyer: Any = False  # not asked yet; see _request_keyer
        self.port = RayServicePort(coordinator, self._worker)
        self.logic = ServiceLogic(self.port, self.plan, config.worker.max_retries)

    def _worker(self, name: str) -> Any:
        import ray

        h = self.workers.get(name)
        if h is None:
            h = self.workers[name] = with_tenant(ray.get_actor(name, namespace=NAMESPACE), self.config.tenant)
        return h

    def _request_keyer(self) -> Any:
        """A ``RequestKeyer`` configured exactly like the running workers' engine (checkpoint and resolved
        engine config asked from a worker, so driver-side defaults such as ``dtype="auto"`` cannot make the
        keys differ); None when no worker has one or it cannot be built here."""
        if self._keyer is not False:
            return self._keyer
        import ray

        self._keyer = None
        for name, h in list(self.workers.items()):
            try:
                spec = ray.get(h.routing_spec.remote(), timeout=30)
            except Exception:
                logger.info("worker %s did not give its routing spec; asking another", name, exc_info=True)
                continue
            if spec is None:
                break
            try:
                from qwen3vl_ray.engine.request_keys import RequestKeyer

                self._keyer = RequestKeyer(spec.checkpoint_path, spec.config, fingerprint=spec.fingerprint)
            except Exception:
                logger.warning("cannot build request keys for %s here; routing by load only",
                               spec.checkpoint_path, exc_info=True)
            break
        return self._keyer

    def keys_for(self, request: dict) -> list:
        """The request's chunk keys for routing by longest cached prefix (see ``plan``)."""
        return self.plan(request)[0]

    def plan(self, request: dict) -> tuple[list, int]:
        """``(chunk keys, KV bytes to reserve)`` of a request, computed on the client before any remote call.

        Keys: the real engine's computed by a ``RequestKeyer`` (tokenizer and processor only, no weights),
        other engines' by their ``route_keys``; keys that cannot be computed on this machine degrade to
        routing by load. Bytes: (prompt tokens + ``max_new_tokens``) x the model's KV bytes per token, or the
        engine's ``kv_bytes(request)``; 0 when unknown (admission then only sees other sessions). A bad
        request raises here, naming what is wrong."""
        if not isinstance(request, dict) or not (request.get("token_ids") or request.get("messages")):
            raise ValueError(f"a request is a dict with non-empty 'token_ids' or 'messages', got {str(request)[:200]}")
        if request.get("messages"):
            keyer = self._request_keyer()
            if keyer is not None:
                keys, prompt_tokens = keyer.prompt_keys(request["messages"])
                return keys, (prompt_tokens + _max_new_tokens(request)) * keyer.geometry.bytes_per_token
        if self._route_keys is None:
            return [], 0
        try:
            keys = self._route_keys(request, **self.config.worker.engine_args)
        except ValueError:
            raise
        except Exception:
            logger.warning("cannot compute routing keys here; routing by load only", exc_info=True)
            self._route_keys = None
            return [], 0
        return keys, max(0, int(self._kv_bytes(request, **self.config.worker.engine_args))) if self._kv_bytes else 0

    def process(self, requests: Sequence[dict], timeout_s: float = 600.0) -> list[RequestResult]:
        """Serve requests concurrently; results come back in request order (``actors.service_logic``).

        - A bad request (malformed, unreadable image, ...) gets a result with ``error`` set; the others run.
        - Admission: each request reserves its KV bytes at the coordinator before it is sent (a request with a
          ``session_id`` reserves for its session, which keeps the reservation between turns until ``release``
          or ``CoordinatorConfig.session_ttl_s``; one without is released when it finishes). While requests of
          this call are running, one that does not fit waits for them (back-pressure, in order); with none
          running, the coordinator's ``admission_mode`` decides: reject at once, or queue up to
          ``admission_timeout_s``. A request still refused gets a ``ClusterSaturatedError`` in its result.
        - A request whose worker dies is retried on another worker (up to ``worker.max_retries`` times); one
          that still fails (a poison request killing every worker it reaches) gets a ``WorkerFailedError``
          result, and the others complete."""
        return self.logic.process(requests, timeout_s)

    def admit(self, nbytes: int, session_id: str | None = None) -> str:
        """Reserve room for a session (raises ClusterSaturatedError when saturated). Returns its id."""
        sid = session_id or uuid.uuid4().hex
        self.port.admit(sid, int(nbytes), True)
        return sid

    def release(self, session_id: str) -> None:
        """End a session: its reservation goes (its cached KV stays, as cold entries)."""
        self.port.release([session_id])

    def state(self) -> dict:
        import ray

        return ray.get(self.coordinator.state.remote())


class RayServicePort:
    """``actors.service_logic.ServicePort`` over the coordinator and worker actors. An error an actor raised
    is re-raised as the original (``actors.errors.remote_cause``), its remote traceback chained, so a caller
    catches it by class and reads one line."""

    def __init__(self, coordinator: Any, worker: Callable[[str], Any]) -> None:
        self.coordinator = coordinator
        self.worker = worker  # worker name -> its (tenant) handle

    def admit(self, session_id: str, nbytes: int, wait: bool) -> None:
        _get(self.coordinator.admit.remote(session_id, nbytes, wait))

    def route(self, keys: list, exclude: list[str]) -> Route:
        route = _get(self.coordinator.route.remote(keys, exclude))
        return Route(route["worker"], route.get("incarnation"))

    def submit(self, worker: str, request: dict) -> Any:
        return self.worker(worker).process.remote(request)

    def wait_any(self, tickets: list, timeout_s: float) -> Any:
        import ray

        ready, _ = ray.wait(tickets, num_returns=1, timeout=timeout_s)
        return ready[0] if ready else None

    def result(self, ticket: Any) -> RequestResult:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        try:
            return ray.get(ticket)
        except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
            # A restarting (unavailable) worker comes back; only a dead one leaves the routing table.
            raise WorkerLostError(type(exc).__name__, permanent=not isinstance(exc, ActorUnavailableError)) from exc
        except RayTaskError as exc:
            raise WorkerRaisedError(remote_cause(exc)) from exc

    def done(self, worker: str) -> None:
        self.coordinator.done.remote(worker)

    def worker_failed(self, worker: str, permanent: bool, incarnation: int | None) -> None:
        self.coordinator.worker_failed.remote(worker, permanent, incarnation)

    def release(self, session_ids: list[str], timeout_s: float | None = None) -> None:
        _get([self.coordinator.release.remote(s) for s in session_ids], timeout_s)


def _get(refs: Any, timeout_s: float | None = None) -> Any:
    """``ray.get``, an actor's own error re-raised as itself."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs, timeout=timeout_s)
    except RayTaskError as exc:
        raise remote_cause(exc) from exc


def _max_new_tokens(request: dict) -> int:
    """The request's ``max_new_tokens``, validated as the engine will (a bad value raises ``RequestError``)."""
    from qwen3vl_ray.engine.requests import SamplingParams

    sampling = request.get("sampling") or {}
    params = sampling if isinstance(sampling, SamplingParams) else SamplingParams.from_mapping(sampling)
    return params.max_new_tokens


def attach_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Attach to the cluster at ``address`` / ``RAY_ADDRESS`` (as inside ``ray job submit``), else start an
    embedded Ray; nothing when Ray is already initialised. ``init_kwargs`` go to ``ray.init``.

    Embedded means ``address="local"``, which always starts a new cluster: a bare ``ray.init()`` would silently
    attach to any other Ray running on this machine (``/tmp/ray/ray_current_cluster``), someone else's
    included. Its workers import this checkout (``PYTHONPATH``), as a cluster's nodes import the installed
    package."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "ignore_reinit_error": True, **init_kwargs}
    if address == "local":
        kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": REPO_ROOT}})
    ray.init(address=address, **kwargs)


def ensure_service(config: ServiceConfig | None = None, address: str | None = None, num_workers: int = 1,
                   timeout_s: float = 120.0, worker_start_timeout_s: float = 1800.0) -> ServiceHandle:
    """Attach to (or start) Ray and make sure the coordinator, the agents and ``num_workers`` workers exist.
    Idempotent: named, detached actors are reused by a second call. An actor already running with another
    configuration than ``config`` (or other code: ``actors.config_check.code_version``) raises
    ``ConfigMismatchError`` naming the differing fields; ``config=None`` adopts the running service's
    configuration (``ServiceConfig.from_env()`` when none runs).

    ``timeout_s`` bounds each call to a running actor; ``worker_start_timeout_s`` is how long workers may wait
    for their resources (an autoscaling cluster launches GPU nodes for them: see ``wait_for_workers``)."""
    import ray

    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    attach_ray(address)
    # No config asked for: attach to the running service of this environment's tenant as it is (its workers know
    # its whole config).
    if config is None:
        config = ServiceConfig.from_env(gpus_available=ray.cluster_resources().get("GPU", 0) > 0)
        config = _running_config(timeout_s, config.tenant) or config
    tenant = config.tenant
    coordinator = get_or_create_coordinator(config.coordinator, config.agent, tenant)
    state = ray.get(coordinator.state.remote(), timeout=timeout_s)
    if not state["nodes"] and state.get("agent_errors"):  # nothing can be stored anywhere: say why, now
        node, why = next(iter(state["agent_errors"].items()))
        raise ServiceStartError(f"no node agent could start (node {node[:12]}: {why})")
    # get_if_exists reuses actors whatever config they were built with: refuse a mismatch loudly.
    check_same_config(f"the coordinator {coordinator_name(tenant)!r}",
                      ray.get(coordinator.config_fields.remote(), timeout=timeout_s),
                      coordinator_fields(config.coordinator, config.agent))
    workers = {}
    options = {}
    for i in range(num_workers):
        name = f"{worker_prefix(tenant)}{i}"
        options[name] = worker_options(name, config.worker)
        workers[name] = with_tenant(worker_class().options(**options[name]).remote(name, config), tenant)
    wait_for_workers(workers, options, worker_start_timeout_s)
    wanted = worker_fields(config.worker)
    for name, w in workers.items():
        check_same_config(f"worker {name!r}", ray.get(w.config_fields.remote(), timeout=timeout_s), wanted)
    _check_agents(coordinator, config, timeout_s)
    return ServiceHandle(coordinator, workers, config)


#: How often ``wait_for_workers`` says what it is waiting for.
WAIT_REPORT_INTERVAL_S = 30.0


def wait_for_workers(workers: dict[str, Any], options: dict[str, dict], timeout_s: float,
                     report_interval_s: float = WAIT_REPORT_INTERVAL_S) -> None:
    """Wait until every worker has started (placed on a node and its engine loaded), the way Ray's own libraries
    wait on an autoscaling cluster: a worker asking for a GPU that no node has yet is pending demand, which makes
    the autoscaler launch a GPU node (boot + set-up take minutes). Every ``report_interval_s`` it logs what it
    asked for and what the cluster has; after ``timeout_s`` it removes the workers that never started (so no
    demand is left behind) and raises ``WorkersUnavailableError`` saying the same. A worker that fails to start
    raises its own error at once."""

    import ray

    refs = {w.node_id.remote(): name for name, w in workers.items()}
    pending = dict(refs)
    start = time.monotonic()
    deadline = start + timeout_s
    while pending:
        step = min(report_interval_s, max(0.0, deadline - time.monotonic()))
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=step)
        for ref in ready:
            ray.get(ref)  # a worker whose engine cannot load raises here, naming why
            pending.pop(ref)
        if not pending:
            return
        names = sorted(pending.values())
        asks = _demand(options[names[0]])
        waited = time.monotonic() - start
        summary = (f"{len(names)} of {len(workers)} workers not started after {waited:.0f} s (each asks {asks}; "
                   f"the cluster has {_resources(ray.available_resources())} free of "
                   f"{_resources(ray.cluster_resources())})")
        if time.monotonic() >= deadline:
            for name in names:
                try:
                    ray.kill(getattr(workers[name], "actor", workers[name]), no_restart=True)
                except Exception:
                    logger.debug("could not remove pending worker %s", name, exc_info=True)
            _await_names_released({name: options[name].get("namespace") for name in names})
            raise WorkersUnavailableError(
                f"{summary}; gave up after worker_start_timeout_s={timeout_s:g}: add nodes with these resources "
                f"(an autoscaling cluster launches them: see `ray status`), ask for fewer workers, or raise "
                f"QWEN3VL_RAY_WORKER_START_TIMEOUT_S")
        logger.warning("waiting for resources: %s; an autoscaling cluster is launching nodes for them "
                       "(giving up after %.0f s)", summary, timeout_s)


def _await_names_released(names: dict[str, str | None], timeout_s: float = 30.0) -> None:
    """Wait until killed actors' names are free (``ray.kill`` returns before the GCS releases them), so that a
    retry right after the error can create them again."""
    import ray

    deadline = time.monotonic() + timeout_s
    for name, namespace in names.items():
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            time.sleep(0.1)
        else:
            logger.warning("worker name %s still taken %.0f s after its actor was killed", name, timeout_s)


def _demand(options: dict) -> str:
    asks = {"CPU": options.get("num_cpus") or 0, "GPU": options.get("num_gpus") or 0}
    return _resources({k: v for k, v in asks.items() if v})


def _resources(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}" if shown else "{}"


def _running_config(timeout_s: float, tenant: Tenant) -> ServiceConfig | None:
    """The ServiceConfig of a running worker of ``tenant``'s service, None when none runs."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE or not is_worker_of(entry["name"], tenant):
            continue
        try:
            worker = with_tenant(ray.get_actor(entry["name"], namespace=NAMESPACE), tenant)
            return ray.get(worker.service_config.remote(), timeout=timeout_s)
        except Exception:
            logger.info("worker %s did not give its config; asking another", entry["name"], exc_info=True)
    return None


def _check_agents(coordinator: Any, config: ServiceConfig, timeout_s: float) -> None:
    import ray

    from actors.node_agent import agent_name

    wanted = agent_fields(config.agent)
    for node_id in ray.get(coordinator.state.remote(), timeout=timeout_s).get("nodes", []):
        try:
            agent = with_tenant(ray.get_actor(agent_name(node_id, config.tenant), namespace=NAMESPACE), config.tenant)
        except ValueError:  # not created yet: the coordinator creates it with its (checked) config
            continue
        check_same_config(f"the agent of node {node_id[:12]}", ray.get(agent.config_fields.remote(), timeout=timeout_s),
                          wanted)
