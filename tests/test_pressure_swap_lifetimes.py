import gc
import time

import pytest
import torch

from qwen3vl_ray.cache import CacheConfig, TieredCache
from qwen3vl_ray.cache.pressure import PressureConfig, PressureMonitor
from qwen3vl_ray.cache.swap import SwapConfig, SwapSpace
from qwen3vl_ray.errors import CapacityError, ConfigError
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


# ---------------------------------------------------------------- swap
def test_swap_out_lowest_priority_lru_and_back_bit_exact(tmp_path):
    cache = host_disk_cache(tmp_path, host_kib=8, disk_kib=64)
    swap = SwapSpace(cache, SwapConfig(resident_budget_bytes=16 * 1024, high_watermark=1.0, low_watermark=0.5))
    a = torch.randn(KIB4).to(torch.bfloat16)  # 2 KiB
    tensors = {"low": torch.randn(KIB4), "mid": torch.randn(KIB4), "high": torch.randn(KIB4), "bf16": a}
    handles = {
        "low": swap.register(tensors["low"].clone(), priority=0),
        "mid": swap.register(tensors["mid"].clone(), priority=1),
        "high": swap.register(tensors["high"].clone(), priority=5),
        "bf16": swap.register(a.clone(), priority=1),
    }
    assert swap.resident_bytes == 14 * 1024
    handles["bf16"].get()  # touched: "mid" is now the LRU among priority 1
    # drain to 8 KiB: priority 0 goes first, then the least recently used of priority 1
    assert swap.relieve(8 * 1024) == 8 * 1024
    assert [handles[n].resident for n in ("low", "mid", "high", "bf16")] == [False, False, True, True]
    assert handles["low"].where in ("host", "disk")
    for name, h in handles.items():
        back = h.get()
        assert back.dtype == tensors[name].dtype and back.shape == tensors[name].shape
        assert back.device == tensors[name].device
        assert torch.equal(back, tensors[name]), name
    assert swap.stats()["swapped_in_bytes"] == 8 * 1024
    cache.close()


def test_swap_register_makes_room_and_leaked_handle_is_reclaimed(tmp_path):
    cache = host_disk_cache(tmp_path, host_kib=32)
    swap = SwapSpace(cache, SwapConfig(resident_budget_bytes=8 * 1024, high_watermark=1.0, low_watermark=0.5))
    h1 = swap.register(torch.ones(KIB4))
    h2 = swap.register(torch.ones(KIB4) * 2)
    # a third 4 KiB tensor does not fit 8 KiB: the least recently used one is swapped out first
    h3 = swap.register(torch.ones(KIB4) * 3)
    assert [h1.resident, h2.resident, h3.resident] == [False, False, True]
    assert swap.resident_bytes <= 8 * 1024
    n_entries = len(cache)
    del h1
    gc.collect()
    assert swap.stats()["leaks"] == 1 and len(cache) == n_entries - 1
    h2.release()
    h3.release()
    assert swap.stats()["handles"] == 0 and swap.stats()["leaks"] == 1 and len(cache) == 0
    with pytest.raises(CapacityError):
        swap.register(torch.zeros(KIB4 * 4))
    cache.close()


def test_swap_rejects_lossy_or_device_tiers(tmp_path):
    from qwen3vl_ray.codecs import available_codecs

    if "int8" in available_codecs():
        lossy = host_disk_cache(tmp_path, host_codec="int8")
        with pytest.raises(ConfigError, match="lossless"):
            SwapSpace(lossy, SwapConfig(resident_budget_bytes=1024))
        lossy.close()
    dev = TieredCache(CacheConfig(tiers=[TierConfig("device", 64 * 1024, device="cpu")], namespace=NS))
    with pytest.raises(ConfigError, match="device"):
        SwapSpace(dev, SwapConfig(resident_budget_bytes=1024))
    dev.close()


def test_swapped_out_tensor_survives_eviction_pressure_and_idle_expiry(tmp_path):
    cache = host_disk_cache(tmp_path, host_kib=8, disk_kib=16)
    swap = SwapSpace(cache, SwapConfig(resident_budget_bytes=64 * 1024))
    x = torch.randn(KIB4)
    h = swap.register(x.clone())
    assert h.swap_out()
    # other traffic fills every tier and idle expiry runs: the swapped-out tensor is the only copy, kept
    for i in range(12):
        cache.put(key(100 + i), torch.full((KIB4,), float(i)))
    cache.expire_idle(ttl_s=1, now=time.monotonic() + 3600)
    assert torch.equal(h.get(), x)
    h.release()
    cache.close()
