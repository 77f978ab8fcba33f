"""The disk tier fails closed: what another local user (or a stray process) leaves in its way ends in a
refusal or a counted miss, never in served data, a hang or an exception.

"Another user" is real where the tests run as root: directories and files are handed to an unprivileged
uid with ``os.chown``, and attacker (or unprivileged victim) steps run in a forked child that drops to that
uid with ``setgid``/``setuid`` (a fork, not an exec: the interpreter lives under a directory only root may
enter). Without root those tests are skipped; the rest need no privilege.
"""

import errno
import os
import pickle
import resource
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qwen3vl_ray.keys import Namespace, key_hex
from qwen3vl_ray.tiers import disk as disk_mod
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.disk import DiskTier
from qwen3vl_ray.tiers.private_dirs import DirectoryInUseError, UnsafeDirectoryError

ROOT = Path(__file__).resolve().parents[1]
NS = Namespace(model="disk-security")
OTHER = 4242  # an unprivileged uid (and gid) of nobody in particular: no passwd entry needed
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files of another owner")


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def value(i: int, n: int = 256) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32) * (i + 1)


def tier(path, **kw) -> DiskTier:
    kw.setdefault("fsync", False)
    return DiskTier(TierConfig("disk", 1 << 20, path=str(path), **kw), NS)


def entry_bytes(tmp_path, i: int, v: torch.Tensor) -> bytes:
    """The file a victim's tier would write for key(i) = v: a valid entry an attacker can copy or forge."""
    t = tier(tmp_path / f"scratch-{i}-{int(v[1])}")
    t.put(key(i), v)
    raw = t.path_of(key(i)).read_bytes()
    t.close()
    return raw


def in_child(fn, *args, uid: int | None = None, timeout: float = 20.0):
    """Run ``fn(*args)`` in a forked child (as ``uid`` if given) and return its result. A child that does
    not answer within ``timeout`` (a hang) is killed and the test fails; an exception comes back as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = pickle.dumps(("raised", f"{type(exc).__name__}: {exc}"))
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, 9)
                pytest.fail(f"{fn.__name__} did not finish within {timeout} s (a hang)")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    status, result = pickle.loads(b"".join(chunks))
    if status == "raised":
        raise AssertionError(f"{fn.__name__} raised in the child: {result}")
    return result


@pytest.fixture
def shared():
    """A directory under /tmp that another uid can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="qwen3vl-disk-sec-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- the root ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_root_others_can_write_is_refused_and_left_as_it_is(tmp_path, mode):
    root = tmp_path / "cache"
    root.mkdir()
    os.chmod(root, mode)
    with pytest.raises(UnsafeDirectoryError, match=f"refuses {root}: the root is writable by others.*chmod go-w {root}"):
        tier(root)
    assert stat.S_IMODE(root.stat().st_mode) == mode and not list(root.iterdir())  # never chmod'ed, nothing made


def test_a_root_under_a_world_writable_parent_is_refused(tmp_path):
    # whoever can write the parent (no sticky bit) can rename the root away and put their own in its place
    parent = tmp_path / "open"
    (parent / "cache").mkdir(parents=True)
    os.chmod(parent, 0o777)
    with pytest.raises(UnsafeDirectoryError, match=f"its parent {parent} is writable by everyone"):
        tier(parent / "cache")
    os.chmod(parent, 0o1777)  # sticky, like /tmp: others cannot rename what is ours
    assert tier(parent / "cache").put(key(1), value(1))


@as_root
def test_a_root_of_another_user_is_refused(shared):
    root = shared / "cache"
    root.mkdir(mode=0o700)
    os.chown(root, OTHER, OTHER)
    with pytest.raises(UnsafeDirectoryError, match=f"belongs to uid {OTHER}, not this user"):
        tier(root)


