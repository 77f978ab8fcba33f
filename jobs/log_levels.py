"""The settings' log levels, applied: ``log_level`` to this process (the CLI or a job's driver), ``actor_log_level``
to the service's actors (``actors.config.configure_actor_logging`` sets it in each actor's process)."""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

from actors.config import LOG_FORMAT as FORMAT
from qwen3vl_ray import settings as S
from qwen3vl_ray.errors import ConfigError

ACTOR_LEVEL_ENV = S.option("actor_log_level").env
# Set by `ray job submit` for the job's driver: the job's configuration, its runtime env included (Ray's
# ray._private.ray_constants.RAY_JOB_CONFIG_JSON_ENV_VAR, named here so this module needs no Ray).
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def apply_log_levels(s: S.Settings) -> None:
    """Set this process's level from ``--log-level`` / ``QWEN3VL_RAY_LOG_LEVEL``, and put ``--actor-log-level`` in
    this process's environment, which an embedded Ray started after this call (its raylet, hence its actors)
    inherits. On a cluster the actors get it from ``actor_runtime_env``, passed to ``ray.init``."""
    logging.basicConfig(level=s.log_level, format=FORMAT)
    logging.getLogger().setLevel(s.log_level)
    os.environ[ACTOR_LEVEL_ENV] = s.actor_log_level


def actor_runtime_env(s: S.Settings, environ: Mapping[str, str] | None = None) -> dict:
    """The job-level runtime env (for ``ray.init`` attaching to a cluster) that carries an explicitly set
    ``--actor-log-level`` to every actor this job starts: the coordinator and workers it creates, and the node
    agents the coordinator creates (Ray hands a parent's runtime env on to its children). ``{}`` when:

    - the level is the default: the nodes' own environment decides (cluster.yaml's ``~/.qwen3vl-ray.env``);
    - ``ray job submit``'s runtime env already sets the variable to this level (Ray refuses a driver that sets a
      variable the job's runtime env sets).

    Actors already running (detached, reused by name) keep the level they started with; restart the service to
    change theirs. ``ConfigError`` when the flag asks for another level than the job's runtime env sets, naming
    both: Ray cannot give the actors two."""
    if s.source("actor_log_level") == "default":
        return {}
    environ = os.environ if environ is None else environ
    job_env = _job_env_vars(environ)
    if ACTOR_LEVEL_ENV in job_env:
        if S.option("actor_log_level").parse(job_env[ACTOR_LEVEL_ENV]) == s.actor_log_level:
            return {}
        raise ConfigError(f"actor_log_level: --actor-log-level {s.actor_log_level} differs from the job's runtime env "
                          f"{ACTOR_LEVEL_ENV}={job_env[ACTOR_LEVEL_ENV]}; set one of them")
    return {"env_vars": {ACTOR_LEVEL_ENV: s.actor_log_level}}


def _job_env_vars(environ: Mapping[str, str]) -> dict:
    """env_vars of the runtime env ``ray job submit`` gave this driver ({} outside a submitted job)."""
    try:
        config = json.loads(environ.get(_JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return {}
    # Ray's JobConfig JSON keeps the runtime env under "runtime_env"
    runtime_env = config.get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})
