"""Disk tier: file format, restart, corruption detection, path safety, budget."""

import os
import stat

import pytest
import torch

from qwen3vl_ray.keys import Namespace, key_hex
from qwen3vl_ray.tiers import disk_format as fmt
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers import disk as disk_mod
from qwen3vl_ray.tiers.disk import DiskTier

NS = Namespace(model="disk-test")


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def disk(tmp_path, capacity=1 << 20, ns=NS, **kw):
    kw.setdefault("fsync", False)
    return DiskTier(TierConfig("disk", capacity, path=str(tmp_path / "cache"), **kw), ns)


def content(i: int, n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(n, generator=g)


def test_layout_and_modes(tmp_path):
    t = disk(tmp_path)
    t.put(key(0xABC), content(1))
    h = key_hex(key(0xABC))
    path = tmp_path / "cache" / NS.hex / h[:2] / f"{h}.qvt"
    assert t.path_of(key(0xABC)) == path and path.is_file()
    for d in (tmp_path / "cache", tmp_path / "cache" / NS.hex, path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_existing_root_is_left_alone_but_the_entries_directory_is_private(tmp_path):
    # the configured root may be the user's /tmp or a shared mount: never chmod it; what the tier creates
    # below it (the namespace directory, which holds every entry) is 0700, tightened if it was wider
    (tmp_path / "cache" / NS.hex).mkdir(mode=0o755, parents=True)
    os.chmod(tmp_path / "cache", 0o755)
    os.chmod(tmp_path / "cache" / NS.hex, 0o755)
    disk(tmp_path)
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "cache" / NS.hex).stat().st_mode) == 0o700


def test_file_is_header_plus_raw_payload_not_pickle(tmp_path):
    t = disk(tmp_path)
    x = content(2)
    t.put(key(1), x)
    raw = t.path_of(key(1)).read_bytes()
    h = fmt.decode_header(raw[: fmt.MAX_HEADER])
    assert raw.startswith(fmt.MAGIC)
    assert (h.key, h.namespace, h.dtype, h.shape, h.codec) == (key(1), NS.digest, "float32", (300,), "none")
    assert h.header_len % 64 == 0 and len(raw) == h.file_len == t.entry_nbytes(key(1))
    assert raw[h.header_len:] == x.numpy().tobytes()  # the payload is the tensor's bytes, nothing else


def test_restart_serves_what_is_on_disk(tmp_path):
    t = disk(tmp_path)
    xs = {i: content(i, 100 + i) for i in range(20)}
    for i, x in xs.items():
        t.put(key(i), x)
    t.put(key(3), content(333))  # replaced before the restart
    used = t.used_bytes
    t2 = disk(tmp_path)  # a fresh tier rebuilds its index from the directory
    assert len(t2) == 20 and t2.used_bytes == used and t2.stats()["recovered"] == 20
    for i, x in xs.items():
        assert torch.equal(t2.get(key(i)), content(333) if i == 3 else x)


def test_bfloat16_and_shapes_survive_restart(tmp_path):
    t = disk(tmp_path)
    x = torch.randn(2, 3, 4, 5).to(torch.bfloat16)
    t.put(key(1), x)
    t.put(key(2), torch.tensor(3.5))  # 0-d
    t2 = disk(tmp_path)
    y = t2.get(key(1))
    assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), x.view(torch.int16))
    assert t2.get(key(2)).shape == () and float(t2.get(key(2))) == 3.5