def test_the_default_and_a_tilde_path_are_private(tmp_path, monkeypatch):
    from actors.config import AgentConfig
    from qwen3vl_ray import settings

    assert not AgentConfig().disk_dir.startswith("/tmp")
    assert not settings.resolve({}, {}).disk_dir.startswith("/tmp")
    monkeypatch.setenv("HOME", str(tmp_path))
    t = tier("~/.cache/qwen3vl-ray/disk-tier")  # expanded, created 0700
    assert t.dir.is_relative_to(tmp_path) and stat.S_IMODE(t.root.stat().st_mode) == 0o700


# -- planted directories and entries (another user) --------------------------------------------------
def _plant_namespace(root: str, ns_hex: str, sub: str, name: str, raw: bytes) -> str:
    """Attacker: make the victim's namespace directory first, chmod it 0700 (still theirs) and plant an entry."""
    ns = os.path.join(root, ns_hex)
    os.makedirs(os.path.join(ns, sub))
    with open(os.path.join(ns, sub, name), "wb") as f:
        f.write(raw)
    os.chmod(ns, 0o700)
    return "planted"


@as_root
def test_a_namespace_directory_made_by_another_user_is_refused_even_after_the_root_is_fixed(shared, tmp_path):
    root = shared / "cache"
    root.mkdir()
    os.chmod(root, 0o777)  # the old, open default under /tmp
    h = key_hex(key(1))
    forged = entry_bytes(tmp_path, 1, torch.full((256,), 666, dtype=torch.int32))
    assert in_child(_plant_namespace, str(root), NS.hex, h[:2], f"{h}.qvt", forged, uid=OTHER) == "planted"
    with pytest.raises(UnsafeDirectoryError, match="writable by others"):
        tier(root)
    os.chmod(root, 0o755)  # the user follows the fix for the root; the attacker's directory is still there
    with pytest.raises(UnsafeDirectoryError, match=f"refuses {root / NS.hex}: it belongs to uid {OTHER}"):
        tier(root)
    st = (root / NS.hex).stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (OTHER, 0o700)  # never chmod'ed or taken over


@as_root
def test_planted_entries_and_subdirectories_of_another_owner_are_never_served(tmp_path):
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1))
    t.close()
    # while the victim is down: a forged entry owned by another uid under key(2)'s name ...
    forged = entry_bytes(tmp_path, 2, value(99))
    p2 = t.path_of(key(2))
    p2.parent.mkdir(mode=0o700, exist_ok=True)
    p2.write_bytes(forged)
    os.chown(p2, OTHER, OTHER)
    t2 = tier(tmp_path / "cache")
    assert t2.get(key(2)) is None and not p2.exists() and t2.stats()["unsafe"] == 1
    assert torch.equal(t2.get(key(1)), value(1))
    # ... and swapped in under a live entry's name: a counted miss, the entry leaves the index
    p1 = t2.path_of(key(1))
    p1.write_bytes(entry_bytes(tmp_path, 1, value(98)))
    os.chown(p1, OTHER, OTHER)
    misses = t2.stats()["misses"]
    assert t2.get(key(1)) is None and not t2.contains(key(1)) and not p1.exists()
    assert t2.stats()["misses"] == misses + 1 and t2.stats()["unsafe"] == 2 and t2.used_bytes == 0
    t2.close()
    # a 2-hex directory of another owner cannot be emptied by us, nor trusted: refused
    foreign = t.dir / "ab"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, OTHER, OTHER)
    with pytest.raises(UnsafeDirectoryError, match=f"refuses {foreign}: it belongs to uid {OTHER}"):
        tier(tmp_path / "cache")


# -- renamed directories -----------------------------------------------------------------------------
def _rename_and_plant(ns: str, raw: bytes, rel: str) -> str:
    try:
        os.rename(ns, ns + ".moved")
    except PermissionError:
        return "rename refused"
    os.makedirs(os.path.join(ns, os.path.dirname(rel)))
    with open(os.path.join(ns, rel), "wb") as f:
        f.write(raw)
    return "renamed"


