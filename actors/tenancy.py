"""Tenants: who may call the service's actors.

A tenant is a name and a secret key taken from the job's configuration (``QWEN3VL_RAY_TENANT`` and
``QWEN3VL_RAY_TENANT_KEY``), never from request data. Each tenant gets its own service: its own coordinator,
its own node agent on every node (own host and disk budgets, own disk directory) and its own workers, named
after the tenant's id. Every public method of those actors takes the key as the keyword argument ``auth``
(``TenantHandle`` adds it to every call) and refuses a call without the right one with ``TenantError``. So a
job of another tenant, which can list and look up every named actor of the cluster, can call none of them:
it cannot read, evict, overwrite, list or probe this tenant's entries.

The ``default`` tenant has no key: the jobs that set no tenant share it (and its cache), as before.

What this does not protect against: code running in the cluster as the same OS user can read another process's
memory or the tenant's key from its environment; token authentication (``RAY_AUTH_MODE=token``) is what keeps
everyone else off the cluster.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_ray.errors import ConfigError

DEFAULT_TENANT = "default"
MIN_KEY_CHARS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class TenantError(PermissionError):
    """A call into a tenant's actor without that tenant's key."""


@dataclass(frozen=True)
class Tenant:
    """A tenant of the cluster.

    Attributes:
        name: the tenant's name (``default`` unless configured): letters, digits, ``_.-``, up to 64.
        key: the tenant's secret (at least 16 characters), required for every tenant but ``default``. Never
            logged, never part of a config comparison or an actor name.
    """

    name: str = DEFAULT_TENANT
    key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"tenant name must be 1-64 letters, digits or _.-, got {self.name!r}")
        if not isinstance(self.key, str):
            raise ConfigError("the tenant key must be a string (QWEN3VL_RAY_TENANT_KEY)")
        if self.name != DEFAULT_TENANT and len(self.key) < MIN_KEY_CHARS:
            raise ConfigError(f"tenant {self.name!r} needs a secret key of at least {MIN_KEY_CHARS} characters in "
                              f"QWEN3VL_RAY_TENANT_KEY (for example `python -c 'import secrets; "
                              f"print(secrets.token_hex(32))'`); only the default tenant has none")
        if self.name == DEFAULT_TENANT and self.key:
            raise ConfigError("the default tenant has no key; name your tenant (QWEN3VL_RAY_TENANT) to use one")

    @property
    def id(self) -> str:
        """16 hex characters derived from name and key: actor names and disk directories carry it; without the
        key nobody can tell which tenant it belongs to."""
        h = hashlib.blake2b(digest_size=8, person=b"q3r-tenant")
        h.update(self.name.encode() + b"\0" + self.key.encode())
        return h.hexdigest()

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_TENANT

    @property
    def suffix(self) -> str:
        """What the tenant's actor names end with: nothing for the default tenant (the names it always had)."""
        return "" if self.is_default else f"_t{self.id}"

    def check(self, auth: str | None) -> None:
        """Raise ``TenantError`` unless ``auth`` is this tenant's key (constant-time comparison)."""
        given = auth if isinstance(auth, str) else ""
        if not hmac.compare_digest(given.encode(), self.key.encode()):
            raise TenantError("this actor belongs to another tenant; call it with its tenant's key "
                              "(QWEN3VL_RAY_TENANT / QWEN3VL_RAY_TENANT_KEY of the job that owns it)")

    @classmethod
    def from_settings(cls, s: Any) -> "Tenant":
        return cls(s.tenant, s.tenant_key)


def tenant_checked(cls: type) -> type:
    """Class decorator for an actor class whose instances hold ``self.tenant``: every public method takes the
    keyword argument ``auth`` and runs only with the tenant's key. Ray's method options (concurrency groups)
    stay on the wrapped methods."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(method):
            continue
        setattr(cls, name, _checked(method))
    return cls


def _checked(method):
    @functools.wraps(method)
    def wrapper(self, *args, auth: str | None = None, **kwargs):
        self.tenant.check(auth)
        return method(self, *args, **kwargs)

    # Ray validates a call's arguments against the method's signature: show it with ``auth`` (functools.wraps
    # would make it report the wrapped method's, which has none).
    sig = inspect.signature(method)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params.append(inspect.Parameter("auth", inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    wrapper.__signature__ = sig.replace(parameters=params)
    del wrapper.__wrapped__
    return wrapper


class TenantHandle:
    """An actor handle that calls with a tenant's key: ``h.method.remote(*args)`` as on the plain handle."""

    def __init__(self, handle: Any, tenant: Tenant) -> None:
        self._handle = handle
        self._tenant = tenant

    def __getattr__(self, name: str) -> "_TenantMethod":
        if name.startswith("_"):
            raise AttributeError(name)
        return _TenantMethod(getattr(self._handle, name), self._tenant.key)

    @property
    def actor(self) -> Any:
        """The plain handle (for ``ray.kill``, ``ray.wait`` on its calls, ...)."""
        return self._handle

    def __reduce__(self):
        return TenantHandle, (self._handle, self._tenant)


class _TenantMethod:
    __slots__ = ("_method", "_key")

    def __init__(self, method: Any, key: str) -> None:
        self._method = method
        self._key = key

    def remote(self, *args, **kwargs):
        return self._method.remote(*args, auth=self._key, **kwargs)

    def options(self, **options):
        return _TenantMethod(self._method.options(**options), self._key)


def with_tenant(handle: Any, tenant: Tenant) -> TenantHandle:
    """``handle`` calling with ``tenant``'s key (a handle already wrapped is re-wrapped for ``tenant``)."""
    if isinstance(handle, TenantHandle):
        handle = handle.actor
    return TenantHandle(handle, tenant)
