"""ServiceLogic (what ``ServiceHandle.process`` decides) over a fake port, without Ray: results in request
order, admission with back-pressure, retries of a request whose worker is lost, a request's own errors, and no
leaked in-flight slot or reservation however a call ends."""

from __future__ import annotations

import pytest

from actors.coordinator import ClusterSaturatedError
from actors.results import RequestResult
from actors.service_logic import Route, ServiceLogic, WorkerLostError, WorkerRaisedError

NBYTES = 100  # each request's KV reservation


def plan(request: dict) -> tuple[list, int]:
    if not request.get("token_ids"):
        raise ValueError("a request needs token_ids")
    return [f"k{t}" for t in request["token_ids"]], request.get("nbytes", NBYTES)


def ok(worker: str, request: dict) -> RequestResult:
    return RequestResult(id=request["id"], worker=worker, output=f"out-{request['id']}")


class FakePort:
    """The coordinator's admission and routing rules over scripted workers; every call is recorded."""

    def __init__(self, workers=("w0", "w1", "w2"), budget: int = 10_000, behaviour=ok) -> None:
        self.alive = {w: True for w in workers}
        self.inflight = {w: 0 for w in workers}
        self.budget, self.behaviour = budget, behaviour
        self.reserved: dict[str, int] = {}
        self.max_reserved = 0
        self.admits: list[tuple[str, bool]] = []  # (request id's session, wait)
        self.failures: list[tuple[str, bool]] = []  # worker_failed(worker, permanent)
        self.sent: list[tuple[str, str]] = []  # (worker, request id)
        self.tickets: dict[int, tuple[str, dict]] = {}
        self.hanging: set[int] = set()

    def admit(self, session_id, nbytes, wait):
        self.admits.append((session_id, wait))
        have = self.reserved.get(session_id, 0)
        used = sum(self.reserved.values()) - have + max(have, nbytes)
        if used > self.budget:
            raise ClusterSaturatedError(f"cluster saturated: session {session_id!r} needs {nbytes} B")
        self.reserved[session_id] = max(have, nbytes)
        self.max_reserved = max(self.max_reserved, sum(self.reserved.values()))

    def route(self, keys, exclude):
        free = [w for w in self.alive if self.alive[w] and w not in exclude]
        if not free:
            raise RuntimeError(f"no available worker (excluded: {sorted(exclude)})")
        w = min(free, key=lambda w: self.inflight[w])
        self.inflight[w] += 1
        return Route(w, incarnation=0)

    def submit(self, worker, request):
        t = len(self.sent)
        self.sent.append((worker, request["id"]))
        self.tickets[t] = (worker, request)
        if request.get("hang"):
            self.hanging.add(t)
        return t

    def wait_any(self, tickets, timeout_s):
        ready = [t for t in tickets if t not in self.hanging]
        return min(ready) if ready else None  # first sent, first done

    def result(self, ticket):
        outcome = self.behaviour(*self.tickets.pop(ticket))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def done(self, worker):
        assert self.inflight[worker] > 0, f"done({worker}) without a route"
        self.inflight[worker] -= 1

    def worker_failed(self, worker, permanent, incarnation):
        self.failures.append((worker, permanent))
        if permanent:
            self.alive[worker] = False

    def release(self, session_ids, timeout_s=None):
        for s in session_ids:
            self.reserved.pop(s, None)

    def idle(self) -> bool:
        return not self.reserved and not any(self.inflight.values())


def req(i, **kw) -> dict:
    return {"id": f"r{i}", "token_ids": [i, i + 1], **kw}


def test_results_come_in_request_order_and_a_bad_request_is_its_own_error_never_sent():
    port = FakePort()
    reqs = [req(0), req(1), {"id": "bad"}, req(3)]
    out = ServiceLogic(port, plan, max_retries=1).process(reqs)
    assert [r.id for r in out] == ["r0", "r1", "bad", "r3"]
    assert [r.output for r in out if r.id != "bad"] == ["out-r0", "out-r1", "out-r3"]
    assert out[2].error == "ValueError: a request needs token_ids" and out[2].output is None
    assert sorted(rid for _, rid in port.sent) == ["r0", "r1", "r3"]  # the bad one reached no worker
    assert [r.attempts for r in out] == [1, 1, None, 1]
    assert port.idle()  # every reservation released, every in-flight slot given back


