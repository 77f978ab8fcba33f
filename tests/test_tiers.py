"""Behaviour every tier shares (device, host, disk), plus pooled-tier specifics."""

import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from qwen3vl_ray.codecs import available_codecs
from qwen3vl_ray.errors import CapacityError
from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.factory import make_tier
from qwen3vl_ray.tiers.pooled import PooledTier, effective_block_bytes

NS = Namespace(model="test-model")
KINDS = ("device", "host", "disk")


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def tier_of(kind, tmp_path, capacity=64 << 10, **kw):
    if kind == "disk":
        kw.setdefault("fsync", False)  # durability is the crash test's business; keep unit tests fast
        kw["path"] = str(tmp_path / "disk")
    else:
        kw.setdefault("block_bytes", 1024)
    return make_tier(TierConfig(kind, capacity, **kw), NS)


@pytest.fixture(params=KINDS)
def tier(request, tmp_path):
    return tier_of(request.param, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_roundtrip_bit_exact(tier, dtype):
    x = (torch.randn(3, 5, 7) * 100).to(dtype)
    assert tier.put(key(1), x)
    y = tier.get(key(1))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.cpu().view(torch.uint8) if dtype != torch.bool else y.cpu(), x.view(torch.uint8) if dtype != torch.bool else x)


def test_get_returns_a_copy_owned_by_caller(tier):
    x = torch.arange(100, dtype=torch.float32)
    tier.put(key(1), x)
    y = tier.get(key(1))
    y.zero_()  # scribbling on the result must not change what is stored
    x.zero_()  # nor scribbling on the source after the put
    assert torch.equal(tier.get(key(1)).cpu(), torch.arange(100, dtype=torch.float32))


def test_non_contiguous_input_and_out(tier):
    x = torch.randn(8, 6).t()  # non-contiguous
    assert tier.put(key(2), x)
    out = torch.empty(6, 8)
    assert tier.get(key(2), out=out) is out and torch.equal(out, x)
    out_t = torch.empty(8, 6).t()  # non-contiguous out gets the data too
    assert tier.get(key(2), out=out_t) is out_t and torch.equal(out_t, x)
    with pytest.raises(ValueError, match=r"out is torch.float32 \(8, 6\), entry is torch.float32 \(6, 8\)"):
        tier.get(key(2), out=torch.empty(8, 6))


def test_miss_is_none_and_counted(tier):
    assert tier.get(key(9)) is None
    s = tier.stats()
    assert (s["gets"], s["misses"], s["hits"]) == (1, 1, 0)
    assert not tier.contains(key(9)) and tier.entry_nbytes(key(9)) is None


def test_stats_keys(tier):
    tier.put(key(1), torch.zeros(10))
    tier.get(key(1))
    s = tier.stats()
    for k in ("name", "capacity_bytes", "used_bytes", "entries", "puts", "gets", "hits", "misses", "rejected",
              "corrupt", "bytes_written", "bytes_read"):
        assert k in s, k
    assert s["entries"] == 1 and s["puts"] == 1 and s["hits"] == 1 and s["used_bytes"] == tier.used_bytes > 0
    assert s["name"] == tier.name


def test_remove_contains_keys_len(tier):
    for i in range(3):
        tier.put(key(i), torch.full((4,), float(i)))
    assert len(tier) == 3 and set(tier.keys()) == {key(0), key(1), key(2)}
    used = tier.used_bytes
    assert tier.remove(key(1)) and not tier.remove(key(1))
    assert not tier.contains(key(1)) and tier.get(key(1)) is None
    assert tier.used_bytes < used and len(tier) == 2
    assert tier.remove_many([key(0), key(5)]) == [True, False]


def test_replace_existing_entry(tier):
    tier.put(key(1), torch.zeros(50))
    tier.put(key(1), torch.ones(20, dtype=torch.int32))
    assert len(tier) == 1
    assert torch.equal(tier.get(key(1)).cpu(), torch.ones(20, dtype=torch.int32))
    assert tier.used_bytes == tier.entry_nbytes(key(1))


