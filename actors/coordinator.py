"""Coordinator: the cluster directory, global tiering policies, request routing and admission control.

``CoordinatorLogic`` is plain Python driving agents through "ports" (objects with the agent's methods:
``NodeAgentLogic`` itself in tests, a ``RayAgentPort`` over an actor handle in the service). The
``Coordinator`` actor adds what needs Ray: following ``ray.nodes()`` (nodes that join get an agent, dead
nodes' entries are forgotten), the periodic policy loop, and rebuilding its state after a restart.

Metadata side only; chunks never pass through the coordinator (migrations hand ObjectRefs from agent to agent).
Every decision is logged at debug level and counted in ``qwen3vl_ray_coordinator_actions{action=...}``.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import ray

from actors.config import NAMESPACE, AgentConfig, CoordinatorConfig
from actors.directory import Directory
from actors.metrics import Metrics
from actors.pressure_report import NodeReport
from actors.tenancy import Tenant, tenant_checked, with_tenant
from qwen3vl_ray.errors import CapacityError, error_line
from qwen3vl_ray.keys import CacheKey

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "qwen3vl_ray_coordinator"
WORKER_PREFIX = "qwen3vl_ray_worker_"


def coordinator_name(tenant: Tenant = Tenant()) -> str:
    """The named actor of ``tenant``'s coordinator (``COORDINATOR_NAME`` for the default tenant)."""
    return COORDINATOR_NAME + tenant.suffix


def worker_prefix(tenant: Tenant = Tenant()) -> str:
    """What ``tenant``'s worker names start with; a worker's name is this plus its index."""
    return WORKER_PREFIX + ("" if tenant.is_default else f"t{tenant.id}_")


def is_worker_of(name: str, tenant: Tenant = Tenant()) -> bool:
    """Whether a named actor is one of ``tenant``'s workers (not another tenant's, whose names share the prefix)."""
    prefix = worker_prefix(tenant)
    return name.startswith(prefix) and name[len(prefix):].isdigit()


class ClusterSaturatedError(CapacityError):
    """New sessions cannot be admitted: the cluster's reserved bytes are at the admission limit."""


@dataclass(slots=True)
class WorkerState:
    node_id: str
    inflight: int = 0
    available: bool = True
    incarnation: int = 0  # bumped by each registration (a restarted worker registers again)


