"""Detect a running actor whose configuration differs from the one a caller asks for.

Every actor is created with ``get_if_exists=True``, so a second ``ensure_service`` with another config (say
another model) would silently reuse actors built from the first one. Each actor therefore keeps the
canonical fields of its config; ``ensure_service`` compares them with the requested ones and raises
``ConfigMismatchError`` naming every differing field instead of serving answers from the wrong model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Iterable

from qwen3vl_ray.errors import ConfigError


class ConfigMismatchError(ConfigError):
    """A named actor already runs with a configuration other than the requested one."""


def _canonical(value: Any) -> str:
    # sort_keys + str() of non-JSON values (paths, dtypes) gives the same text in every process
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def config_fields(config: Any, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, str]:
    """``{"prefix.field": canonical JSON of its value}`` for a dataclass config (one level: nested
    dataclasses and dicts stay whole values). ``skip`` names fields that do not shape the actor."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_fields needs a dataclass instance, got {type(config).__name__}")
    skip = set(skip)
    return {f"{prefix}{k}": _canonical(v) for k, v in dataclasses.asdict(config).items() if k not in skip}


def config_digest(fields: dict[str, str]) -> str:
    """Stable sha256 hex of the canonical fields (same config -> same digest in every process)."""
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()


CODE_FIELD = "code.version"
"""The field every actor's config carries for the service code it runs (``code_version``)."""
SERVICE_PACKAGES = ("qwen3vl_ray", "actors")
"""The packages whose code the service's actors run (``jobs`` is the client side)."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (16 hex) over the source of the service packages as this process imports them: relative path and
    bytes of every ``.py`` file under ``qwen3vl_ray/`` and ``actors/``.

    A job submitted with ``--working-dir .`` imports the code it ships, while the coordinator and agents started
    by ``qwen3vl-ray service`` run the copy installed on the head: comparing this digest is how a job finds out
    that the two differ (and says so) instead of mixing two versions of the chunk format or the protocol."""
    h = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in SERVICE_PACKAGES:
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
        for path in sorted(files):
            h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def check_same_config(what: str, running: dict[str, str], requested: dict[str, str]) -> None:
    """Raise ``ConfigMismatchError`` naming each field where ``running`` and ``requested`` differ; a difference in
    the code alone (``CODE_FIELD``) gets its own message, since no setting fixes it."""
    if config_digest(running) == config_digest(requested):
        return
    differing = [k for k in sorted(set(running) | set(requested)) if running.get(k) != requested.get(k)]
    if differing == [CODE_FIELD]:
        raise ConfigMismatchError(
            f"{what} runs other qwen3vl-ray code than this job (code version {running.get(CODE_FIELD, '<unknown>')} "
            f"on the cluster, {requested[CODE_FIELD]} here: qwen3vl_ray/ or actors/ differ); submit the job from the "
            f"checkout the cluster runs, or sync and restart the service with this code (`ray up cluster.yaml` "
            f"re-runs its start commands)")
    diff = [f"{k}: running={running.get(k, '<absent>')} requested={requested.get(k, '<absent>')}" for k in differing]
    raise ConfigMismatchError(
        f"{what} already runs with another configuration ({'; '.join(diff)}); stop the service "
        f"(or use another Ray cluster) to change it, or request the running configuration")


def _with_code(fields: dict[str, str]) -> dict[str, str]:
    return {**fields, CODE_FIELD: _canonical(code_version())}


def worker_fields(worker_config: Any) -> dict[str, str]:
    """The worker fields that shape its answers and resources (``max_retries`` is client-side only), and the
    code it runs."""
    return _with_code(config_fields(worker_config, "worker.", skip=("max_retries",)))


def coordinator_fields(coordinator_config: Any, agent_config: Any) -> dict[str, str]:
    return _with_code({**config_fields(coordinator_config, "coordinator."), **config_fields(agent_config, "agent.")})


def agent_fields(agent_config: Any) -> dict[str, str]:
    return _with_code(config_fields(agent_config, "agent."))