def test_entry_larger_than_tier_raises_capacity_error(tier):
    with pytest.raises(CapacityError, match=r"entry of \d+ bytes.*larger than the whole .* tier \(\d+ bytes\)"):
        tier.prepare_store(key(1), torch.zeros(70 << 10, dtype=torch.uint8))
    assert len(tier) == 0 and tier.used_bytes == 0


def test_no_room_returns_false_and_loses_nothing(tier):
    # fill with 8 x 7 KiB entries, then a 20 KiB entry cannot fit
    for i in range(8):
        assert tier.put(key(i), torch.full((7 << 10,), i, dtype=torch.uint8))
    before = tier.used_bytes
    prepared = tier.prepare_store(key(99), torch.zeros(20 << 10, dtype=torch.uint8))
    assert prepared.nbytes > tier.free_bytes
    assert tier.complete_store(prepared) is False
    assert tier.stats()["rejected"] == 1 and tier.used_bytes == before and not tier.contains(key(99))
    for i in range(8):
        assert torch.equal(tier.get(key(i)).cpu(), torch.full((7 << 10,), i, dtype=torch.uint8))
    # two-phase: make room the way the cache does, then the same prepared store commits
    while tier.free_bytes < prepared.nbytes:
        tier.remove(next(iter(tier.keys())))
    assert tier.complete_store(prepared)
    assert tier.used_bytes <= tier.capacity_bytes


def test_prepare_store_has_no_side_effects(tier):
    tier.prepare_store(key(1), torch.zeros(100))
    assert len(tier) == 0 and tier.used_bytes == 0 and tier.stats()["puts"] == 0


def test_bad_keys_and_values_raise(tier):
    with pytest.raises(ValueError, match="16 bytes"):
        tier.put(b"short", torch.zeros(1))
    with pytest.raises(TypeError, match="bytes"):
        tier.get("0" * 16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        tier.put(key(1), [1, 2, 3])


def test_batched_forms(tier):
    items = [(key(i), torch.full((10,), float(i))) for i in range(4)]
    assert tier.put_many(items) == [True] * 4
    got = tier.get_many([key(0), key(7), key(3)])
    assert torch.equal(got[0].cpu(), items[0][1]) and got[1] is None and torch.equal(got[2].cpu(), items[3][1])
    assert tier.contains_many([key(1), key(8)]) == [True, False]


@pytest.mark.parametrize("codec", [c for c in available_codecs() if c != "none"] or ["none"])
@pytest.mark.parametrize("kind", KINDS)
def test_codec_plumbing(kind, codec, tmp_path):
    # any registered codec goes through the encoded path: stored size is the payload's, values within bound
    t = tier_of(kind, tmp_path, codec=codec)
    # KV-layout codecs take [..., 2(k/v), kv_heads, tokens, head_dim]; the others any shape
    x = torch.randn(2, 2, 4, 8, 32) if codec.startswith("kv-") else torch.randn(64, 32)
    assert t.put(key(1), x)
    y = t.get(key(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(y.cpu().float(), x, atol=0.1 * float(x.abs().max()))
    assert t.stats()["codec"].startswith(codec)
    # a read into the caller's buffer decodes straight into it: the same values, that very tensor back
    out = torch.full_like(x, float("nan"))
    assert t.get(key(1), out=out) is out and torch.equal(out, y.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["host", "disk"])
def test_an_encoded_entry_read_into_a_gpu_buffer_is_decoded_there(kind, tmp_path):
    # the payload's codes cross to the GPU and expand there; the values are the CPU decode's
    t = tier_of(kind, tmp_path, codec="kv-int8")
    x = torch.randn(2, 2, 4, 8, 32, dtype=torch.bfloat16)
    assert t.put(key(1), x)
    out = torch.empty(x.shape, dtype=x.dtype, device="cuda")
    assert t.get(key(1), out=out) is out
    assert torch.allclose(out.cpu().float(), t.get(key(1)).cpu().float(), atol=1e-2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "get", "remove"]), st.integers(0, 9), st.integers(0, 30_000)), max_size=40))