@as_root
def test_another_user_cannot_rename_the_namespace_directory_away(shared, tmp_path):
    root = shared / "cache"
    t = tier(root)  # created 0700 by the victim: nobody else may rename inside it
    t.put(key(1), value(1))
    forged = entry_bytes(tmp_path, 1, value(666))
    os.chmod(root, 0o755)  # even a readable root is not writable by the attacker
    assert in_child(_rename_and_plant, str(t.dir), forged, DiskTier._rel(key(1)), uid=OTHER) == "rename refused"
    assert torch.equal(t.get(key(1)), value(1))


def test_a_live_tier_is_never_redirected_by_a_renamed_directory(tmp_path):
    # whoever renames the namespace directory away (here: this user) and puts a forged one in its place does
    # not reach the live tier: it holds its directory open and reads relative to it
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1))
    forged = entry_bytes(tmp_path, 1, value(666))
    assert _rename_and_plant(str(t.dir), forged, DiskTier._rel(key(1))) == "renamed"
    assert torch.equal(t.get(key(1)), value(1))  # its own entry, from the renamed directory
    assert t.put(key(2), value(2)) and not t.path_of(key(2)).exists()  # stores land there too
    assert Path(str(t.dir) + ".moved", DiskTier._rel(key(2))).exists()
    t.close()


# -- symbolic links ------------------------------------------------------------------------------------
def test_a_symlinked_namespace_directory_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "cache").mkdir(mode=0o700)
    os.symlink(elsewhere, tmp_path / "cache" / NS.hex)
    with pytest.raises(UnsafeDirectoryError, match="symbolic link"):
        tier(tmp_path / "cache")
    assert not list(elsewhere.iterdir())


def test_a_symlinked_subdirectory_is_removed_never_followed(tmp_path):
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1))
    t.close()
    far = 0xAB << 120  # a key under another 2-hex prefix than key(1)'s "00"
    h = key_hex(key(far))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{h}.qvt").write_bytes(entry_bytes(tmp_path, far, value(2)))  # a valid entry, outside the root
    os.symlink(outside, t.dir / h[:2])
    t2 = tier(tmp_path / "cache")
    assert not t2.contains(key(far)) and t2.get(key(far)) is None and t2.stats()["unsafe"] == 1
    assert not (t.dir / h[:2]).is_symlink()
    # a store under that prefix goes into a real directory inside the root, not through the link
    assert t2.put(key(far), value(3)) and (t.dir / h[:2]).is_dir() and not (t.dir / h[:2]).is_symlink()
    assert torch.equal(t2.get(key(far)), value(3))
    assert (outside / f"{h}.qvt").read_bytes() == entry_bytes(tmp_path, far, value(2))  # untouched


def test_a_symlinked_entry_file_is_a_counted_miss_at_start_and_live(tmp_path):
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1))
    t.put(key(2), value(2))
    valid_copy = tmp_path / "copy.qvt"
    valid_copy.write_bytes(t.path_of(key(1)).read_bytes())
    # live: key(1)'s file replaced by a link to a valid copy of itself -> ELOOP, a counted miss, dropped
    os.unlink(t.path_of(key(1)))
    os.symlink(valid_copy, t.path_of(key(1)))
    assert t.get(key(1)) is None and not t.contains(key(1)) and not t.path_of(key(1)).is_symlink()
    s = t.stats()
    assert s["unsafe"] == 1 and s["io_errors"] == 1 and s["misses"] == 1 and t.used_bytes == t.entry_nbytes(key(2))
    t.close()
    # at start-up: a link under an entry's name is removed and counted
    os.symlink(valid_copy, t.path_of(key(1)))
    t2 = tier(tmp_path / "cache")
    assert set(t2.keys()) == {key(2)} and t2.stats()["unsafe"] == 1 and not t2.path_of(key(1)).is_symlink()
    assert valid_copy.exists()


