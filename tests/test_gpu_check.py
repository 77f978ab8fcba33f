"""``scripts/gpu_check.sh`` end to end in its CPU mode (``--cpu``: the GPU check's steps on CPU, tiny sizes).

On this interpreter with no venv (``GPU_CHECK_VENV=none``), except where the venv and the offline wheels are the
point. Speeds are not asserted (the machine is shared): the files each step writes, that they parse and hold
the benchmarks' rows, and that a failing step fails the run without stopping the steps after it.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(res: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_VENV": "none", **env}
    return subprocess.run(["bash", str(SCRIPT), "--cpu", *args, str(res)], env=e, capture_output=True, text=True,
                          timeout=300)


def steps(res: Path) -> dict[str, dict]:
    summary = json.loads((res / "summary.json").read_text())
    assert summary["mode"] == "cpu"
    return {s["step"]: s for s in summary["steps"]}


@pytest.mark.slow
def test_cpu_run_writes_every_result(tmp_path):
    res = tmp_path / "results"
    r = gpu_check(res)
    assert r.returncode == 0, r.stdout + r.stderr
    by = steps(res)
    assert list(by) == ["setup", "env", "cuda_tests", "codecs", "tiers", "connector", "pools"]
    assert all(s["status"] in ("ok", "skipped") for s in by.values()), by
    assert by["pools"]["status"] == "skipped" and "no CUDA rows" in by["pools"]["note"]
    assert "pools" in r.stdout and "results in" in r.stdout  # the summary table

    env = json.loads((res / "env.json").read_text())
    assert env["mode"] == "cpu" and env["executable"] == sys.executable and env["torch"]

    suite = ET.parse(res / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == int(suite.get("errors")) == 0

    rows = json.loads((res / "codecs.json").read_text())
    assert {r["codec"] for r in rows} >= {"none", "int8", "kv-int8", "kv-int4"}
    assert all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 and r["memcpy_gbps"] > 0 for r in rows)

    dev = json.loads((res / "tiers.json").read_text())["device_tier"]
    assert dev["device"] == "cpu" and list(dev["sizes"]) == ["1MiB"]
    row = dev["sizes"]["1MiB"]
    assert all(row[f"{c}_gbps"] > 0 for c in ("d2d", "h2d", "d2h", "device_put", "device_get",
                                               "device_put_from_host", "device_get_to_host"))
    assert set(dev["worst_ratios"]) == {"device_put_vs_d2d", "device_get_vs_d2d", "device_put_from_host_vs_h2d",
                                        "device_get_to_host_vs_d2h"}

    if by["connector"]["status"] == "skipped":
        assert by["connector"]["note"] == "vllm not installed"
    else:
        conn = json.loads((res / "connector.json").read_text())
        assert conn["rows"] and conn["memcpy_gbps"] > 0


def test_a_failing_step_fails_the_run_and_the_next_steps_still_run(tmp_path):
    res = tmp_path / "results"
    r = gpu_check(res, GPU_CHECK_STEPS="env codecs tiers", GPU_CHECK_BREAK="codecs")
    assert r.returncode == 1, r.stdout + r.stderr
    by = steps(res)
    assert by["codecs"]["status"] == "failed" and "exit 1" in by["codecs"]["note"]
    assert "GPU_CHECK_BREAK" in (res / "codecs.stderr.log").read_text()
    assert not (res / "codecs.json").exists()
    assert by["env"]["status"] == by["tiers"]["status"] == "ok"  # before and after the broken step
    assert json.loads((res / "tiers.json").read_text())["device_tier"]["sizes"]["1MiB"]["device_put_gbps"] > 0
    assert by["cuda_tests"]["status"] == "skipped" and by["cuda_tests"]["note"] == "not in GPU_CHECK_STEPS"
    assert json.loads((res / "summary.json").read_text())["failed"] == ["codecs"]


def _probe_wheel(folder: Path) -> None:
    """A minimal pure-Python wheel, ``gpucheckprobe`` 0.1."""
    files = {"gpucheckprobe.py": b"VALUE = 1\n",
             "gpucheckprobe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 0.1\n",
             "gpucheckprobe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digest = lambda d: base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()  # noqa: E731
    record = "".join(f"{n},sha256={digest(d)},{len(d)}\n" for n, d in files.items())
    with zipfile.ZipFile(folder / "gpucheckprobe-0.1-py3-none-any.whl", "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("gpucheckprobe-0.1.dist-info/RECORD", record + "gpucheckprobe-0.1.dist-info/RECORD,,\n")


def test_fresh_venv_sees_the_given_pythons_packages_and_installs_the_wheels(tmp_path):
    # As on the GPU image, where the given python is itself a venv's: torch must import in the new venv.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _probe_wheel(wheels)
    res = tmp_path / "results"
    r = gpu_check(res, GPU_CHECK_VENV="", GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_STEPS="env")
    assert r.returncode == 0, r.stdout + r.stderr + (res / "setup.log").read_text()
    by = steps(res)
    assert by["setup"]["status"] == "ok" and "1 wheels" in by["setup"]["note"]
    env = json.loads((res / "env.json").read_text())
    assert env["executable"] != sys.executable and "/venv/bin/python" in env["executable"]
    assert env["wheels"] == {"gpucheckprobe": "0.1"}
    import torch

    assert env["torch"] == torch.__version__


def test_bad_usage_exits_2(tmp_path):
    for args, env in (([], {}), (["--bogus", str(tmp_path)], {}), ([str(tmp_path)], {"GPU_CHECK_DEVICE": "tpu"})):
        r = subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2, (args, env, r.stderr)
    assert not (tmp_path / "summary.json").exists()
