"""The Triton codec kernels (GPU encode before the copy out, decode after the copy in) write the same payload
bytes as the CPU paths and decode to the same bits: int8 / int4 rows and per-channel layouts, kv-int8 /
kv-int4 (with a residual window, an outlier channel), padded and odd shapes, all-equal, zero and tiny groups,
halfway values, subnormals, and NaN / inf refused, in bf16, fp16 and fp32 (tests/triton_cases.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors, in a process of its own (the interpreter
must be chosen before triton is imported); on a CUDA machine they also run compiled, in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _check(results: dict[str, dict]) -> None:
    from tests.triton_cases import DTYPES, _inputs
    # every input in every dtype, plus 6 refusals: a case that silently dropped out would hide a kernel
    assert len(results) == len(_inputs()) * len(DTYPES) + 6
    not_gpu = [k for k, v in results.items() if not v["gpu_path"]]
    assert not not_gpu, f"these cases did not take the Triton path: {not_gpu}"
    payload = [k for k, v in results.items() if not v["same_payload"]]
    assert not payload, f"payload bytes differ from the CPU path: {payload}"
    decoded = [k for k, v in results.items() if not v["same_decode"]]
    assert not decoded, f"decoded values differ from the CPU path: {decoded}"
    for name, v in results.items():
        if name.endswith("-refused"):
            assert "cannot encode NaN or inf" in v["error"], name


def test_triton_kernels_match_the_cpu_paths_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.triton_cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(json.loads(proc.stdout))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled kernels (the interpreter test above runs everywhere)")
def test_triton_kernels_match_the_cpu_paths_on_cuda():
    from tests.triton_cases import run
    _check(run("cuda"))


def test_cpu_tensors_never_take_the_triton_path():
    from qwen3vl_ray.codecs import gpu_fused as GF
    assert not GF.available(torch.zeros(4, dtype=torch.bfloat16))
    assert not GF.available(device="cpu", dtype=torch.bfloat16)


def test_the_interpreter_is_refused_unless_chosen_before_triton_loads():
    from qwen3vl_ray.codecs import gpu_fused as GF
    from triton import knobs
    if knobs.runtime.interpret:
        pytest.skip("this process runs Triton's interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        GF.use_interpreter()
    assert GF._device_type == "cuda"