# -- a FIFO under an entry's name -------------------------------------------------------------------------
def _fifo_scenario(path: str) -> dict:
    t = tier(path)
    t.put(key(1), value(1))
    t.put(key(2), value(2))
    p1 = t.path_of(key(1))
    os.unlink(p1)
    os.mkfifo(p1, 0o600)                       # live: would block open() forever without O_NONBLOCK
    live = t.get(key(1))
    live_stats = t.stats()
    t.close()
    os.mkfifo(t.path_of(key(3)), 0o600)        # at start-up: the index rebuild opens every entry
    t2 = tier(path)
    return {"live": live, "live_unsafe": live_stats["unsafe"], "indexed": sorted(t2.keys()),
            "start_unsafe": t2.stats()["unsafe"], "left": sorted(p.name for p in t2.dir.rglob("*.qvt")),
            "two": t2.get(key(2)).tolist()}


def test_a_fifo_never_hangs_start_up_or_get(tmp_path):
    r = in_child(_fifo_scenario, str(tmp_path / "cache"), timeout=30)
    assert r["live"] is None and r["live_unsafe"] == 1
    assert r["indexed"] == [key(2)] and r["start_unsafe"] == 1
    assert r["left"] == [f"{key_hex(key(2))}.qvt"] and r["two"] == value(2).tolist()


# -- OS errors on read are counted misses ---------------------------------------------------------------------
@pytest.mark.parametrize("err, kept", [(errno.EMFILE, True), (errno.ENFILE, True), (errno.EACCES, False),
                                       (errno.ELOOP, False), (errno.ENOTDIR, False), (errno.EIO, False)])
def test_os_errors_on_open_are_counted_misses(tmp_path, monkeypatch, err, kept):
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1))
    t.put(key(2), value(2))
    real_open = os.open

    def failing(path, flags, mode=0o777, *, dir_fd=None):
        if str(path).endswith(key_hex(key(1)) + ".qvt"):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", failing)
    for _ in range(3):  # never raises, however often it is asked
        assert t.get(key(1)) is None
    monkeypatch.setattr(os, "open", real_open)
    s = t.stats()
    assert s["misses"] == 3 and s["hits"] == 0 and s["io_errors"] == (3 if kept else 1)
    # a passing, process-wide error keeps the entry (it reads fine later); any other drops it, file and all
    assert t.contains(key(1)) == kept and t.path_of(key(1)).exists() == kept
    assert t.used_bytes == t.entry_nbytes(key(2)) * (2 if kept else 1)
    assert (t.get(key(1)) is not None) == kept and torch.equal(t.get(key(2)), value(2))


def test_an_io_error_while_reading_the_payload_is_a_counted_miss(tmp_path, monkeypatch):
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1, 4096))

    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    assert t.get(key(1)) is None and not t.contains(key(1)) and t.stats()["io_errors"] == 1