@pytest.mark.parametrize("kind", KINDS)
def test_against_reference_model(kind, tmp_path_factory, ops):
    # any sequence of put/get/remove: get is None or exactly what was put; the budget is never exceeded
    t = tier_of(kind, tmp_path_factory.mktemp("t"), capacity=64 << 10)
    model: dict[bytes, torch.Tensor] = {}
    for op, k, n in ops:
        if op == "put":
            x = torch.randint(0, 255, (n,), dtype=torch.uint8)
            prepared = t.prepare_store(key(k), x)
            if t.complete_store(prepared):
                model[key(k)] = x.clone()
            else:
                # pooled tiers may reuse the replaced entry's blocks; disk keeps the old file until the rename
                in_place = 0 if kind == "disk" else (t.entry_nbytes(key(k)) or 0)
                assert prepared.nbytes > t.free_bytes + in_place
        elif op == "get":
            y = t.get(key(k))
            assert (y is None) == (key(k) not in model)
            if y is not None:
                assert torch.equal(y.cpu(), model[key(k)])
        else:
            assert t.remove(key(k)) == (model.pop(key(k), None) is not None)
        assert 0 <= t.used_bytes <= t.capacity_bytes
        assert len(t) == len(model)


def test_one_writer_many_readers(tmp_path):
    for kind in KINDS:
        t = tier_of(kind, tmp_path / kind, capacity=256 << 10)
        stop = threading.Event()
        bad = []

        def reader():
            while not stop.is_set():
                for i in range(8):
                    y = t.get(key(i))
                    if y is not None and not bool((y == y[0]).all()):
                        bad.append((i, y[:4]))

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for r in readers:
            r.start()
        for round_ in range(30):  # the writer keeps replacing and removing entries
            for i in range(8):
                t.put(key(i), torch.full((3000 + 97 * round_,), round_ * 8 + i, dtype=torch.int32))
            t.remove(key(round_ % 8))
        stop.set()
        for r in readers:
            r.join()
        assert not bad, f"{kind}: torn read {bad[:1]}"


# -- pooled tiers (device/host) ------------------------------------------------------------------

def test_device_tier_defaults_to_cpu_without_cuda(tmp_path):
    t = tier_of("device", tmp_path)
    assert isinstance(t, PooledTier) and t.name == "device"
    assert t.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert t.get(key(1)) is None


def test_host_tier_is_pinned_only_with_cuda(tmp_path):
    t = tier_of("host", tmp_path)
    assert t.name == "host" and t.device.type == "cpu"
    assert t.pool.pinned == torch.cuda.is_available()


def test_pooled_accounting_is_in_whole_blocks(tmp_path):
    t = tier_of("host", tmp_path, capacity=64 << 10, block_bytes=1024)
    t.put(key(1), torch.zeros(1025, dtype=torch.uint8))  # 1025 bytes -> 2 blocks
    assert t.used_bytes == 2048 and t.entry_nbytes(key(1)) == 2048
    assert t.stats()["blocks_in_use"] == 2


def test_fragmented_pool_stores_across_runs(tmp_path):
    t = tier_of("host", tmp_path, capacity=16 << 10, block_bytes=1024)
    for i in range(16):
        t.put(key(i), torch.full((1024,), i, dtype=torch.uint8))
    for i in range(0, 16, 2):
        t.remove(key(i))  # free every other block: no two free blocks are adjacent
    x = torch.randint(0, 255, (8 * 1024,), dtype=torch.uint8)
    assert t.put(key(100), x)
    assert len(t.block_runs(key(100))) == 8  # stored as 8 separate runs
    assert torch.equal(t.get(key(100)), x)
    for i in range(1, 16, 2):
        assert torch.equal(t.get(key(i)), torch.full((1024,), i, dtype=torch.uint8))


def test_replace_that_only_fits_in_place(tmp_path):
    t = tier_of("host", tmp_path, capacity=16 << 10, block_bytes=1024)
    assert t.put(key(1), torch.zeros(12 << 10, dtype=torch.uint8))
    assert t.put(key(2), torch.zeros(2 << 10, dtype=torch.uint8))
    assert t.put(key(1), torch.ones(14 << 10, dtype=torch.uint8))  # fits once the old key(1) is gone
    assert torch.equal(t.get(key(1)), torch.ones(14 << 10, dtype=torch.uint8))
    assert t.used_bytes == 16 << 10


