"""The errors a caller of the Ray service tells apart, importable from one place.

Each survives the Ray boundary as its own class: an actor method that raises one reaches the caller as Ray's
``RayTaskError`` made an instance of the original class too (``RayTaskError.as_instanceof_cause``), so
``except ClusterSaturatedError`` catches it on the driver, and ``cause`` is the original, fields included. Ray
builds that instance only for a picklable class whose constructor takes the message alone; so extra fields are
keyword-only with defaults (``BaseException`` pickles ``args`` and restores ``__dict__`` after). The client
(``actors.service``) re-raises the original itself, so its message is one line, not the remote traceback.

A request's own failure in a batch (``ServiceHandle.process``) is not raised: its result carries
``error_line`` of one of these (``"WorkerFailedError: ..."``), so one bad request never fails the others.
"""

from __future__ import annotations

from typing import Sequence

from ray.exceptions import RayTaskError

from actors.config_check import ConfigMismatchError
from actors.coordinator import ClusterSaturatedError
from actors.tenancy import TenantError
from qwen3vl_ray.errors import CapacityError, ClusterError, ConfigError

__all__ = ["CapacityError", "ClusterError", "ClusterSaturatedError", "ConfigError", "ConfigMismatchError",
           "ServiceStartError", "TenantError", "WorkerFailedError", "WorkersUnavailableError", "remote_cause"]


class WorkerFailedError(RuntimeError):
    """A request failed on every worker it reached: each one died serving it (a poison request) or none was
    left that it had not failed on. ``workers``: the workers it was sent to, in order."""

    def __init__(self, message: str, *, workers: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.workers = tuple(workers)


class ServiceStartError(ConfigError):
    """The service cannot serve: no node agent started (the cause names why, e.g. an unsafe disk directory)."""


class WorkersUnavailableError(ClusterError):
    """Workers did not start within ``worker_start_timeout_s`` (no node offered their resources)."""


def remote_cause(exc: BaseException) -> BaseException:
    """The exception an actor raised, for an error Ray handed over (``RayTaskError`` keeps it as ``cause``);
    any other exception as it is."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        return exc.cause
    return exc