def test_namespaces_never_share_entries(tmp_path):
    a = disk(tmp_path, ns=NS)
    b = disk(tmp_path, ns=Namespace(model="disk-test", dtype="bfloat16"))
    a.put(key(1), content(1))
    assert b.get(key(1)) is None and len(b) == 0
    # a file copied into the other namespace's directory is refused as corrupt, never served
    src = a.path_of(key(1))
    dst = b.path_of(key(1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    b2 = disk(tmp_path, ns=Namespace(model="disk-test", dtype="bfloat16"))
    assert b2.get(key(1)) is None and b2.stats()["corrupt"] == 1 and not dst.exists()
    assert torch.equal(a.get(key(1)), content(1))


def test_file_under_wrong_key_name_is_refused(tmp_path):
    t = disk(tmp_path)
    t.put(key(1), content(1))
    wrong = t.path_of(key(2))
    wrong.parent.mkdir(parents=True, exist_ok=True)
    os.link(t.path_of(key(1)), wrong)
    t2 = disk(tmp_path)
    assert not t2.contains(key(2)) and t2.stats()["corrupt"] == 1
    assert torch.equal(t2.get(key(1)), content(1))


def test_stray_temp_files_removed_on_start(tmp_path):
    t = disk(tmp_path)
    t.put(key(1), content(1))
    sub = t.path_of(key(1)).parent
    dead = sub / f".{key_hex(key(1))}.999999999.0.tmp"  # left by a killed writer (no such pid)
    dead.write_bytes(b"partial")
    junk = sub / ".garbage.tmp"
    junk.write_bytes(b"x")
    t2 = disk(tmp_path)
    assert not dead.exists() and not junk.exists() and t2.stats()["stray_tmp_removed"] == 2
    assert len(t2) == 1


@pytest.mark.parametrize("where", ["header", "payload"])
def test_every_flipped_byte_is_detected(tmp_path, where):
    t = disk(tmp_path)
    x = content(7, 64)  # 256-byte payload
    t.put(key(1), x)
    path = t.path_of(key(1))
    good = path.read_bytes()
    hlen = fmt.decode_header(good).header_len
    positions = range(hlen) if where == "header" else range(hlen, len(good))
    detected = 0
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 0x40
        path.write_bytes(bad)
        assert t.get(key(1)) is None, f"flip at {pos} served as data"
        assert not path.exists(), f"corrupt file (flip at {pos}) not removed"
        detected += 1
        assert t.put(key(1), x)  # put it back for the next position
    assert t.stats()["corrupt"] == detected == len(positions)
    assert torch.equal(t.get(key(1)), x)


def test_every_cut_tail_is_detected_on_read_and_on_restart(tmp_path):
    t = disk(tmp_path)
    x = content(8, 100)
    t.put(key(1), x)
    path = t.path_of(key(1))
    good = path.read_bytes()
    for cut in range(len(good)):
        path.write_bytes(good[:cut])
        assert t.get(key(1)) is None and not path.exists(), cut
        t.put(key(1), x)
    # truncation is caught by the restart scan too (file length vs header), without reading payloads
    for cut in (0, 10, 100, len(good) - 1):
        path.write_bytes(good[:cut])
        t2 = disk(tmp_path)
        assert not t2.contains(key(1)) and t2.stats()["corrupt"] == 1 and not path.exists()
        t2.put(key(1), x)
    assert t.stats()["corrupt"] == len(good)


def test_appended_junk_and_header_flips_caught_on_restart(tmp_path):
    t = disk(tmp_path)
    t.put(key(1), content(1))
    path = t.path_of(key(1))
    path.write_bytes(path.read_bytes() + b"junk")
    t2 = disk(tmp_path)
    assert not t2.contains(key(1)) and t2.stats()["corrupt"] == 1
    t2.put(key(1), content(1))
    raw = bytearray(path.read_bytes())
    raw[20] ^= 1  # inside the key field of the header
    path.write_bytes(raw)
    assert not disk(tmp_path).contains(key(1))


def test_out_buffer_and_miss_after_external_delete(tmp_path):
    t = disk(tmp_path)
    x = content(3, 50).reshape(5, 10)
    t.put(key(1), x)
    out = torch.empty(5, 10)
    assert t.get(key(1), out=out) is out and torch.equal(out, x)
    os.unlink(t.path_of(key(1)))
    assert t.get(key(1)) is None and not t.contains(key(1)) and t.used_bytes == 0


def test_path_safety(tmp_path):
    t = disk(tmp_path)
    root = (tmp_path / "cache").resolve()
    nasty = [b"../../etc/passwd", b"../../../../etc/", b"/" * 16, b"\x00" * 16, b"..\\..\\..\\..\\xy\x00\xff", b"\xff" * 16]
    for k in nasty:
        assert t.put(k, content(1))
        p = t.path_of(k).resolve()
        assert p.is_relative_to(root / NS.hex) and p.name == k.hex() + ".qvt"
        assert torch.equal(t.get(k), content(1))
    for bad in ["../../etc/passwd", b"../etc/passwd", b"", b"x" * 17, 12345]:
        with pytest.raises((TypeError, ValueError)):
            t.put(bad, content(1))
    # everything written lies under the namespace directory
    for dirpath, _, files in os.walk(tmp_path):
        for f in files:
            assert (tmp_path / dirpath / f).resolve().is_relative_to(root / NS.hex)


def test_budget_counts_headers_and_is_never_exceeded(tmp_path):
    t = disk(tmp_path, capacity=10_000)
    n_ok = 0
    for i in range(40):
        ok = t.put(key(i), content(i, 400))  # 1,600 B payload + header each
        n_ok += ok
        on_disk = sum(p.stat().st_size for p in t.dir.rglob("*.qvt"))
        assert on_disk == t.used_bytes <= 10_000
    assert n_ok == 10_000 // t.entry_nbytes(key(0)) and t.stats()["rejected"] == 40 - n_ok


def test_restart_with_smaller_budget_trims_oldest(tmp_path):
    t = disk(tmp_path, capacity=1 << 20)
    for i in range(10):
        t.put(key(i), content(i, 400))
        os.utime(t.path_of(key(i)), (1000 + i, 1000 + i))  # deterministic ages
    size = t.entry_nbytes(key(0))
    t2 = disk(tmp_path, capacity=4 * size)
    assert len(t2) == 4 and t2.used_bytes <= 4 * size and t2.stats()["trimmed_on_start"] == 6
    assert set(t2.keys()) == {key(i) for i in range(6, 10)}


def test_fsync_path_works(tmp_path):
    t = disk(tmp_path, fsync=True)
    assert t.put(key(1), content(1))
    assert torch.equal(disk(tmp_path).get(key(1)), content(1))


def test_odd_things_in_the_directory_do_not_break_start_up(tmp_path):
    t = disk(tmp_path)
    t.put(key(1), content(1))
    sub = t.path_of(key(1)).parent
    (sub / (key_hex(key(2)) + ".qvt")).mkdir()  # a directory named like an entry
    os.symlink("/etc/passwd", sub / (key_hex(key(3)) + ".qvt"))  # a planted symlink is never followed
    (sub / "README").write_text("not an entry")
    (t.dir / "stray-file").write_text("x")
    t2 = disk(tmp_path)
    assert set(t2.keys()) == {key(1)} and t2.get(key(3)) is None


# -- chunked I/O: payloads move in CHUNK-sized pieces, hashed as they go ------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1,000 bytes (not a multiple of anything) so a few-KiB payload spans many of them."""
    monkeypatch.setattr(disk_mod, "CHUNK", 1000)
    return 1000


@pytest.mark.parametrize("n", [0, 1, 250, 251, 1000, 2500])  # float32 count: 0 B .. 10,000 B payloads
def test_multi_chunk_roundtrip_and_layout(tmp_path, small_chunks, n):
    t = disk(tmp_path)
    x = content(n, n)
    assert t.put(key(1), x)
    raw = t.path_of(key(1)).read_bytes()
    h = fmt.decode_header(raw[: fmt.MAX_HEADER])
    assert len(raw) == h.file_len and raw[h.header_len:] == x.numpy().tobytes()
    assert h.checksum == fmt.payload_checksum(x.numpy().tobytes())  # hash-while-writing == one-shot hash
    out = torch.full_like(x, float("nan"))
    assert t.get(key(1), out=out) is out and torch.equal(out, x)
    assert torch.equal(t.get(key(1)), x) and torch.equal(disk(tmp_path).get(key(1)), x)


def test_flips_in_every_chunk_are_detected(tmp_path, small_chunks):
    t = disk(tmp_path)
    x = content(9, 1500)  # 6,000-byte payload: 6 chunks
    t.put(key(1), x)
    path = t.path_of(key(1))
    good = path.read_bytes()
    hlen = fmt.decode_header(good).header_len
    positions = [hlen + p for c in range(6) for p in (c * small_chunks, c * small_chunks + 517, c * small_chunks + 999)]
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 0x01
        path.write_bytes(bad)
        out = torch.zeros_like(x)
        assert t.get(key(1), out=out) is None and not path.exists(), pos
        assert t.put(key(1), x)
    assert t.stats()["corrupt"] == len(positions)


def test_cut_tails_of_multi_chunk_payload_are_detected(tmp_path, small_chunks):
    t = disk(tmp_path)
    x = content(10, 1500)
    t.put(key(1), x)
    path = t.path_of(key(1))
    good = path.read_bytes()
    hlen = fmt.decode_header(good).header_len
    cuts = [hlen + c * small_chunks + d for c in range(6) for d in (0, 1, 999)]
    for cut in cuts:
        path.write_bytes(good[:cut])
        assert t.get(key(1)) is None and not path.exists(), cut
        t.put(key(1), x)
    assert t.stats()["corrupt"] == len(cuts)


@pytest.mark.parametrize("n", [100, 2500])  # one chunk, many chunks
def test_short_reads_and_writes_are_carried_on(tmp_path, monkeypatch, small_chunks, n):
    """The kernel may move fewer bytes than asked; the tier must continue, not call the entry corrupt."""
    real_preadv, real_pwrite = os.preadv, os.pwrite

    def short_preadv(fd, bufs, offset):
        return real_preadv(fd, [memoryview(bufs[0])[:333]], offset)

    def short_pwrite(fd, data, offset):
        return real_pwrite(fd, memoryview(data)[:333], offset)

    t = disk(tmp_path)
    x = content(n, n)
    monkeypatch.setattr(os, "pwrite", short_pwrite)
    assert t.put(key(1), x)
    monkeypatch.setattr(os, "preadv", short_preadv)
    assert torch.equal(t.get(key(1)), x) and t.stats()["corrupt"] == 0
    monkeypatch.setattr(os, "preadv", real_preadv)
    assert t.path_of(key(1)).read_bytes()[-n * 4:] == x.numpy().tobytes()


def test_failed_write_leaves_no_temp_and_loses_nothing(tmp_path, monkeypatch):
    t = disk(tmp_path)
    t.put(key(1), content(1))
    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    assert not t.put(key(1), content(2)) and not t.put(key(2), content(2))
    st = t.stats()
    assert st["io_errors"] == 2 and st["rejected"] == 2 and t.used_bytes == t.entry_nbytes(key(1))

    def interrupted(fd, data, offset):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "pwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.put(key(3), content(3))
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert not list(t.dir.rglob("*.tmp")) and t.used_bytes == t.entry_nbytes(key(1))
    assert torch.equal(t.get(key(1)), content(1)) and len(t) == 1


def test_directory_fsync_failure_after_rename_keeps_the_entry(tmp_path, monkeypatch):
    t = disk(tmp_path, fsync=True)

    def broken(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(disk_mod, "_fsync_dir", broken)
    assert t.put(key(1), content(1))  # the file is complete and published; only durability is in doubt
    assert t.stats()["io_errors"] == 1 and torch.equal(t.get(key(1)), content(1))


def test_bad_header_fields_fail_before_any_file_exists(tmp_path):
    t = disk(tmp_path)
    with pytest.raises(ValueError, match="dims"):
        fmt.check_fields("float32", "none", fmt.MAX_NDIM + 1)
    with pytest.raises(ValueError, match="longer than 255"):
        fmt.check_fields("x" * 256, "none", 1)
    assert not list(t.dir.rglob("*"))


def test_out_of_other_layouts_and_dtypes(tmp_path, small_chunks):
    t = disk(tmp_path)
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    t.put(key(1), x)
    out = torch.empty(30, 40, dtype=torch.bfloat16).t()  # non-contiguous: read into a staging tensor, copied
    assert t.get(key(1), out=out) is out and torch.equal(out, x)
    with pytest.raises(ValueError, match="out is"):
        t.get(key(1), out=torch.empty(40, 30))
