"""The pressure monitor: fill levels against the watermarks, relief down the tiers, rate-limited signals.

(The swap space this file also tested is gone: nothing in the engine or the service held a tensor it could
swap; idle sessions go down the tiers through the device budget, ``tests/test_engine_sessions.py``. Idle expiry
is tested where the node agents apply it, ``tests/test_wired_agent_lifetimes.py``.)"""

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.cache.pressure import PressureConfig, PressureMonitor
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.keys import Namespace, prefix_key
from qwen3vl_ray.tiers.config import TierConfig

NS = Namespace(model="pressure-test")
KIB4 = 1024  # float32 elements in 4 KiB


def key(i):
    return prefix_key(NS, None, [i])


def host_disk_cache(tmp_path, host_kib=16, disk_kib=64, host_codec="none"):
    return TieredCache(CacheConfig(
        tiers=[
            TierConfig("host", host_kib * 1024, block_bytes=512, codec=host_codec, high_watermark=0.7, low_watermark=0.5),
            TierConfig("disk", disk_kib * 1024, path=str(tmp_path / "d")),
        ],
        namespace=NS, prefetch_threads=0,
    ))


# ---------------------------------------------------------------- pressure
def test_monitor_reports_tiers_and_relief_drains_to_low_watermark(tmp_path):
    cache = host_disk_cache(tmp_path)
    mon = PressureMonitor(cache, PressureConfig(min_interval_s=0, disk_min_free_bytes=0))
    for i in range(4):  # 16 KiB of 16 KiB: over the 0.7 high watermark
        cache.put(key(i), torch.full((KIB4,), float(i)))
    report = mon.sample()
    host = report.tiers[0]
    assert host.name == "host" and host.fraction == 1.0 and host.over_high
    assert report.under_pressure and report.host_total_bytes > 0
    assert report.device_used_bytes is None or report.device_total_bytes > 0
    freed = mon.relieve(report)
    # drained to the low watermark (8 KiB): two 4 KiB entries went down to disk, none was lost
    assert freed == {"host": 8 * 1024}
    assert cache.tiers[0].used_bytes == 8 * 1024
    assert sorted(cache.where(key(i)) for i in range(4)) == ["disk", "disk", "host", "host"]
    cache.close()


def test_check_signals_subscribers_and_is_rate_limited(tmp_path):
    cache = host_disk_cache(tmp_path)
    mon = PressureMonitor(cache, PressureConfig(min_interval_s=3600, disk_min_free_bytes=0))
    seen = []
    mon.subscribe(seen.append)
    mon.check()  # empty cache: no pressure, no signal
    assert seen == [] and mon.samples == 1
    for i in range(4):
        cache.put(key(i), torch.full((KIB4,), float(i)))
    mon.check()  # within min_interval_s: the cached report, no new sample
    assert mon.samples == 1 and seen == []
    mon.config.min_interval_s = 0
    mon.check()
    assert mon.samples == 2 and len(seen) == 1 and seen[0].under_pressure
    cache.close()


def test_pressure_config_validation():
    with pytest.raises(ConfigError, match="host_high_fraction"):
        PressureConfig(host_high_fraction=1.5)
