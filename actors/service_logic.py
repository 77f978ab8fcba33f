"""Serving a batch of requests on the service: admission, routing, retries and results, without Ray.

``ServiceLogic`` holds what ``ServiceHandle.process`` decides; every remote call goes through a
``ServicePort`` (``actors.service.RayServicePort`` over the coordinator and worker actors; a fake in the
tests). One ``_Batch`` per call keeps that call's state: the plans, the sessions, who was tried where, the
admission queue and what is in flight.

Order of events for one request: planned on the client (a bad request is its own error result, never sent);
admitted (its KV bytes reserved at the coordinator); routed; sent; its result or failure taken; the worker's
in-flight slot given back (``done``) whatever happened; a reservation this call made released.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol, Sequence

from actors.coordinator import ClusterSaturatedError
from actors.errors import WorkerFailedError
from actors.results import RequestResult, error_result

logger = logging.getLogger(__name__)

#: Seconds the end of a call waits for its reservations to be released (the coordinator's session TTL
#: releases any that do not arrive).
RELEASE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Route:
    """Where the coordinator sent a request: the worker, and which life of it (a restart bumps
    ``incarnation``, so a failure report about an earlier life is ignored)."""

    worker: str
    incarnation: int | None = None


class WorkerLostError(Exception):
    """The worker serving a request died (``permanent``) or is restarting: the request goes elsewhere."""

    def __init__(self, reason: str, *, permanent: bool = True) -> None:
        super().__init__(reason)
        self.permanent = permanent


class WorkerRaisedError(Exception):
    """The worker raised while serving a request: that request's own error (``cause``), not the worker's."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


class ServicePort(Protocol):
    """The remote calls ``ServiceLogic`` makes. Errors an actor raises arrive as the original class."""

    def admit(self, session_id: str, nbytes: int, wait: bool) -> None:
        """Reserve ``nbytes`` for the session; ``ClusterSaturatedError`` when refused."""

    def route(self, keys: list, exclude: list[str]) -> Route:
        """Pick a worker not in ``exclude`` (counted in flight); ``RuntimeError`` when none is left."""

    def submit(self, worker: str, request: dict) -> Hashable:
        """Send the request to the worker; returns a ticket for ``wait_any`` and ``result``."""

    def wait_any(self, tickets: list, timeout_s: float) -> Hashable | None:
        """A ticket whose result is ready, or None after ``timeout_s``."""

    def result(self, ticket: Hashable) -> RequestResult:
        """The worker's result; ``WorkerLostError`` or ``WorkerRaisedError`` when it has none."""

    def done(self, worker: str) -> None:
        """The worker's in-flight slot is free again (not awaited)."""

    def worker_failed(self, worker: str, permanent: bool, incarnation: int | None) -> None:
        """Tell the coordinator (not awaited)."""

    def release(self, session_ids: list[str], timeout_s: float | None = None) -> None:
        """Drop the sessions' reservations, awaited (a release not yet applied could refuse the next call)."""


class ServiceLogic:
    """Serves batches through ``port``: ``plan(request) -> (keys, KV bytes)`` runs on the client first; a
    request whose worker is lost is sent to another one up to ``max_retries`` times."""

    def __init__(self, port: ServicePort, plan: Callable[[dict], tuple[list, int]], max_retries: int) -> None:
        self.port, self.plan, self.max_retries = port, plan, max_retries

    def process(self, requests: Sequence[dict], timeout_s: float = 600.0) -> list[RequestResult]:
        """Results in request order; see ``actors.service.ServiceHandle.process``. Raises ``TimeoutError``
        when nothing finishes for ``timeout_s`` (what is in flight is given back first)."""
        batch = _Batch(self, requests)
        try:
            batch.admit_waiting()
            while batch.pending:
                ticket = self.port.wait_any(list(batch.pending), timeout_s)
                if ticket is None:
                    raise TimeoutError(f"{len(batch.pending)} requests still running after {timeout_s} s")
                batch.take(ticket)
                batch.admit_waiting()
        finally:
            batch.close()
        return batch.results  # type: ignore[return-value]


