"""Lifetimes: idle expiry of a cache's entries, on its owner's schedule.

Nothing runs in the background: the owner calls :meth:`LifetimeManager.tick` whenever it does its periodic work
(the node agent: each time the coordinator's policy pass reads its pressure, every ``period_s``), so an idle
process does no work. ``TieredCache.expire_idle`` scans the whole index under the cache's lock, so a tick scans
at most once per ``check_every_s`` (an eighth of the TTL unless set): a caller ticking every second costs
nothing between scans, and an entry outlives its TTL by at most that interval (plus the cache's one-second
clock).

Expiry drops through the cache's own path: each tier's policy hears ``on_delete``, pinned entries and entries
being read or written stay, and a tier that journals its removals (the agent's) reports them like any other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from qwen3vl_ray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LifetimeConfig:
    """Attributes:
        idle_ttl_s: entries neither read nor written for longer than this are dropped; ``None`` disables expiry.
            Seconds (default None).
        check_every_s: least time between two scans of the cache, seconds; ``None`` (default) means an eighth of
            ``idle_ttl_s``.
    """

    idle_ttl_s: float | None = None
    check_every_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("idle_ttl_s", "check_every_s"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"LifetimeConfig.{name} must be > 0 or None, got {v}")

    @property
    def interval_s(self) -> float | None:
        """Seconds between two scans (None when expiry is off)."""
        if self.idle_ttl_s is None:
            return None
        return self.check_every_s if self.check_every_s is not None else self.idle_ttl_s / 8


class LifetimeManager:
    """Applies ``config.idle_ttl_s`` to ``cache`` (a ``TieredCache``) when ticked.

    ``clock``: the monotonic seconds ``tick`` reads when not given ``now``; it must be the cache's clock (both
    default to ``time.monotonic``)."""

    def __init__(self, cache, config: LifetimeConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.config = config or LifetimeConfig()
        self.clock = clock
        self._last_scan = float("-inf")
        self.expired = 0
        self.scans = 0

    @property
    def enabled(self) -> bool:
        return self.config.idle_ttl_s is not None

    def tick(self, now: float | None = None) -> int:
        """One maintenance step: drop the entries idle past the TTL if a scan is due. Returns how many went."""
        interval = self.config.interval_s
        if interval is None:
            return 0
        now = self.clock() if now is None else now
        if now - self._last_scan < interval:
            return 0
        self._last_scan = now
        self.scans += 1
        n = self.cache.expire_idle(ttl_s=self.config.idle_ttl_s, now=now)
        if n:
            self.expired += n
            log.info("expired %d entries idle for over %.0f s", n, self.config.idle_ttl_s)
        return n
