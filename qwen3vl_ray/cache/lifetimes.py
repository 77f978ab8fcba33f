"""Lifetimes: idle expiry, leak reclamation, and garbage collection only when it pays.

Replaces the sketch's AdaptiveGarbageCollector, which ran ``gc.collect()`` on a timer. Here nothing runs in
the background: an owner calls :meth:`LifetimeManager.tick` on its own schedule, so an idle process does no
work. No owner does yet: neither the engine nor the node agents call it (only the tests). ``gc.collect()`` and
``torch.cuda.empty_cache()`` are expensive (a full collection stalls every thread; emptying the CUDA cache
makes the next allocations slow), so they run only under pressure and at most once per interval.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch

from qwen3vl_ray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LifetimeConfig:
    """Attributes:
        idle_ttl_s: cache entries idle longer than this are dropped; ``None`` disables expiry. Seconds (600).
        swap_idle_s: resident swap handles unused this long are swapped out even without pressure;
            ``None`` disables. Seconds (None).
        gc_min_interval_s: minimum seconds between two forced collections under pressure (5.0).
    """

    idle_ttl_s: float | None = 600.0
    swap_idle_s: float | None = None
    gc_min_interval_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("idle_ttl_s", "swap_idle_s"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0 or None, got {v}")
        if self.gc_min_interval_s < 0:
            raise ConfigError(f"gc_min_interval_s must be >= 0, got {self.gc_min_interval_s}")


class LifetimeManager:
    """Applies lifetimes to a cache, a swap space and a pressure monitor (each optional)."""

    def __init__(self, config: LifetimeConfig | None = None, cache=None, swap=None, monitor=None) -> None:
        self.config = config or LifetimeConfig()
        self.cache = cache
        self.swap = swap
        self.monitor = monitor
        self._last_gc = float("-inf")
        self.expired = 0
        self.swapped_idle = 0
        self.collections = 0

    def tick(self, now: float | None = None) -> dict:
        """One maintenance step. Returns what it did."""
        now = time.monotonic() if now is None else now
        done = {"expired": 0, "swapped_idle": 0, "collected": False}
        if self.cache is not None and self.config.idle_ttl_s is not None:
            done["expired"] = self.cache.expire_idle(ttl_s=self.config.idle_ttl_s, now=now)
            self.expired += done["expired"]
        if self.swap is not None and self.config.swap_idle_s is not None:
            done["swapped_idle"] = self.swap.swap_out_idle(self.config.swap_idle_s, now=now)
            self.swapped_idle += done["swapped_idle"]
        if self.monitor is not None:
            report = self.monitor.check()
            if report.under_pressure:
                self.monitor.relieve(report)
                if self.swap is not None:
                    self.swap.relieve()
                done["collected"] = self.collect(now)
        return done

    def collect(self, now: float | None = None) -> bool:
        """``gc.collect()`` (frees leaked handles' cycles) and ``torch.cuda.empty_cache()``, rate-limited."""
        now = time.monotonic() if now is None else now
        if now - self._last_gc < self.config.gc_min_interval_s:
            return False
        self._last_gc = now
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.collections += 1
        log.debug("forced collection #%d under pressure", self.collections)
        return True
