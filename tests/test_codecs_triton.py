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


def _compile_for_cuda(kernel, args: tuple, constexprs: dict) -> str:
    """PTX of ``kernel`` compiled for an sm_90 GPU from these launch arguments, through ptxas (no GPU needed:
    argument tensors only give their dtypes), with the launchers' options; the way ``JITFunction.run`` binds."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from qwen3vl_ray.codecs import gpu_fused as GF

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    GF._device_type = "cuda"  # what the launchers pass there (the interpreter passes nothing)
    bound, spec, opts = bind(*args, **constexprs, **GF._launch_options())
    names = [p.name for p in kernel.params]
    kinds = [k[0] for k in spec]
    consts = {(i,): list(bound.values())[i] for i, k in enumerate(kinds) if k == "constexpr"}
    attrs = {(i,): backend.parse_attr(k[1]) for i, k in enumerate(spec) if k[0] != "constexpr" and isinstance(k[1], str)}
    src = ASTSource(kernel, dict(zip(names, kinds)), consts, attrs)
    return triton_compile(src, target=target, options=backend.parse_options(opts).__dict__).asm["ptx"]


def test_the_kernels_compile_for_a_gpu_with_exact_division_and_no_fused_multiply_add(tmp_path, monkeypatch):
    """ptxas builds each kernel for sm_90 on this GPU-less machine, int8 and int4, bf16 and fp16 output; the
    PTX keeps the CPU paths' rounding: IEEE division, no FMA contraction (it would round ``x * inv`` once), no
    flush of subnormals."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from triton import knobs
    if knobs.runtime.interpret:
        pytest.skip("this process runs Triton's interpreter")
    from qwen3vl_ray.codecs import triton_kernels as K
    from qwen3vl_ray.codecs.groups import TINY
    x, s = torch.empty(64, dtype=torch.bfloat16), torch.empty(64)
    codes = {False: torch.empty(64, dtype=torch.int8), True: torch.empty(64, dtype=torch.uint8)}
    # the values of a KV chunk (rows) and its keys (per channel), as fused.kv_parts lays them out
    rows = (384, 768, 2, 24, 1, 1536, 384, 16, 16, 16)
    cols = (0, 2, 1, 3, 1536, 384, 0, 24, 16, 8)
    ptx = {}
    for pack4 in (False, True):
        ptx["encode_rows", pack4] = _compile_for_cuda(K.encode_rows, (x, codes[pack4], s, *rows, 127.0, TINY),
                                                      dict(BITS=16, PACK4=pack4, ITEMS=32, GP=128))
        ptx["encode_cols", pack4] = _compile_for_cuda(K.encode_cols, (x, codes[pack4], s, *cols, 127.0, TINY),
                                                      dict(BITS=16, PACK4=pack4, RB=16, PP=128))
        for out, bf16 in ((x.view(torch.int16), True), (torch.empty(64, dtype=torch.float16), False)):
            ptx["decode_rows", pack4, bf16] = _compile_for_cuda(K.decode_rows, (out, codes[pack4], s, *rows),
                                                                dict(PACK4=pack4, ITEMS=32, GP=128, BF16=bf16))
            ptx["decode_cols", pack4, bf16] = _compile_for_cuda(K.decode_cols, (out, codes[pack4], s, *cols),
                                                                dict(PACK4=pack4, RB=16, PP=128, BF16=bf16))
    for name, text in ptx.items():
        assert ".entry" in text, name
        assert "fma." not in text, name
        assert ".ftz" not in text, name
    for pack4 in (False, True):
        for name in ("encode_rows", "encode_cols"):
            assert "div.rn.f32" in ptx[name, pack4], (name, pack4)
