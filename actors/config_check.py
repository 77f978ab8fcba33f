"""Detect a running actor whose configuration differs from the one a caller asks for.

Every actor is created with ``get_if_exists=True``, so a second ``ensure_service`` with another config (say
another model) would silently reuse actors built from the first one. Each actor therefore keeps the
canonical fields of its config; ``ensure_service`` compares them with the requested ones and raises
``ConfigMismatchError`` naming every differing field instead of serving answers from the wrong model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


def check_same_config(what: str, running: dict[str, str], requested: dict[str, str]) -> None:
    """Raise ``ConfigMismatchError`` naming each field where ``running`` and ``requested`` differ."""
    if config_digest(running) == config_digest(requested):
        return
    diff = [f"{k}: running={running.get(k, '<absent>')} requested={requested.get(k, '<absent>')}"
            for k in sorted(set(running) | set(requested)) if running.get(k) != requested.get(k)]
    raise ConfigMismatchError(
        f"{what} already runs with another configuration ({'; '.join(diff)}); stop the service "
        f"(or use another Ray cluster) to change it, or request the running configuration")


def worker_fields(worker_config: Any) -> dict[str, str]:
    """The worker fields that shape its answers and resources (``max_retries`` is client-side only)."""
    return config_fields(worker_config, "worker.", skip=("max_retries",))


def coordinator_fields(coordinator_config: Any, agent_config: Any) -> dict[str, str]:
    return {**config_fields(coordinator_config, "coordinator."), **config_fields(agent_config, "agent.")}


def agent_fields(agent_config: Any) -> dict[str, str]:
    return config_fields(agent_config, "agent.")