class CoordinatorLogic:
    """Thread-safe: one lock guards the directory, reports, workers and reservations; calls to the agents
    happen outside it, so routing never waits for a slow or dead agent."""

    def __init__(self, config: CoordinatorConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics("coordinator")
        self.directory = Directory()
        self.agents: dict[str, Any] = {}
        self.epochs: dict[str, str] = {}
        self.reports: dict[str, NodeReport] = {}
        self.workers: dict[str, WorkerState] = {}
        self.reserved: dict[str, int] = {}  # admitted sessions -> reserved KV bytes
        self._reserved_at: dict[str, float] = {}  # -> when last admitted (monotonic), for session_ttl_s
        self._lock = threading.RLock()  # the state above; never held across a call to an agent
        self._room = threading.Condition(self._lock)
        self._pass_lock = threading.Lock()  # one policy pass at a time

    def _decide(self, action: str, node: str = "", tier: str = "all", n: int = 1, **detail: Any) -> dict:
        logger.debug("decision %s node=%s tier=%s n=%d %s", action, node[:12], tier, n, detail)
        self.metrics.inc("qwen3vl_ray_coordinator_actions", n, action=action, node=node, tier=tier)
        return {"action": action, "node": node, "tier": tier, "n": n, **detail}

    # -- agents and the directory ----------------------------------------------------------------
    def add_agent(self, node_id: str, port: Any) -> None:
        snap = port.snapshot()  # a remote call: never under the lock (routing would wait on it)
        with self._lock:
            self.agents[node_id] = port
            self._apply_snapshot(node_id, snap)

    def remove_agent(self, node_id: str) -> int:
        """Forget a node (dead or removed): its entries become misses. Returns how many were forgotten."""
        with self._lock:
            self.agents.pop(node_id, None)
            self.epochs.pop(node_id, None)
            self.reports.pop(node_id, None)
            for st in self.workers.values():
                if st.node_id == node_id:
                    st.available = False
            n = self.directory.forget_node(node_id)
            self._decide("forget_node", node_id, n=n)
            return n

    def resync(self, node_id: str) -> None:
        """Rebuild one node's part of the directory from its agent's snapshot."""
        with self._lock:
            port = self.agents[node_id]
        snap = port.snapshot()
        with self._lock:
            if self.agents.get(node_id) is port:  # not removed (or replaced) while we asked
                self._apply_snapshot(node_id, snap)

    def _apply_snapshot(self, node_id: str, snap: dict) -> None:
        self.directory.forget_node(node_id)
        self.directory.apply_events(node_id, ((k, c, True) for k, c in snap["entries"]))
        self.epochs[node_id] = snap["epoch"]
        self._decide("resync", node_id, n=len(snap["entries"]))

    def sync_journals(self) -> None:
        """Apply each agent's journal; an agent with a new epoch (restarted) or an overflowed journal is
        resynced from a snapshot, so entries it lost become misses. Only the policy pass calls this (one
        pass at a time), so journals are applied in the order they were drained."""
        for node_id, port in self._agents():
            try:
                j = port.drain_journal()
            except Exception:
                logger.warning("agent %s unreachable during journal sync", node_id[:12], exc_info=True)
                continue
            with self._lock:
                if self.agents.get(node_id) is not port:
                    continue
                if j["epoch"] == self.epochs.get(node_id) and not j["overflow"]:
                    self.directory.apply_events(node_id, j["events"])
                    continue
            try:
                self.resync(node_id)
            except Exception:
                logger.warning("agent %s unreachable for its snapshot", node_id[:12], exc_info=True)

    def _agents(self) -> list[tuple[str, Any]]:
        with self._lock:
            return list(self.agents.items())

    def record(self, node_id: str, keys: Sequence[CacheKey], tiers: Sequence[str | None]) -> None:
        """A worker reports where its new chunks landed (so routing sees them before the next journal sync)."""
        with self._lock:
            if node_id not in self.agents:
                return
            for tier in ("host", "disk"):
                self.directory.set_many(node_id, [k for k, t in zip(keys, tiers) if t == tier], tier)

    def lookup(self, keys: Sequence[CacheKey]) -> list[tuple[str, str] | None]:
        with self._lock:
            return self.directory.get_many(keys)

    # -- routing --------------------------------------------------------------------------------
    def register_worker(self, worker_id: str, node_id: str) -> None:
        with self._lock:
            old = self.workers.get(worker_id)
            self.workers[worker_id] = WorkerState(node_id, incarnation=(old.incarnation + 1) if old else 0)
            self._decide("register_worker", node_id, worker=worker_id)

    def worker_failed(self, worker_id: str, permanent: bool = True, incarnation: int | None = None) -> None:
        """A request failed on ``worker_id``. ``permanent`` (the actor died) takes it out of routing until it
        registers again; a temporary failure (``ActorUnavailableError``: restarting, network blip) keeps it
        routable, since the client already excludes it for the failed request. ``incarnation`` (from the
        route) ignores a report that arrives after the worker has already restarted and registered again."""
        with self._lock:
            st = self.workers.get(worker_id)
            if st is not None and incarnation is not None and incarnation != st.incarnation:
                return  # about an earlier life of this worker
            if st is not None:
                if permanent:
                    st.available = False
                    st.inflight = 0
                self._decide("worker_failed", st.node_id, worker=worker_id, permanent=permanent)

    def route(self, keys: Sequence[CacheKey], exclude: Iterable[str] = ()) -> dict:
        """The worker whose node holds the most of the request's cached prefix, minus a load penalty."""
        exclude = set(exclude)
        with self._lock:
            prefix_nodes = self.directory.longest_prefix(keys)
            best, best_score = None, None
            for wid in sorted(self.workers):
                st = self.workers[wid]
                if not st.available or wid in exclude or st.node_id not in self.agents:
                    continue
                local = sum(1 for n in prefix_nodes if n == st.node_id)
                score = (local - self.config.load_weight * st.inflight, -st.inflight)
                if best_score is None or score > best_score:
                    best, best_score = wid, score
            if best is None:
                raise RuntimeError(f"no available worker (registered: {sorted(self.workers)}, excluded: {sorted(exclude)})")
            st = self.workers[best]
            st.inflight += 1
            local = sum(1 for n in prefix_nodes if n == st.node_id)
            self.metrics.inc("qwen3vl_ray_coordinator_actions", action="route", node=st.node_id)
            return {"worker": best, "node": st.node_id, "cached_chunks": len(prefix_nodes), "local_chunks": local,
                    "incarnation": st.incarnation}

    def done(self, worker_id: str) -> None:
        with self._lock:
            st = self.workers.get(worker_id)
            if st is not None and st.inflight > 0:
                st.inflight -= 1

    # -- placement and admission --------------------------------------------------------------------
    def place(self, node_id: str, nbytes: int) -> str:
        """Where new entries from ``node_id`` should go: home while its host tier stays under the high
        watermark, else the node with the most host room, else home (its own cache demotes to disk)."""
        with self._lock:
            def room(n: str) -> float:
                rep = self.reports.get(n)
                h = None if rep is None else rep.tiers.get("host")
                return -1.0 if h is None else h.room

            if not self.config.placement or room(node_id) >= nbytes or node_id not in self.agents:
                return node_id
            other = max((n for n in self.agents if n != node_id), key=room, default=None)
            if other is not None and room(other) >= nbytes:
                rep = self.reports[other]  # booked until its agent's next pressure report
                self.reports[other] = rep.with_used("host", rep.tiers["host"].used + nbytes)
                self._decide("place_remote", other, tier="host", nbytes=nbytes, home=node_id)
                return other
            return node_id

    def total_budget(self) -> int:
        return sum(t.capacity for r in self.reports.values() for t in r.tiers.values())

    def admit(self, session_id: str, nbytes: int, wait: bool = True) -> dict:
        """Reserve ``nbytes`` of KV for ``session_id``, or queue/reject it when the cluster is saturated.

        A session's reservation is the largest size asked for it: each turn of a chat resends the whole
        history, so a later turn needs only its growth. ``wait=False`` never queues (a client with requests of
        its own in flight waits for those instead). Raises :class:`ClusterSaturatedError` naming the numbers;
        never lets sessions overcommit memory."""
        if nbytes < 0:
            raise ValueError(f"session bytes must be >= 0, got {nbytes}")
        queue = wait and self.config.admission_mode == "queue"
        deadline = time.monotonic() + (self.config.admission_timeout_s if queue else 0)
        with self._room:
            while True:
                self._expire_reservations()
                limit = self.config.admission_limit * self.total_budget()
                have = self.reserved.get(session_id, 0)
                used = sum(self.reserved.values())
                if used - have + max(have, nbytes) <= limit:
                    self.reserved[session_id] = max(have, nbytes)
                    self._reserved_at[session_id] = time.monotonic()
                    self.metrics.inc("qwen3vl_ray_admissions", result="admitted")
                    return {"admitted": True, "reserved": used - have + max(have, nbytes), "limit": int(limit)}
                left = deadline - time.monotonic()
                if left <= 0 or max(have, nbytes) > limit:  # out of time, or it could never fit
                    self.metrics.inc("qwen3vl_ray_admissions", result="rejected")
                    self._decide("reject_session", session=session_id, nbytes=nbytes)
                    raise ClusterSaturatedError(
                        f"cluster saturated: session {session_id!r} needs {nbytes} B but {used} of "
                        f"{int(limit)} B admissible are reserved (admission_limit={self.config.admission_limit} x "
                        f"{self.total_budget()} B of tier budgets); retry later or add nodes")
                self.metrics.inc("qwen3vl_ray_admissions", result="queued")
                self._room.wait(timeout=min(left, 1.0))  # wake up to expire idle sessions too

    def release(self, session_id: str) -> None:
        with self._room:
            self._reserved_at.pop(session_id, None)
            if self.reserved.pop(session_id, None) is not None:
                self._room.notify_all()

    def _expire_reservations(self) -> None:
        """Release sessions not renewed within ``session_ttl_s`` (their client went away without releasing;
        their KV is idle and moves down and out like any other entry)."""
        ttl = self.config.session_ttl_s
        if not ttl:
            return
        now = time.monotonic()
        for sid in [s for s, t in self._reserved_at.items() if now - t > ttl]:
            self._reserved_at.pop(sid)
            self.reserved.pop(sid, None)
            self._decide("expire_session", session=sid)

    # -- global policy pass ---------------------------------------------------------------------
    def policy_pass(self) -> list[dict]:
        """Read every agent's pressure and apply the global policies. Returns the decisions made.

        One pass at a time (``_pass_lock``). The agents are called without holding the state lock, so
        routing, lookups, records and admission go on during a pass, and an unreachable agent (each call
        times out after ``RayAgentPort.timeout_s``) slows only the pass."""
        cfg = self.config
        decisions: list[dict] = []
        with self._pass_lock:
            self.sync_journals()
            for node_id, rep in self._refresh_reports().items():
                try:
                    decisions += self._relieve_host(node_id, rep)
                except Exception:  # one unreachable agent must not stop the others' policies
                    logger.warning("host relief on %s failed", node_id[:12], exc_info=True)
            if cfg.cluster_eviction:
                decisions += self._evict_by_value()
            self.sync_journals()
            self._refresh_reports()  # after the moves: placement and admission read them
            with self._room:
                self._room.notify_all()
        return decisions

    def _refresh_reports(self) -> dict[str, NodeReport]:
        """Ask every agent for its pressure (no lock held while asking); returns the fresh reports."""
        fresh: dict[str, tuple[Any, NodeReport | None]] = {}
        for node_id, port in self._agents():
            try:
                fresh[node_id] = (port, port.pressure())
            except Exception:
                logger.warning("agent %s unreachable for pressure", node_id[:12], exc_info=True)
                fresh[node_id] = (port, None)
        with self._lock:
            for node_id, (port, rep) in fresh.items():
                if self.agents.get(node_id) is not port:
                    continue
                if rep is None:
                    self.reports.pop(node_id, None)
                else:
                    self.reports[node_id] = rep
            return {n: r for n, (p, r) in fresh.items() if r is not None and self.agents.get(n) is p}

    def _relieve_host(self, node_id: str, rep: NodeReport) -> list[dict]:
        """A node's host tier above its high watermark: re-encode cold entries with the stronger codec first,
        then demote to the node's disk down to the low watermark. "Cold" is the node cache's own policy order
        (``NodeAgentLogic.cold_keys``/``demote_cold``: a chain's tail before its head), as in its local moves."""
        cfg = self.config
        decisions: list[dict] = []
        with self._lock:
            port = self.agents.get(node_id)
        host = rep.tiers.get("host")
        if port is None or host is None or not host.over_high:
            return decisions
        need = host.excess
        if cfg.recompress_codec and cfg.recompress_max_per_pass:
            res = port.recompress(port.cold_keys("host", cfg.recompress_max_per_pass), cfg.recompress_codec, int(need))
            if res["entries"]:
                decisions.append(self._decide("recompress", node_id, "host", res["entries"], bytes=res["bytes"],
                                              codec=cfg.recompress_codec))
                need -= res["bytes"]
        if need > 0 and cfg.demote_cold and "disk" in rep.tiers:
            res = port.demote_cold(int(need))
            if res["entries"]:
                decisions.append(self._decide("demote", node_id, "host", res["entries"], bytes=res["bytes"]))
        return decisions

    def _evict_by_value(self) -> list[dict]:
        """For the bottom tier of each node (disk, or host without disk): when a node is above its high
        watermark or the cluster's total is, evict until each pressured node and the total are back at the low
        watermark. Each agent offers its candidates in its own cache policy's order (leaf-first for the default
        policy: never a chain's head before its tail); the value (recompute seconds saved per byte x reuse
        likelihood) only decides which node gives up its next candidate, so every node loses a prefix of its
        own eviction order. The agent evicts through its cache's own eviction path: its policy hears
        ``on_evict`` (ghost lists learn from it) and its store counts the eviction, as for a local one."""
        decisions: list[dict] = []
        reports = self._refresh_reports()  # fresh numbers: the demotions above moved bytes
        agents = dict(self._agents())
        bottom = {n: ("disk" if "disk" in r.tiers else "host") for n, r in reports.items()}
        need: dict[str, float] = {}
        used = cap = 0.0
        for n, r in reports.items():
            t = r.tiers[bottom[n]]
            used += t.used
            cap += t.capacity
            if t.used > t.high * t.capacity:
                need[n] = t.excess
        any_r = next(iter(reports.values()), None)
        cluster_need = 0.0
        if any_r is not None:
            t0 = any_r.tiers[bottom[next(iter(reports))]]
            if used > t0.high * cap:
                cluster_need = used - t0.low * cap
        if not need and cluster_need <= 0:
            return decisions
        offers: dict[str, deque] = {}
        for n in reports:
            try:
                offers[n] = deque(agents[n].candidates(bottom[n], 256, self.config.recompute_s_per_mib))
            except Exception:
                logger.warning("agent %s unreachable for candidates", n[:12], exc_info=True)
        # merge the nodes' lists by the value of each one's next candidate, taking each only from its front
        fronts = [(q[0].value, n) for n, q in offers.items() if q]
        heapq.heapify(fronts)
        doomed: dict[str, list] = {}
        while fronts:
            _, n = heapq.heappop(fronts)
            if need.get(n, 0) <= 0 and cluster_need <= 0:
                continue  # this node is done; the others may still need room
            c = offers[n].popleft()
            doomed.setdefault(n, []).append(c.key)
            need[n] = need.get(n, 0) - c.nbytes
            cluster_need -= c.nbytes
            if offers[n]:
                heapq.heappush(fronts, (offers[n][0].value, n))
        for n, keys in doomed.items():
            try:
                got = agents[n].evict(keys)
            except Exception:
                logger.warning("eviction on %s failed", n[:12], exc_info=True)
                continue
            if got == len(keys):  # else it kept some (a child stored or a hit since): the journal says which went
                with self._lock:
                    self.directory.remove_many(n, keys)
            decisions.append(self._decide("evict_by_value", n, bottom[n], got))
        return decisions

    def state(self) -> dict:
        with self._lock:
            return {"nodes": sorted(self.agents), "entries": len(self.directory),
                    "by_node": self.directory.count_by_node(),
                    "workers": {w: {"node": s.node_id, "inflight": s.inflight, "available": s.available}
                                for w, s in self.workers.items()},
                    "reserved": sum(self.reserved.values()), "budget": self.total_budget()}


class RayAgentPort:
    """Calls an agent actor synchronously, so the logic can treat it like a local object."""

    def __init__(self, handle: Any, timeout_s: float = 30.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)
        return lambda *args: ray.get(method.remote(*args), timeout=self.timeout_s)


@tenant_checked
class Coordinator:
    """Ray actor: the logic plus node tracking, the periodic loop and state rebuild after a restart. One per
    tenant; every method runs only for that tenant (``auth=<tenant key>``: ``actors.tenancy``)."""

    def __init__(self, config: CoordinatorConfig, agent_config: AgentConfig, tenant: Tenant = Tenant()) -> None:
        from actors.config_check import coordinator_fields
        from actors.metrics import RayMetrics

        logging.basicConfig(level=os.environ.get("QWEN3VL_RAY_ACTOR_LOG_LEVEL", "INFO").upper())
        self.logic = CoordinatorLogic(config, RayMetrics("coordinator"))
        self.agent_config = agent_config
        self.tenant = tenant
        self._config_fields = coordinator_fields(config, agent_config)
        self.handles: dict[str, Any] = {}
        self.agent_errors: dict[str, str] = {}  # node -> why its agent did not start (last sync)
        self._stop = threading.Event()
        self._sync_nodes()
        self._rebuild_workers()
        self.logic.policy_pass()
        if config.period_s > 0:
            threading.Thread(target=self._loop, name="qwen3vl-ray-policy", daemon=True).start()

    def _loop(self) -> None:
        last_sync = time.monotonic()
        while not self._stop.wait(self.logic.config.period_s):
            try:
                if time.monotonic() - last_sync >= self.logic.config.node_sync_period_s:
                    self._sync_nodes()
                    last_sync = time.monotonic()
                self.logic.policy_pass()
            except Exception:  # the loop must survive a bad pass; the next one retries
                logger.warning("policy pass failed", exc_info=True)

    def _sync_nodes(self) -> dict:
        """One agent of this tenant per alive node; agents of dead nodes are killed and their entries forgotten."""
        from actors.node_agent import get_or_create_agent

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        added, removed = [], []
        for node_id in sorted(alive - set(self.handles)):
            handle = get_or_create_agent(node_id, self.agent_config, self.tenant)
            try:
                ray.get(handle.ping.remote(), timeout=60)
            except Exception as e:
                logger.warning("agent on %s did not come up; retry on next sync", node_id[:12], exc_info=True)
                self.agent_errors[node_id] = error_line(e)
                continue
            self.agent_errors.pop(node_id, None)
            self.handles[node_id] = handle
            self.logic.add_agent(node_id, RayAgentPort(handle))
            added.append(node_id)
        for node_id in sorted(set(self.handles) - alive):
            handle = self.handles.pop(node_id)
            self.logic.remove_agent(node_id)
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:
                logger.debug("kill of agent on dead node %s failed", node_id[:12], exc_info=True)
            removed.append(node_id)
        return {"added": added, "removed": removed, "nodes": sorted(self.handles)}

    def _rebuild_workers(self) -> None:
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != NAMESPACE or not is_worker_of(entry["name"], self.tenant):
                continue
            try:
                h = with_tenant(ray.get_actor(entry["name"], namespace=NAMESPACE), self.tenant)
                self.logic.register_worker(entry["name"], ray.get(h.node_id.remote(), timeout=10))
            except Exception:
                logger.info("worker %s not reachable while rebuilding; it registers when back", entry["name"])

    # thin delegation
    def sync_nodes(self) -> dict:
        return self._sync_nodes()

    def policy_pass(self):
        return self.logic.policy_pass()

    def route(self, keys, exclude=()):
        return self.logic.route(keys, exclude)

    def done(self, worker_id):
        return self.logic.done(worker_id)

    def lookup(self, keys):
        return self.logic.lookup(keys)

    def record(self, node_id, keys, tiers):
        return self.logic.record(node_id, keys, tiers)

    def place(self, node_id, nbytes):
        return self.logic.place(node_id, nbytes)

    # Queued admissions block for up to admission_timeout_s: they wait in their own thread pool, so the
    # releases, routes and records that free room (or just serve requests) are never stuck behind them.
    @ray.method(concurrency_group="admission")
    def admit(self, session_id, nbytes, wait=True):
        return self.logic.admit(session_id, nbytes, wait)

    def release(self, session_id):
        return self.logic.release(session_id)

    def register_worker(self, worker_id, node_id):
        return self.logic.register_worker(worker_id, node_id)

    def worker_failed(self, worker_id, permanent=True, incarnation=None):
        return self.logic.worker_failed(worker_id, permanent, incarnation)

    def state(self):
        return {**self.logic.state(), "agent_errors": dict(self.agent_errors)}

    def stop(self):
        self._stop.set()

    def pid(self):
        return os.getpid()

    def config_fields(self):
        """Canonical fields of the configs this coordinator was built with (``actors.config_check``)."""
        return self._config_fields


def coordinator_options(tenant: Tenant = Tenant()) -> dict:
    return dict(name=coordinator_name(tenant), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=16)


ADMISSION_THREADS = 64
"""Threads for (possibly waiting) admissions, apart from the coordinator's other calls."""


def get_or_create_coordinator(config: CoordinatorConfig, agent_config: AgentConfig, tenant: Tenant = Tenant()):
    """``tenant``'s coordinator (created if it does not exist), as a handle calling with the tenant's key."""
    return with_tenant(ray.remote(concurrency_groups={"admission": ADMISSION_THREADS})(Coordinator)
                       .options(**coordinator_options(tenant)).remote(config, agent_config, tenant), tenant)
