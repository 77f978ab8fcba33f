"""The settings' log levels, applied: ``log_level`` to this process, ``actor_log_level`` to the actors that an
embedded Ray started from this process runs."""

from __future__ import annotations

import logging
import os

from qwen3vl_ray import settings as S

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def apply_log_levels(s: S.Settings) -> None:
    """Set this process's level from ``--log-level`` / ``QWEN3VL_RAY_LOG_LEVEL`` and hand ``--actor-log-level``
    on to the actors. The actors read ``QWEN3VL_RAY_ACTOR_LOG_LEVEL`` from their process environment: an
    embedded Ray started after this call inherits it; on an attached cluster it is the nodes' own environment
    (cluster.yaml's ``~/.qwen3vl-ray.env``), which a job cannot change."""
    logging.basicConfig(level=s.log_level, format=FORMAT)
    logging.getLogger().setLevel(s.log_level)
    os.environ["QWEN3VL_RAY_ACTOR_LOG_LEVEL"] = s.actor_log_level
