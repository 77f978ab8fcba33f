"""The fused kernels' disk cache: saves locked across processes (numba_cache_lock), and ``qwen3vl-ray
warm-kernels``, after which a fresh process runs every codec path on the warmed dtype without compiling.

The processes here are real: the race runs two interpreters against one cache directory, and the warm-up runs
the command as a user does, on a numba cache directory of its own (``NUMBA_CACHE_DIR``), so it compiles cold.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qwen3vl_ray.codecs import fused, warmup
from qwen3vl_ray.errors import ConfigError

CLI = str(Path(sys.executable).parent / "qwen3vl-ray")

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused kernels are off on this host")

_SAVER = textwrap.dedent("""
    import sys
    from numba.core import caching
    from qwen3vl_ray.codecs import numba_cache_lock
    assert numba_cache_lock.install()
    f = caching.IndexDataCacheFile(sys.argv[1], "kernel", ("stamp", 1))
    for i in range(300):
        f.save((sys.argv[2], i), ("code of", sys.argv[2], i))
""")


def test_two_processes_saving_one_kernels_signatures_keep_every_entry_with_its_own_code(tmp_path):
    # numba's save takes the first free data file number between reading and writing the index; unlocked, two
    # processes saving 300 signatures each lost ~120 index entries and ~80 of the rest named the other's code
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), who]) for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    from numba.core import caching

    index = caching.IndexDataCacheFile(str(tmp_path), "kernel", ("stamp", 1))
    keys = index._load_index()
    assert sorted(keys) == sorted((who, i) for who in ("a", "b") for i in range(300))
    assert all(index.load(k) == ("code of", *k) for k in keys)
    assert (tmp_path / "kernel.nbi.lock").stat().st_mode & 0o777 == 0o600


def test_importing_the_codecs_locks_numbas_cache():
    from numba.core import caching

    from qwen3vl_ray.codecs import numba_cache_lock

    assert getattr(caching.IndexDataCacheFile, numba_cache_lock._MARK) is True
    assert numba_cache_lock.install() is True  # idempotent: no second wrapper around the first
    assert caching.IndexDataCacheFile.save.__wrapped__.__name__ == "save"
    assert not hasattr(caching.IndexDataCacheFile.save.__wrapped__, "__wrapped__")


@pytest.mark.parametrize("args, says", [
    (["--dtypes", "int8"], "unknown dtype 'int8'"),
    (["--codecs", "kv-int8"], "'kv-int8' is not one of"),
    (["--jobs", "0"], "jobs must be a positive integer"),
])
def test_warm_kernels_refuses_bad_input_in_one_line(args, says):
    got = subprocess.run([CLI, "warm-kernels", *args], capture_output=True, text=True, timeout=120)
    assert got.returncode == 2, got.stderr
    assert says in got.stderr and "Traceback" not in got.stderr


def test_warm_kernels_says_there_is_nothing_to_compile_where_the_kernels_are_off(monkeypatch):
    monkeypatch.setattr(fused, "ENABLED", False)
    with pytest.raises(ConfigError, match="kernels are off"):
        warmup.warm_kernels(["float32"], codecs=["int8"])


_PATHS = textwrap.dedent("""
    import json, torch
    from qwen3vl_ray.codecs import decode, fused, make_codec
    t = torch.randn(2, 2, 4, 300, 64).to(torch.float32)  # a KV chunk: keys per channel, values per token
    for spec in ("kv-int8", "kv-int8:residual=32", "int8", "int8:axis=0", "auto:candidates=kv-int8|int8"):
        c = make_codec(spec)
        x = t if not spec.startswith("int8") else t.reshape(-1, 64)
        p = c.encode(x)
        if hasattr(c, "encode_bounded"):
            c.encode_measured(x)
            for b in fused.BOUNDS:
                c.encode_bounded(x, b)
        assert torch.equal(decode(p), decode(bytes(p)))
    K = fused.K
    kernels = [*K.ENCODE.values(), *K.DECODE.values(), K.SEGMENTS]
    print(json.dumps({"misses": sum(sum(k.stats.cache_misses.values()) for k in kernels),
                      "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels)}))
""")


@pytest.mark.slow
def test_after_warm_kernels_a_fresh_process_runs_every_int8_path_without_compiling(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    got = subprocess.run([CLI, "warm-kernels", "--dtypes", "float32", "--codecs", "int8", "int8:axis=0", "--jobs",
                          "2", "--json"], capture_output=True, text=True, timeout=900, env=env)
    assert got.returncode == 0, got.stderr[-3000:]
    warmed = json.loads(got.stdout.strip().splitlines()[-1])
    assert sorted((w["codec"], w["dtype"]) for w in warmed) == [("int8", "float32"), ("int8:axis=0", "float32")]
    # KV chunks (their keys run the channel kernels, their values the row ones), a residual window, plain
    # tensors both ways, auto's screening and bounds, and decodes of writable and read-only payloads
    ran = subprocess.run([sys.executable, "-c", _PATHS], capture_output=True, text=True, timeout=900, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    stats = json.loads(ran.stdout.strip().splitlines()[-1])
    assert stats["misses"] == 0 and stats["hits"] >= 8, stats