def test_back_pressure_runs_what_fits_and_one_that_never_fits_is_refused_once_nothing_runs():
    # room for two requests at a time; "big" needs three requests' room and can never fit
    port = FakePort(budget=2 * NBYTES + NBYTES // 2)
    reqs = [req(0), req(1), req(2, id="big", nbytes=3 * NBYTES), req(3), req(4)]
    out = ServiceLogic(port, plan, max_retries=1).process(reqs)
    assert [r.output for r in out] == ["out-r0", "out-r1", None, "out-r3", "out-r4"]
    assert out[2].error.startswith("ClusterSaturatedError: cluster saturated")
    assert port.max_reserved <= port.budget  # never overcommitted
    big = [wait for sid, wait in port.admits if sid == port.admits[2][0]]
    # while r0/r1 ran it waited for them (never queueing at the coordinator); alone, the coordinator decided
    assert big[:-1] == [False] * (len(big) - 1) and big[-1] is True
    assert port.idle()


def test_a_sessions_reservation_outlives_the_call_and_one_without_is_released():
    port = FakePort()
    ServiceLogic(port, plan, max_retries=1).process([req(0, session_id="chat"), req(1)])
    assert port.reserved == {"chat": NBYTES}  # kept between turns, until release or its TTL


def test_a_request_that_kills_every_worker_it_reaches_fails_alone_naming_them():
    def poison(worker, request):
        return WorkerLostError("ActorDiedError") if request["id"] == "poison" else ok(worker, request)

    port = FakePort(behaviour=poison)
    out = ServiceLogic(port, plan, max_retries=1).process([req(0, id="poison"), req(1), req(2)])
    assert out[0].error == ("WorkerFailedError: the request failed on workers ['w0', 'w1'] (ActorDiedError); "
                               "not retried again")
    assert out[0].attempts == 2
    assert port.failures == [("w0", True), ("w1", True)]  # each death reported, permanent
    assert [r.output for r in out[1:]] == ["out-r1", "out-r2"]
    assert port.idle()


def test_with_no_worker_left_to_try_the_routers_refusal_is_the_requests_worker_failure():
    port = FakePort(workers=("w0", "w1"), behaviour=lambda w, r: WorkerLostError("ActorDiedError"))
    out = ServiceLogic(port, plan, max_retries=5).process([req(0)])
    assert out[0].error == "WorkerFailedError: no available worker (excluded: ['w0', 'w1'])"
    assert out[0].attempts == 2 and port.idle()


def test_a_restarting_worker_is_retried_elsewhere_and_stays_routable():
    lost_once = []

    def blip(worker, request):
        if not lost_once:
            lost_once.append(worker)
            return WorkerLostError("ActorUnavailableError", permanent=False)
        return ok(worker, request)

    port = FakePort(behaviour=blip)
    out = ServiceLogic(port, plan, max_retries=1).process([req(0)])
    assert out[0].output == "out-r0" and out[0].attempts == 2 and out[0].worker != lost_once[0]
    assert port.failures == [(lost_once[0], False)] and port.alive[lost_once[0]]


def test_an_error_the_worker_raises_is_that_requests_error_and_not_retried():
    def raises(worker, request):
        return WorkerRaisedError(ValueError("bad image")) if request["id"] == "r1" else ok(worker, request)

    port = FakePort(behaviour=raises)
    out = ServiceLogic(port, plan, max_retries=3).process([req(0), req(1)])
    assert out[1].error == "ValueError: bad image" and out[1].attempts == 1
    assert out[0].output == "out-r0" and len(port.sent) == 2 and port.idle()


def test_a_timeout_raises_and_gives_back_what_is_in_flight():
    port = FakePort()
    with pytest.raises(TimeoutError, match="1 requests still running after 5 s"):
        ServiceLogic(port, plan, max_retries=1).process([req(0), req(1, hang=True)], timeout_s=5)
    assert port.idle()  # the hanging request's slot and reservation are back


def test_a_send_that_fails_gives_back_the_route_and_the_reservation():
    port = FakePort()

    def broken(worker, request):
        raise ConnectionError("worker handle unavailable")

    port.submit = broken
    with pytest.raises(ConnectionError):
        ServiceLogic(port, plan, max_retries=1).process([req(0)])
    assert port.idle()
