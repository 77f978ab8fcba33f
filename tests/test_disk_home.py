"""DiskHome: a disk-tier directory stable for a machine and disk, one live holder per slot, trimmed to budget."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qwen3vl_ray.keys import Namespace, chunk_keys
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.disk import DiskTier
from qwen3vl_ray.tiers.disk_home import ID_FILE, DiskHome, machine_tag

ROOT = Path(__file__).resolve().parents[1]
M = "0123456789abcdef"  # a machine tag
NS = Namespace(model="m", dtype="bfloat16")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def fill(d: Path, nbytes: int, age_s: float) -> Path:
    """A directory holding one file of ``nbytes``, last written ``age_s`` ago."""
    d.mkdir(parents=True, exist_ok=True)
    f = d / "f.qvt"
    f.write_bytes(b"x" * nbytes)
    t = time.time() - age_s
    os.utime(f, (t, t))
    os.utime(d, (t, t))
    return d


# -- identity --------------------------------------------------------------------------------------
def test_machine_tag_is_a_private_hash_of_the_machine_id(tmp_path):
    ids = tmp_path / "machine-id"
    ids.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    tag = machine_tag(tmp_path / "disk", id_files=(str(tmp_path / "missing"), str(ids)))
    assert len(tag) == 16 and tag not in "3d1219c7c4c5404aaa1f6d2a48adfda4"
    # stable across calls (reboots, ray up re-runs), different for another machine
    assert machine_tag(tmp_path / "other", id_files=(str(ids),)) == tag
    ids.write_text("ffffffffffffffffffffffffffffffff\n")
    assert machine_tag(tmp_path / "disk", id_files=(str(ids),)) != tag


def test_without_a_machine_id_a_random_id_is_kept_on_the_disk_itself(tmp_path):
    bad = tmp_path / "machine-id"
    bad.write_text("not an id\n")  # malformed ids are not trusted
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    tag = machine_tag(a, id_files=(str(bad),))
    assert machine_tag(a, id_files=(str(bad),)) == tag  # persisted: the same disk keeps its name
    assert mode(a / ID_FILE) == 0o600
    assert machine_tag(b, id_files=(str(bad),)) != tag  # another (wiped, replaced) disk gets a new one
    assert [p.name for p in a.iterdir()] == [ID_FILE]  # no temp file left


# -- slots -----------------------------------------------------------------------------------------
def test_live_claims_get_their_own_slots_and_a_released_slot_is_reclaimed(tmp_path):
    first = DiskHome.claim(tmp_path / "disk", owner="a", machine=M)
    second = DiskHome.claim(tmp_path / "disk", owner="b", machine=M)
    assert (first.slot, second.slot) == (0, 1) and first.path != second.path
    assert first.path.name == f"machine-{M}-0" and mode(first.path) == 0o700 and mode(tmp_path / "disk") == 0o700
    # the first agent goes away; the one that comes after it takes the lowest free slot: its files
    first.release()
    first.release()  # idempotent
    again = DiskHome.claim(tmp_path / "disk", owner="c", machine=M)
    assert again.slot == 0 and again.path == first.path


def test_the_same_owner_in_one_process_shares_its_slot(tmp_path):
    # a node's agent rebuilt in place (same node id) opens the directory the old one used
    old = DiskHome.claim(tmp_path, owner="node1", machine=M)
    new = DiskHome.claim(tmp_path, owner="node1", machine=M)
    assert new.path == old.path
    old.release()  # the slot stays held while the new one has it
    assert DiskHome.claim(tmp_path, owner="node2", machine=M).slot == 1
    new.release()
    assert DiskHome.claim(tmp_path, owner="node3", machine=M).slot == 0


def test_a_killed_holder_frees_its_slot(tmp_path):
    # another process holds slot 0; SIGKILL it -> the kernel drops its lock and slot 0 is free again
    code = textwrap.dedent(f"""
        import sys, time
        from qwen3vl_ray.tiers.disk_home import DiskHome
        h = DiskHome.claim({str(tmp_path)!r}, machine={M!r})
        print(h.slot, flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "0"
        mine = DiskHome.claim(tmp_path, owner="x", machine=M)
        assert mine.slot == 1
        mine.release()
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert DiskHome.claim(tmp_path, owner="y", machine=M).slot == 0


def test_names_are_validated(tmp_path):
    with pytest.raises(ValueError, match="owner"):
        DiskHome.claim(tmp_path, owner="../evil", machine=M)
    with pytest.raises(ValueError, match="machine tag"):
        DiskHome.claim(tmp_path, machine="../x")
    # a file squatting on slot 0's name is skipped, never followed or replaced
    (tmp_path / f"machine-{M}-0").write_text("not a directory")
    assert DiskHome.claim(tmp_path, machine=M).slot == 1


def test_a_disk_tier_releases_its_home_on_close(tmp_path):
    home = DiskHome.claim(tmp_path, owner="n", machine=M)
    tier = DiskTier(TierConfig("disk", 1 << 20, path=str(home.path)), NS, lease=home)
    key = chunk_keys(NS, list(range(8)), chunk_size=8)[0]
    assert tier.put(key, torch.ones(4))
    tier.close()
    assert not home.held
    # a new process' claim gets the same home and serves the entry
    again = DiskHome.claim(tmp_path, owner="m", machine=M)
    assert again.path == home.path
    assert torch.equal(DiskTier(TierConfig("disk", 1 << 20, path=str(again.path)), NS).get(key), torch.ones(4))


# -- trim ------------------------------------------------------------------------------------------
def test_trim_removes_the_oldest_unheld_directories_until_within_budget(tmp_path):
    home = DiskHome.claim(tmp_path, owner="me", machine=M)
    keep = NS.hex
    fill(home.path / keep, 100, age_s=0)                                  # the live tier's namespace
    old_ns = fill(home.path / ("a" * 32), 300, age_s=500)                  # an old namespace of this home
    other_machine = fill(tmp_path / "machine-fedcba9876543210-0", 300, age_s=400)
    legacy = fill(tmp_path / ("node-" + "ab" * 28), 300, age_s=300)         # a per-Ray-node directory of old
    newest = fill(tmp_path / f"machine-{M}-3", 300, age_s=100)
    held = DiskHome.claim(tmp_path, owner="live", machine=M)              # another live agent: slot 1
    fill(held.path / keep, 300, age_s=1000)
    foreign = [fill(tmp_path / ("b" * 32), 300, age_s=2000), fill(tmp_path / "notes", 300, age_s=2000)]
    # 100 live + 4 x 300 unheld = 1300 over a 800-byte budget -> the two oldest unheld (500 s, 400 s) go;
    # the held home (oldest of all) and names we did not make are never touched
    removed = home.trim(800, used_bytes=100, keep_namespace=keep)
    assert [r.path for r in removed] == [str(old_ns), str(other_machine)]
    assert [r.nbytes for r in removed] == [300, 300]
    assert not old_ns.exists() and not other_machine.exists()
    assert legacy.exists() and newest.exists() and (held.path / keep / "f.qvt").exists()
    assert all(f.exists() for f in foreign) and (home.path / keep / "f.qvt").exists()
    # within budget: nothing more goes
    assert home.trim(800, used_bytes=100, keep_namespace=keep) == []
    # a smaller budget takes the rest of the unheld ones, oldest first, and still not the held one
    assert [r.path for r in home.trim(100, used_bytes=100, keep_namespace=keep)] == [str(legacy), str(newest)]
    assert held.path.exists() and (home.path / "lock").exists()


def test_trim_never_follows_links_or_touches_others_files(tmp_path):
    home = DiskHome.claim(tmp_path / "root", owner="me", machine=M)
    outside = fill(tmp_path / "outside", 500, age_s=1000)
    os.symlink(outside, tmp_path / "root" / f"machine-{M}-7")
    assert home.trim(0, used_bytes=0, keep_namespace=NS.hex) == []
    assert (outside / "f.qvt").exists()


# -- the node agent on top -------------------------------------------------------------------------
def test_an_agent_under_a_new_node_id_serves_the_last_ones_disk_entries_and_trims_old_node_dirs(tmp_path):
    from actors.config import AgentConfig
    from actors.node_agent import NodeAgentLogic
    from actors.object_store_tier import LocalObjectStore
    from actors.wire import WireChunk
    from qwen3vl_ray.keys import CacheKey

    chunk = 4096  # bytes of one chunk: 2048 bf16 values
    cfg = AgentConfig(host_bytes=2 * chunk, disk_bytes=8 * chunk, disk_dir=str(tmp_path), disk_fsync=False,
                      policy="lru")
    keys = [CacheKey(i.to_bytes(16, "little")) for i in range(4)]
    data = [torch.full((2, 1024), float(i), dtype=torch.bfloat16) for i in range(4)]
    # an old per-Ray-session directory and another machine's home, unheld: 6 + 4 chunks > the 8-chunk budget
    legacy = fill(tmp_path / ("node-" + "1" * 56), 6 * chunk, age_s=600)
    stale = fill(tmp_path / f"machine-{'e' * 16}-0", 4 * chunk, age_s=300)
    first = NodeAgentLogic("a" * 32, cfg, LocalObjectStore())
    assert not legacy.exists() and stale.exists()  # the oldest went; 4 chunks fit beside an empty tier
    assert first.put_chunks([WireChunk.of(k, t) for k, t in zip(keys, data)]) == ["disk"] * 2 + ["host"] * 2
    first.close()
    # the next Ray session: a new node id, the same machine and disk -> the same home, its entries served
    again = NodeAgentLogic("b" * 32, cfg, LocalObjectStore())
    assert again.disk.dir == first.disk.dir
    assert stale.exists()  # 2 chunks on disk + 4 unheld still fit the budget
    got = again.get_tensors(keys)
    assert torch.equal(got[0], data[0]) and torch.equal(got[1], data[1]) and got[2] is None and got[3] is None
    again.close()
