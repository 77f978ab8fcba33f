"""The service's typed errors cross the Ray boundary as their own classes: a driver catches them by class
(``except ClusterSaturatedError``), their fields survive, and the line a result carries names the class."""

import pickle

import pytest

from actors.errors import (ClusterSaturatedError, ConfigMismatchError, ServiceStartError, TenantError,
                           WorkerFailedError, WorkersUnavailableError, remote_cause)
from qwen3vl_ray.errors import CapacityError, error_line

ERRORS = [
    ClusterSaturatedError("cluster saturated: session 's' needs 10 B, 4 B free"),
    WorkerFailedError("the request failed on workers ['w0', 'w1']", workers=["w0", "w1"]),
    ConfigMismatchError("worker 'w0' runs another config: worker.engine_args"),
    TenantError("this actor belongs to another tenant"),
    ServiceStartError("no node agent could start"),
    WorkersUnavailableError("1 of 1 workers not started after 60 s"),
]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_each_error_pickles_as_its_class_with_its_fields(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)


def test_worker_failed_keeps_its_workers_and_saturation_is_a_capacity_error():
    assert pickle.loads(pickle.dumps(ERRORS[1])).workers == ("w0", "w1")
    assert isinstance(ERRORS[0], CapacityError)  # callers catching "no room" catch saturation too


@pytest.fixture(scope="module")
def raiser():
    import ray

    from actors.service import attach_ray

    started = not ray.is_initialized()
    attach_ray("local", num_cpus=1, include_dashboard=False)

    class Raiser:  # defined here so Ray ships it by value
        def raise_(self, err):
            raise err

    try:
        yield ray.remote(Raiser).options(num_cpus=0).remote()
    finally:
        if started:
            ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_an_actor_raising_it_is_caught_by_class_on_the_driver(raiser, err):
    import ray

    with pytest.raises(type(err)) as caught:
        ray.get(raiser.raise_.remote(err))
    original = remote_cause(caught.value)
    # the original, fields and all; the row's line names the class, not Ray's wrapper
    assert type(original) is type(err) and str(original) == str(err) and vars(original) == vars(err)
    assert error_line(caught.value) == f"{type(err).__name__}: {err}"


@pytest.mark.ray
def test_a_worker_failure_caught_as_runtime_error_still_names_its_workers(raiser):
    import ray

    try:
        ray.get(raiser.raise_.remote(ERRORS[1]))
    except RuntimeError as exc:  # a broad except still sees the field through Ray's wrapper
        assert exc.workers == ("w0", "w1")
    else:
        pytest.fail("no error raised")


def test_remote_cause_leaves_a_local_error_as_it_is():
    err = ValueError("bad")
    assert remote_cause(err) is err


@pytest.mark.ray
def test_the_clients_port_re_raises_an_actors_error_as_itself_in_one_line(raiser):
    import ray
    from ray.exceptions import RayTaskError

    from actors.service import RayServicePort

    class FullCoordinator:  # refuses every session and has no worker left
        def admit(self, session_id, nbytes, wait=True):
            raise ClusterSaturatedError(f"cluster saturated: session {session_id!r} needs {nbytes} B")

        def route(self, keys, exclude=()):
            raise RuntimeError(f"no available worker (excluded: {sorted(exclude)})")

    port = RayServicePort(ray.remote(FullCoordinator).options(num_cpus=0).remote(), worker=lambda name: None)
    with pytest.raises(ClusterSaturatedError) as refused:
        port.admit("s1", 10, True)
    # the original class and message, not Ray's wrapper with the remote traceback (kept as its __cause__)
    assert type(refused.value) is ClusterSaturatedError
    assert str(refused.value) == "cluster saturated: session 's1' needs 10 B"
    assert isinstance(refused.value.__cause__, RayTaskError)
    with pytest.raises(RuntimeError) as no_worker:
        port.route([], ["w0"])
    assert str(no_worker.value) == "no available worker (excluded: ['w0'])"