@dataclass
class _Batch:
    """One ``process`` call's state. Requests are numbered by their place in the call."""

    logic: ServiceLogic
    requests: Sequence[dict]
    results: list[RequestResult | None] = field(init=False)
    plans: dict[int, tuple[list, int]] = field(default_factory=dict)
    sessions: dict[int, str] = field(default_factory=dict)
    scoped: set[int] = field(default_factory=set)  # reservations this call makes and releases (no session_id)
    tried: dict[int, list[str]] = field(default_factory=dict)  # workers each request was sent to, in order
    waiting: deque = field(default_factory=deque)  # planned, not admitted yet, in request order
    admitted: set[int] = field(default_factory=set)  # holding a scoped reservation not yet released
    pending: dict[Hashable, tuple[int, Route]] = field(default_factory=dict)  # ticket -> (request, route)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.requests)
        for i, r in enumerate(self.requests):
            try:
                self.plans[i] = self.logic.plan(r)
            except Exception as exc:  # this request's own problem: its row, never the whole call
                logger.warning("request %s rejected before routing: %s", i, exc)
                self.results[i] = error_result(r, f"{type(exc).__name__}: {exc}")
                continue
            sid = self.requests[i].get("session_id")
            self.sessions[i] = sid or f"request-{uuid.uuid4().hex}"
            if not sid:
                self.scoped.add(i)
            self.tried[i] = []
            self.waiting.append(i)

    @property
    def port(self) -> ServicePort:
        return self.logic.port

    def admit_waiting(self) -> None:
        """Admit and send waiting requests in order while they fit. With requests of this call in flight, one
        that does not fit waits for them (their releases, which this thread delivers, are what frees room)
        instead of queueing at the coordinator; with none, the coordinator's admission mode decides and a
        refusal is the request's error."""
        while self.waiting:
            i = self.waiting[0]
            try:
                self.port.admit(self.sessions[i], self.plans[i][1], not self.pending)
            except ClusterSaturatedError as exc:
                if self.pending:
                    return
                self.waiting.popleft()
                self.results[i] = error_result(self.requests[i], f"{type(exc).__name__}: {exc}")
                continue
            self.waiting.popleft()
            self.admitted.add(i)
            self.send(i)

    def send(self, i: int) -> None:
        route = self.port.route(self.plans[i][0], list(self.tried[i]))
        self.tried[i].append(route.worker)
        try:
            ticket = self.port.submit(route.worker, self.requests[i])
        except BaseException:
            self.port.done(route.worker)  # routed but never sent
            raise
        self.pending[ticket] = (i, route)

    def take(self, ticket: Hashable) -> None:
        """A finished ticket: its result, the request's own error, or a retry elsewhere."""
        i, route = self.pending.pop(ticket)
        try:
            self.results[i] = self.port.result(ticket)
        except WorkerLostError as exc:
            logger.warning("worker %s failed on request %s (%s); retrying elsewhere", route.worker, i, exc)
            self.port.worker_failed(route.worker, exc.permanent, route.incarnation)
            self.retry(i, exc)
        except WorkerRaisedError as exc:
            logger.warning("request %s failed on worker %s: %r", i, route.worker, exc.cause)
            self.results[i] = error_result(self.requests[i], f"{type(exc.cause).__name__}: {exc.cause}")
        finally:
            self.port.done(route.worker)  # finished, failed or raising: never leak the in-flight count
        if self.results[i] is not None:
            self.results[i].attempts = len(self.tried[i])
            self.finish(i)

    def retry(self, i: int, lost: WorkerLostError) -> None:
        if len(self.tried[i]) > self.logic.max_retries:
            # A request that kills every worker it reaches fails alone; the others go on.
            failed = WorkerFailedError(f"the request failed on workers {self.tried[i]} ({lost}); not retried again",
                                       workers=self.tried[i])
        else:
            try:
                self.send(i)
                return
            except RuntimeError as exc:  # no worker left that it has not failed on
                failed = WorkerFailedError(str(exc), workers=self.tried[i])
        self.results[i] = error_result(self.requests[i], f"{type(failed).__name__}: {failed}")

    def finish(self, i: int) -> None:
        if i in self.admitted and i in self.scoped:
            self.admitted.discard(i)
            self.port.release([self.sessions[i]])

    def close(self) -> None:
        """Give back what is still in flight when the call stops waiting (a timeout, a raise): the workers'
        in-flight slots and this call's reservations."""
        for _, route in self.pending.values():
            try:
                self.port.done(route.worker)
            except Exception:
                logger.debug("done(%s) not delivered", route.worker, exc_info=True)
        self.pending.clear()
        left = [self.sessions[i] for i in self.admitted if i in self.scoped]
        if not left:
            return
        try:
            self.port.release(left, RELEASE_TIMEOUT_S)
        except Exception:
            logger.warning("%d reservations not released; they expire after session_ttl_s", len(left), exc_info=True)