def test_small_tier_shrinks_its_blocks():
    assert effective_block_bytes(1 << 30, 1 << 20) == 1 << 20
    assert effective_block_bytes(64 << 10, 1 << 20) == 4 << 10
    assert effective_block_bytes(100, 1 << 20) == 64
    t = make_tier(TierConfig("host", 64 << 10), NS)  # default 1 MiB blocks would not fit one
    assert t.block_bytes == 4 << 10 and t.capacity_bytes == 64 << 10


@pytest.mark.parametrize("kind", ["device", "host"])
def test_released_blocks_read_back_as_zeros(kind, tmp_path):
    # tenant A's entry is removed (or replaced by a smaller one): the blocks it held are zero before anyone
    # else can get them, so a later entry's unwritten tail or a raw look at the slab shows no A bytes
    t = tier_of(kind, tmp_path, capacity=16 << 10, block_bytes=1024)
    secret = torch.full((3 << 10,), 0xA5, dtype=torch.uint8)
    assert t.put(key(1), secret) and t.put(key(2), torch.full((2 << 10,), 0x5A, dtype=torch.uint8))
    (first, _), = t.block_runs(key(1))
    t.remove(key(1))
    assert int(t.pool.slab[first: first + 3].count_nonzero()) == 0
    assert t.put(key(2), torch.ones(100, dtype=torch.uint8))  # replaced: its old two blocks are zeroed too
    assert int((t.pool.slab == 0x5A).sum()) == 0 and int((t.pool.slab == 0xA5).sum()) == 0
    assert t.put(key(3), torch.full((1500,), 3, dtype=torch.uint8))  # half of its second block is unwritten
    (runs, _), = t.block_runs(key(3))
    assert int(t.pool.slab[runs + 1][1500 - 1024:].count_nonzero()) == 0


def test_zero_on_release_can_be_turned_off(tmp_path):
    t = tier_of("host", tmp_path, capacity=16 << 10, block_bytes=1024, zero_on_release=False)
    t.put(key(1), torch.full((1024,), 7, dtype=torch.uint8))
    (first, _), = t.block_runs(key(1))
    t.remove(key(1))
    assert not t.pool.zero_on_release and int(t.pool.slab[first].eq(7).sum()) == 1024


def test_close_frees_everything(tmp_path):
    t = tier_of("device", tmp_path)
    t.put(key(1), torch.zeros(100))
    t.close()
    assert len(t) == 0 and t.used_bytes == 0


def test_factory_rejects_bad_arguments():
    with pytest.raises(TypeError, match="TierConfig"):
        make_tier({"kind": "host"}, NS)
    with pytest.raises(TypeError, match="Namespace"):
        make_tier(TierConfig("host", 1024), "ns")
    with pytest.raises(ValueError, match="device"):
        make_tier(TierConfig("device", 1024, device="tpu:0"), NS)


def test_held_room_store_counts_room_first_and_serves_only_after_commit(tier):
    # allocate holds the room (counted at once), write fills it, commit serves it; abort gives it back
    assert tier.holds_room
    x = torch.arange(3000, dtype=torch.float32)
    res = tier.allocate(tier.prepare_store(key(1), x))
    assert res is not None and tier.used_bytes > 0 and not tier.contains(key(1))
    assert tier.write(res)
    tier.commit(res)
    assert torch.equal(tier.get(key(1)).cpu(), x)
    used = tier.used_bytes
    res = tier.allocate(tier.prepare_store(key(2), x))
    assert tier.used_bytes > used
    tier.abort(res)
    assert tier.used_bytes == used and not tier.contains(key(2))
    # no room: None, nothing held
    big = tier.prepare_store(key(3), torch.zeros(tier.free_bytes // 4 + 1024, dtype=torch.float32))
    assert tier.allocate(big) is None and tier.used_bytes == used
