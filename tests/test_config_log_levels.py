"""--log-level and --actor-log-level reach the loggers that the job and the actors log with (issue 10: both did
nothing on a cluster). Ray-free but for the last test, which checks the one thing only Ray can show: that a job's
runtime env reaches a detached actor and the actor that one starts, on a cluster this process did not start with
the variable."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.config import configure_actor_logging
from jobs.log_levels import ACTOR_LEVEL_ENV, actor_runtime_env, apply_log_levels
from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root_logger():
    """The root logger's level, handlers and the actor variable as they were, restored after the test."""
    root = logging.getLogger()
    level, handlers, env = root.level, root.handlers[:], os.environ.get(ACTOR_LEVEL_ENV)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers
    if env is None:
        os.environ.pop(ACTOR_LEVEL_ENV, None)
    else:
        os.environ[ACTOR_LEVEL_ENV] = env


def test_the_jobs_level_reaches_the_jobs_loggers(root_logger):
    apply_log_levels(S.resolve({"log_level": "error"}, env={}))
    assert logging.getLogger("jobs.infer").getEffectiveLevel() == logging.ERROR
    apply_log_levels(S.resolve({"log_level": "debug"}, env={}))
    assert logging.getLogger("jobs.service_runner").isEnabledFor(logging.DEBUG)


def test_an_actor_takes_its_level_from_its_environment(root_logger):
    # as an actor's __init__ does: the variable in its process environment sets every actors.* logger
    assert configure_actor_logging({ACTOR_LEVEL_ENV: "debug"}) == "DEBUG"
    assert logging.getLogger("actors.worker").getEffectiveLevel() == logging.DEBUG
    assert configure_actor_logging({ACTOR_LEVEL_ENV: "ERROR"}) == "ERROR"
    assert not logging.getLogger("actors.coordinator").isEnabledFor(logging.WARNING)
    # no variable: the table's default
    assert configure_actor_logging({}) == S.default("actor_log_level")
    with pytest.raises(ConfigError, match=f"actor_log_level .*{ACTOR_LEVEL_ENV}"):
        configure_actor_logging({ACTOR_LEVEL_ENV: "loud"})


def test_the_flag_travels_in_the_jobs_runtime_env_to_an_actors_logger():
    # driver side: an explicit --actor-log-level becomes the job's runtime env ...
    s = S.resolve({"actor_log_level": "debug", "log_level": "error"}, env={})
    env_vars = actor_runtime_env(s, environ={})["env_vars"]
    assert env_vars == {ACTOR_LEVEL_ENV: "DEBUG"}
    # ... actor side: a process with that environment logs actors.worker's DEBUG lines (a fresh interpreter, as an
    # actor's worker process is: nothing configured logging before)
    code = ("import logging; from actors.config import configure_actor_logging; configure_actor_logging(); "
            "logging.getLogger('actors.worker').debug('fetched %d chunks', 3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, **env_vars})
    assert "DEBUG actors.worker: fetched 3 chunks" in r.stderr


def test_a_default_level_leaves_the_nodes_environment_in_charge():
    assert actor_runtime_env(S.resolve({}, env={}), environ={}) == {}


def test_a_submitted_jobs_runtime_env_is_not_set_twice():
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {ACTOR_LEVEL_ENV: "debug"},
                                                                      "working_dir": "/x"}})}
    # ray job submit --runtime-env-json '{"env_vars": {"QWEN3VL_RAY_ACTOR_LOG_LEVEL": "debug"}}': the driver reads
    # it from its environment, and the job's runtime env already carries it (Ray refuses a second setting)
    from_env = S.resolve({}, env={ACTOR_LEVEL_ENV: "debug"})
    assert actor_runtime_env(from_env, environ=job) == {}
    # a flag asking for another level than the job's runtime env: an error naming both, not one silently lost
    with pytest.raises(ConfigError, match=r"actor_log_level: --actor-log-level WARNING .*=debug"):
        actor_runtime_env(S.resolve({"actor_log_level": "warning"}, env={}), environ=job)
    # a job without the variable in its runtime env gets it added
    other = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "/x"}})}
    assert actor_runtime_env(from_env, environ=other) == {"env_vars": {ACTOR_LEVEL_ENV: "DEBUG"}}


@pytest.mark.ray
def test_a_jobs_actor_level_reaches_a_detached_actor_and_its_child_on_a_cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from jobs.service_runner import _init_ray

    # the cluster starts without the variable, so only the job's runtime env can bring it to the actors
    monkeypatch.delenv(ACTOR_LEVEL_ENV, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, object_store_memory=80 << 20,
                                                               include_dashboard=False))
    try:
        _init_ray(S.resolve({"actor_log_level": "debug"}, env={}), cluster.address)

        @ray.remote(num_cpus=0)
        class Probe:
            def __init__(self):
                from actors.config import configure_actor_logging

                self.level = configure_actor_logging()

            def levels(self):
                # what this actor logs at, and what an actor it starts logs at (a coordinator starting agents)
                child = Probe.options(num_cpus=0).remote()
                return self.level, ray.get(child.level_of.remote())

            def level_of(self):
                return logging.getLevelName(logging.getLogger("actors.node_agent").getEffectiveLevel())

        probe = Probe.options(name="log-level-probe", lifetime="detached", namespace="test").remote()
        assert ray.get(probe.levels.remote(), timeout=120) == ("DEBUG", "DEBUG")
        ray.kill(probe)
    finally:
        ray.shutdown()
        cluster.shutdown()