def _real_emfile(path: str) -> dict:
    t = tier(path)
    t.put(key(1), value(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    try:
        miss = t.get(key(1))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"miss": miss, "stats": t.stats(), "after": t.get(key(1)).tolist()}


def test_running_out_of_descriptors_is_a_counted_miss(tmp_path):
    r = in_child(_real_emfile, str(tmp_path / "cache"))
    assert r["miss"] is None and r["stats"]["io_errors"] == 1 and r["stats"]["misses"] == 1
    assert r["after"] == value(1).tolist()  # the entry stayed: it reads once descriptors are back


def _unprivileged_victim(path: str) -> dict:
    """Runs as an unprivileged uid, so permissions really apply (root would read a 000 file anyway)."""
    t = tier(path)
    t.put(key(1), value(1))
    t.put(key(2), value(2))
    os.chmod(t.path_of(key(1)), 0)                # EACCES on open
    sub = t.path_of(key(0xCD << 120)).parent
    os.makedirs(sub, mode=0o700, exist_ok=True)
    os.chmod(sub, 0o500)                          # EACCES on store: a failed put, not an exception
    out = {"get": t.get(key(1)), "put": t.put(key(0xCD << 120), value(3))}
    os.chmod(sub, 0o700)
    out.update(stats=t.stats(), indexed=sorted(t.keys()), exists=t.path_of(key(1)).exists(),
               two=t.get(key(2)).tolist())
    return out


@as_root
def test_permission_errors_as_an_unprivileged_user_are_a_miss_and_a_failed_put(shared):
    root = shared / "victim"
    root.mkdir(mode=0o700)
    os.chown(root, OTHER, OTHER)
    r = in_child(_unprivileged_victim, str(root), uid=OTHER)
    assert r["get"] is None and r["put"] is False
    assert r["stats"]["misses"] == 1 and r["stats"]["io_errors"] == 2 and r["stats"]["rejected"] == 1
    assert r["indexed"] == [key(2)] and not r["exists"] and r["two"] == value(2).tolist()


# -- one process per directory -------------------------------------------------------------------------
SECOND = textwrap.dedent("""
    import sys
    from qwen3vl_ray.keys import Namespace
    from qwen3vl_ray.tiers.config import TierConfig
    from qwen3vl_ray.tiers.disk import DiskTier
    try:
        t = DiskTier(TierConfig("disk", 1 << 20, path=sys.argv[1], fsync=False), Namespace(model="disk-security"))
    except OSError as exc:
        print("refused:", exc)
    else:
        print("opened:", len(t))
""")


def second_process(path) -> str:
    out = subprocess.run([sys.executable, "-c", SECOND, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_second_process_on_the_same_directory_is_refused(tmp_path):
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1))
    again = tier(tmp_path / "cache")  # the same process may reopen it (they share the lock)
    assert torch.equal(again.get(key(1)), value(1))
    msg = second_process(tmp_path / "cache")
    assert msg.startswith("refused:") and f"{t.dir} is in use by another process" in msg
    t.close()
    assert second_process(tmp_path / "cache").startswith("refused:")  # ``again`` still holds it
    again.close()
    assert second_process(tmp_path / "cache") == "opened: 1"


def _open_in_forked_child(path: str) -> str:
    try:
        tier(path)
    except DirectoryInUseError:
        return "refused"
    return "opened"


def test_a_forked_child_does_not_inherit_the_directory(tmp_path):
    t = tier(tmp_path / "cache")
    assert in_child(_open_in_forked_child, str(tmp_path / "cache")) == "refused"
    t.close()
    assert in_child(_open_in_forked_child, str(tmp_path / "cache")) == "opened"


# -- temp files and durability ------------------------------------------------------------------------------
def test_stray_temp_files_go_whatever_pid_they_name(tmp_path):
    t = tier(tmp_path / "cache")
    t.put(key(1), value(1))
    t.close()
    sub = t.path_of(key(1)).parent
    h = key_hex(key(1))
    alive = sub / f".{h}.{os.getpid()}.0.tmp"          # an old-style name whose pid is alive (ours)
    alive.write_bytes(b"x" * 100)
    mine = sub / f".{h}.{disk_mod._process_token()}.7.tmp"  # an in-flight store of this process
    mine.write_bytes(b"y")
    t2 = tier(tmp_path / "cache")
    assert not alive.exists() and mine.exists() and t2.stats()["stray_tmp_removed"] == 1


def test_new_subdirectories_and_removals_are_fsynced_in_their_parent(tmp_path, monkeypatch):
    t = tier(tmp_path / "cache", fsync=True)
    synced = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    sub = str(t.path_of(key(1)).parent)
    assert t.put(key(1), value(1))
    assert synced.index(str(t.dir)) < synced.index(sub)  # the new 2-hex directory, before the entry's rename
    synced.clear()
    assert t.remove(key(1)) and synced == [sub]          # the removal
