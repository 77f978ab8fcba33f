"""Pressure monitor: how full each tier and each physical memory is, and the signal others act on.

Sources: accelerator memory (pynvml, else ``torch.cuda.mem_get_info``), host memory (psutil), free disk
space under each disk tier's directory (``shutil.disk_usage``), and each tier's own byte accounting.
No background thread: ``check()`` samples when asked (rate-limited by ``min_interval_s``), so an idle
process does no work. Subscribers (the cache's relief) are called when pressure is high.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

from qwen3vl_ray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PressureConfig:
    """Thresholds of the pressure monitor.

    Attributes:
        min_interval_s: seconds between two real samples; ``check`` in between returns the last one (1.0).
        host_high_fraction: system RAM in use (fraction of total) above which the host tiers count as
            under pressure even if within their own budgets (0.9).
        device_high_fraction: accelerator memory in use (fraction) above which the device tier counts
            as under pressure (0.9).
        disk_min_free_bytes: free bytes under a disk tier's directory below which it counts as under
            pressure (1 GiB).
    """

    min_interval_s: float = 1.0
    host_high_fraction: float = 0.9
    device_high_fraction: float = 0.9
    disk_min_free_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.min_interval_s < 0:
            raise ConfigError(f"min_interval_s must be >= 0, got {self.min_interval_s}")
        for name in ("host_high_fraction", "device_high_fraction"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {v}")
        if self.disk_min_free_bytes < 0:
            raise ConfigError(f"disk_min_free_bytes must be >= 0, got {self.disk_min_free_bytes}")


@dataclass(slots=True)
class TierPressure:
    """One tier's fill level against its watermarks."""

    name: str
    used_bytes: int
    capacity_bytes: int
    high_watermark: float
    low_watermark: float
    system_pressure: bool = False  # the physical memory under the tier is short, whatever the budget

    @property
    def fraction(self) -> float:
        return self.used_bytes / self.capacity_bytes

    @property
    def over_high(self) -> bool:
        return self.system_pressure or self.fraction > self.high_watermark

    @property
    def target_bytes(self) -> int:
        """What relief drains the tier down to."""
        return int(self.low_watermark * self.capacity_bytes)


@dataclass
class PressureReport:
    timestamp: float
    host_used_bytes: int
    host_total_bytes: int
    device_used_bytes: int | None  # None where no accelerator is present
    device_total_bytes: int | None
    disk_free_bytes: dict[str, int] = field(default_factory=dict)
    tiers: list[TierPressure] = field(default_factory=list)

    @property
    def under_pressure(self) -> bool:
        return any(t.over_high for t in self.tiers)

    def as_dict(self) -> dict:
        return {
            "timestamp": self.timestamp,
            "host_used_bytes": self.host_used_bytes,
            "host_total_bytes": self.host_total_bytes,
            "device_used_bytes": self.device_used_bytes,
            "device_total_bytes": self.device_total_bytes,
            "disk_free_bytes": dict(self.disk_free_bytes),
            "under_pressure": self.under_pressure,
            "tiers": [
                {"name": t.name, "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes,
                 "fraction": t.fraction, "over_high": t.over_high}
                for t in self.tiers
            ],
        }


def device_memory() -> tuple[int, int] | None:
    """(used, total) bytes of accelerator 0, or None without one. pynvml first: it sees other processes."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
            return int(info.used), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver / no GPU: fall through to torch, which may still know
        log.debug("pynvml unavailable", exc_info=True)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return int(total - free), int(total)
    return None


class PressureMonitor:
    """Samples memory and tier fill levels; notifies subscribers when a tier is over its high watermark.

    Args:
        cache: the :class:`~qwen3vl_ray.cache.TieredCache` whose tiers are watched (its tier configs give
            the watermarks and disk paths).
        config: thresholds.
    """

    def __init__(self, cache, config: PressureConfig | None = None) -> None:
        self.cache = cache
        self.config = config or PressureConfig()
        self._subscribers: list[Callable[[PressureReport], None]] = []
        self._last: PressureReport | None = None
        self._last_t = float("-inf")
        self.samples = 0
        self.signals = 0

    def subscribe(self, callback: Callable[[PressureReport], None]) -> None:
        self._subscribers.append(callback)

    def sample(self) -> PressureReport:
        vm = psutil.virtual_memory()
        dev = device_memory()
        host_short = vm.total and (vm.total - vm.available) / vm.total > self.config.host_high_fraction
        dev_short = dev is not None and dev[1] and dev[0] / dev[1] > self.config.device_high_fraction
        report = PressureReport(
            timestamp=time.time(),
            host_used_bytes=int(vm.total - vm.available),
            host_total_bytes=int(vm.total),
            device_used_bytes=None if dev is None else dev[0],
            device_total_bytes=None if dev is None else dev[1],
        )
        for tier, cfg in zip(self.cache.tiers, self.cache.config.tiers):
            system = False
            if cfg.kind == "disk" and cfg.path:
                free = shutil.disk_usage(cfg.path).free
                report.disk_free_bytes[cfg.path] = free
                system = free < self.config.disk_min_free_bytes
            elif cfg.kind == "host":
                system = bool(host_short)
            elif cfg.kind == "device":
                system = bool(dev_short)
            report.tiers.append(
                TierPressure(tier.name, tier.used_bytes, tier.capacity_bytes, cfg.high_watermark, cfg.low_watermark, system)
            )
        self.samples += 1
        self._last, self._last_t = report, time.monotonic()
        return report

    def check(self) -> PressureReport:
        """Sample (at most once per ``min_interval_s``) and signal subscribers if under pressure."""
        if self._last is not None and time.monotonic() - self._last_t < self.config.min_interval_s:
            return self._last
        report = self.sample()
        if report.under_pressure:
            self.signals += 1
            log.debug("pressure: %s", [(t.name, round(t.fraction, 3)) for t in report.tiers if t.over_high])
            for cb in self._subscribers:
                cb(report)
        return report

    def relieve(self, report: PressureReport | None = None) -> dict[str, int]:
        """Demote from every tier over its high watermark down to its low watermark. Bytes freed per tier."""
        report = report or self.sample()
        freed: dict[str, int] = {}
        for tp in report.tiers:
            if tp.over_high:
                freed[tp.name] = freed.get(tp.name, 0) + self.cache.relieve(tp.name, tp.target_bytes)
        return freed
