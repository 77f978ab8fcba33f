"""Crash test: a real writer process is SIGKILLed at random points; what survives is always exact.

Each round forks a child that stores entries into the disk tier in a loop (fsync on, the production
setting), with content derived only from the key so the parent knows what every entry must hold. The
parent kills it with SIGKILL after a random delay, then a fresh DiskTier rebuilds the index from the
directory and every entry it serves must be bit-exact; temp files of the dead writer must be gone.
A last check runs in a freshly spawned interpreter.
"""

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from qwen3vl_ray.keys import Namespace
from qwen3vl_ray.tiers.config import TierConfig
from qwen3vl_ray.tiers.disk import DiskTier

NS = Namespace(model="crash-test")
N_KEYS = 48
CAPACITY = 12 << 20
ROUNDS = 22


def key(i: int) -> bytes:
    return b"crash-k" + i.to_bytes(9, "big")


def expected(i: int) -> torch.Tensor:
    n = 4096 + (i * 104_729) % (900 << 10)  # 4 KiB .. ~900 KiB: kills land inside writes and fsyncs
    return torch.from_numpy(np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8))


def make(path: str) -> DiskTier:
    return DiskTier(TierConfig("disk", CAPACITY, path=path, fsync=True), NS)


def _writer(path: str, seed: int, conn) -> None:
    tier = make(path)
    rng = random.Random(seed)
    conn.send("go")
    while True:
        i = rng.randrange(N_KEYS)
        if rng.random() < 0.15:
            tier.remove(key(i))
        elif not tier.put(key(i), expected(i)):
            for k in list(tier.keys())[: rng.randint(1, 4)]:  # full: drop a few, like an evicting cache
                tier.remove(k)


def verify(tier: DiskTier) -> int:
    index = {key(i): i for i in range(N_KEYS)}
    served = 0
    for k in list(tier.keys()):
        got = tier.get(k)
        assert got is not None, f"indexed entry {k!r} not served after crash"
        assert torch.equal(got, expected(index[k])), f"entry {k!r} not bit-exact after crash"
        served += 1
    return served


@pytest.mark.slow
def test_sigkill_writer_never_leaves_bad_entries(tmp_path):
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    path = str(tmp_path / "cache")
    rng = random.Random(1234)
    total_served = stray_removed = 0
    deadline = time.monotonic() + 120
    for round_ in range(ROUNDS):
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_writer, args=(path, round_, child_end), daemon=True)
        proc.start()
        assert parent_end.poll(30), "writer did not start"
        parent_end.recv()
        time.sleep(rng.uniform(0.0, 0.35))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        # a fresh tier rebuilds the index from what the killed writer left
        tier = make(path)
        s = tier.stats()
        assert s["corrupt"] == 0, f"round {round_}: a complete-named file was torn: {s}"
        assert tier.used_bytes <= CAPACITY
        assert not list(tier.dir.rglob("*.tmp")), "temp files of the dead writer survived the restart"
        total_served += verify(tier)
        stray_removed += s["stray_tmp_removed"]
        tier.close()  # one process per directory: the next writer (another process) needs the lock
        assert time.monotonic() < deadline
    assert total_served > ROUNDS  # the test really stored and served entries
    assert stray_removed >= 1  # and at least one kill landed inside a write

    # last check in a brand-new interpreter: no state shared with this process at all
    script = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.test_disk_crash import make, verify;"
        f"t = make({path!r}); n = verify(t); assert t.stats()['corrupt'] == 0; print('served', n)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("served ")
