"""Helpers the policy tests share: readable keys and a walk that drains a policy's victims."""

from __future__ import annotations

ALL = lambda key: True  # noqa: E731


def k(name: str) -> bytes:
    """A 16-byte key that reads as its name in failure messages."""
    return name.encode().ljust(16, b".")


def drain(policy, evictable=ALL, remove=True) -> list[bytes]:
    """Every victim in order; with ``remove`` the cache evicts each one as it goes (on_evict)."""
    out = []
    for key in policy.victims(evictable):
        out.append(key)
        if remove:
            policy.on_evict(key)
    return out


def names(keys) -> list[str]:
    return [key.rstrip(b".").decode() for key in keys]
