"""The Triton codec kernels against the CPU paths, case by case: payload bytes and decoded values.

Run by tests/test_codecs_triton.py: on a machine without a GPU as ``TRITON_INTERPRET=1 python -m
tests.triton_cases`` (Triton's interpreter runs the kernels on CPU tensors; it needs the variable before triton is
imported, hence a process of its own), and in process on CUDA (:func:`run` with ``device="cuda"``). Prints one
JSON object: case name -> {"same_payload", "same_decode", "gpu_path", "error"}.

The reference is the numba kernels' payload (the torch paths write the same bytes: tests/test_codecs_fused.py).
"""

from __future__ import annotations

import json
import math
import sys

import torch

from qwen3vl_ray.codecs import fused as F
from qwen3vl_ray.codecs import gpu_fused as GF
from qwen3vl_ray.codecs.base import decode, make_codec
from qwen3vl_ray.errors import CodecError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs() -> dict[str, tuple[str, torch.Tensor]]:
    """Case name -> (codec spec, float32 input), small enough for the interpreter."""
    g = torch.Generator().manual_seed(7)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    kv = rnd(2, 2, 2, 24, 16)  # [layers, k/v, heads, tokens, head_dim]
    outlier = kv.clone()
    outlier[:, 0, :, :, 3] *= 300.0  # an outlier key channel, as real models have
    cases = {
        "int8-rows": ("int8:group=32", rnd(5, 96, scale=3.0)),
        "int8-rows-padded": ("int8:group=32", rnd(3, 70)),  # 70 = 2 groups of 32 + 6: a padded last group
        "int8-group-wider-than-row": ("int8:group=128", rnd(4, 40)),
        "int4-rows": ("int4:group=16", rnd(4, 64)),
        "int4-rows-padded-odd-tail": ("int4:group=16", rnd(3, 37)),
        "int8-cols": ("int8:axis=0,group=8", rnd(20, 24)),
        "int4-cols": ("int4:axis=0,group=8", rnd(20, 24)),
        "int8-cols-odd-channels": ("int8:axis=0,group=8", rnd(19, 7)),
        "kv-int8": ("kv-int8:group=8", kv),
        "kv-int4": ("kv-int4:group=8", kv),
        "kv-int8-residual": ("kv-int8:group=8,residual=5", kv),
        "kv-int4-outlier-channel": ("kv-int4:group=8", outlier),
        "int8-all-equal-groups": ("int8:group=16", torch.full((4, 64), -2.5)),
        "int8-zero-and-tiny-groups": ("int8:group=16", torch.cat([torch.zeros(2, 64), torch.full((2, 64), 1e-31),
                                                                  rnd(2, 64)])),
        "int4-halfway-values": ("int4:group=8", torch.tensor([[7.0, 0.5, -0.5, 1.5, -1.5, 2.5, 3.5, -6.5]] * 4)),
        "int8-subnormal-and-large": ("int8:group=8", torch.tensor([[1e-40, -3e-39, 65000.0, 1.0, -2.0, 0.0, 5e-39,
                                                                    7.0]] * 2)),
    }
    return cases


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run(device: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    calls = {"n": 0}
    real = GF.quantize_parts

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    GF.quantize_parts = counted
    try:
        for name, (spec, x32) in _inputs().items():
            for dname, dtype in DTYPES.items():
                x = x32.to(dtype)
                if dtype == torch.float16:
                    x = x.clamp(-60000, 60000)
                results[f"{name}-{dname}"] = _case(spec, x, device, calls)
        for bad in (math.nan, math.inf, -math.inf):
            for spec in ("int8:group=16", "kv-int4:group=8"):
                x = torch.randn(2, 2, 2, 16, 16) if spec.startswith("kv") else torch.randn(4, 64)
                x.view(-1)[37] = bad
                results[f"{spec.split(':')[0]}-{bad}-refused"] = _refused(spec, x.to(torch.bfloat16), device)
    finally:
        GF.quantize_parts = real
    return results


def _case(spec: str, x: torch.Tensor, device: str, calls: dict) -> dict:
    codec = make_codec(spec)
    ref = bytes(codec.encode(x))  # the numba kernels' payload
    ref_y = decode(ref)
    F.ENABLED = False  # the numba kernels off: the codecs take the Triton path where it applies
    try:
        before = calls["n"]
        got = bytes(codec.encode(x.to(device)))
        gpu_path = calls["n"] > before
        y = decode(ref, device=device)
    finally:
        F.ENABLED = True
    return {"same_payload": got == ref, "gpu_path": gpu_path,
            "same_decode": bool(torch.equal(_bits(y.cpu()), _bits(ref_y))), "error": None}


def _refused(spec: str, x: torch.Tensor, device: str) -> dict:
    F.ENABLED = False
    try:
        make_codec(spec).encode(x.to(device))
    except CodecError as exc:
        return {"same_payload": True, "same_decode": True, "gpu_path": True, "error": str(exc)}
    finally:
        F.ENABLED = True
    return {"same_payload": False, "same_decode": False, "gpu_path": True, "error": None}


def main() -> None:
    GF.use_interpreter()
    json.dump(run("cpu"), sys.stdout)


if __name__ == "__main__":
    main()
