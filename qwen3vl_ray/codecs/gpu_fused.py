"""Launchers of the Triton codec kernels: encode on the GPU before the bytes leave it, decode after they arrive.

The GPU twin of :mod:`fused` (numba, CPU): the same ``Geometry`` parts, the same payload bytes. A CUDA tensor's
encode runs :mod:`triton_kernels` into codes and scales in device memory, then copies only those (half or a
quarter of the input's bytes for int8 / int4) to the host through a page-locked staging buffer, one
device-to-host copy per payload, and from there into the payload (the scales are checked for NaN / inf there);
the payload writer hashes them on the CPU. Kernels and copies run on a side stream of the tensor's own GPU
(:func:`_side_stream`), off the stream the model computes on.
A decode to a CUDA device copies the payload's codes and scales up the same way and dequantizes there.

Where a layout has no kernel here (float64 inputs, int4 pairs that would straddle a group, groups wider than
:data:`MAX_GROUP`, per-channel layouts over :data:`MAX_CHANNELS`) the codecs keep their torch path, which also
runs on the GPU.

:func:`use_interpreter` points the launchers at Triton's interpreter for CPU tensors: the tests compare these
kernels' payloads with the CPU paths' byte for byte on machines without a GPU (tests/triton_cases.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch

from qwen3vl_ray.codecs import blocked as B
from qwen3vl_ray.codecs.fused import Geometry, _ncodes
from qwen3vl_ray.codecs.groups import TINY
from qwen3vl_ray.errors import CodecError

log = logging.getLogger(__name__)

#: module switch: False forces the torch paths on the GPU (benchmarks, A/B tests)
ENABLED = os.environ.get("QWEN3VL_CODEC_KERNELS", "fused").strip().lower() != "torch"
#: widest group the kernels take (a rows group is one block of registers per program)
MAX_GROUP = 4096
#: most channels of a per-channel layout (one program holds a row of them in registers: ptxas spills past ~1024)
MAX_CHANNELS = 1024
#: groups per program in a rows layout (times the group's power-of-two width: elements per block)
ROWS_BLOCK = 4096
#: rows per step of a cols group (times the channels' power-of-two width)
COLS_ROWS = 16

# bf16 16, fp16 -16, fp32 32: how the kernels read a dtype's bit pattern
_BITS = {torch.bfloat16: 16, torch.float16: -16, torch.float32: 32}

_kernels = None  # triton_kernels, imported on first use (triton's import takes a while; CPU-only runs skip it)
_missing = False  # triton could not be imported: the torch paths run
#: where the kernels run: CUDA, or the CPU under Triton's interpreter (:func:`use_interpreter`)
_device_type = "cuda"


def use_interpreter() -> None:
    """Run the kernels in Triton's interpreter on CPU tensors (the tests, in a process started with
    ``TRITON_INTERPRET=1``: the interpreter needs it before triton is imported)."""
    global _device_type
    if _load() is None:
        raise RuntimeError("triton is not installed")
    from triton import knobs
    if not knobs.runtime.interpret:
        raise RuntimeError("Triton's interpreter needs TRITON_INTERPRET=1 in the environment before triton is imported")
    _device_type = "cpu"


def _load():
    """The kernels module, imported on first use; None where triton is missing (CPU builds without it)."""
    global _kernels, _missing
    if _kernels is None and not _missing:
        try:  # triton comes with CUDA builds of torch (and with vLLM)
            from qwen3vl_ray.codecs import triton_kernels
            _kernels = triton_kernels
        except Exception as exc:  # pragma: no cover - missing or broken triton: the torch paths serve
            log.warning("Triton codec kernels unavailable (%s: %s); CUDA tensors take the torch paths",
                        type(exc).__name__, exc)
            _missing = True
    return _kernels


def available(t: torch.Tensor | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> bool:
    """True when the Triton kernels can encode ``t`` (or decode into ``dtype`` on ``device``)."""
    if t is not None:
        device, dtype = t.device, t.dtype
    if not ENABLED or device is None or torch.device(device).type != _device_type or dtype not in _BITS:
        return False
    return _load() is not None


def supports(g: Geometry, pack4: bool) -> bool:
    """True when the kernels take part ``g`` (int4 pairs inside a group, groups up to :data:`MAX_GROUP`, up to
    :data:`MAX_CHANNELS` channels per-channel)."""
    if g.group > MAX_GROUP or g.post > MAX_CHANNELS:
        return False
    if pack4 and (g.group % 2 if g.post == 1 else g.post % 2):
        return False
    return True


def _p2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _launch_options() -> dict:
    # FMA contraction would round x * inv once instead of twice (the CPU paths round the product first)
    return {"enable_fp_fusion": False} if _device_type == "cuda" else {}


def encode_part(x: torch.Tensor, g: Geometry, qmax: int, pack4: bool, codes: torch.Tensor,
                scales: torch.Tensor) -> None:
    """Quantize part ``g`` of the flat ``x`` into ``codes`` (flat uint8 or int8) and ``scales`` (flat float32),
    all on the kernels' device. Non-finite inputs leave non-finite scales (the caller checks)."""
    G = -(-g.n // g.group)
    items = g.U * g.H * g.T * G
    if not items:
        return
    bits = _BITS[x.dtype]
    if g.post == 1:
        gp = _p2(g.group)
        per = max(1, ROWS_BLOCK // gp)
        _kernels.encode_rows[(-(-items // per),)](
            x, codes, scales, items, g.base, g.H, g.T, G, g.su, g.sh, g.st, g.n, g.group, float(qmax), TINY,
            BITS=bits, PACK4=pack4, ITEMS=per, GP=max(gp, 2), **_launch_options())
    else:
        _kernels.encode_cols[(items,)](
            x, codes, scales, g.base, g.H, g.T, G, g.su, g.sh, g.st, g.n, g.post, g.group, float(qmax), TINY,
            BITS=bits, PACK4=pack4, RB=COLS_ROWS, PP=max(_p2(g.post), 2), **_launch_options())


def decode_part(out: torch.Tensor, g: Geometry, pack4: bool, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Inverse of :func:`encode_part` into the flat ``out``."""
    G = -(-g.n // g.group)
    items = g.U * g.H * g.T * G
    if not items:
        return
    bf16 = out.dtype == torch.bfloat16
    if bf16:
        out = out.view(torch.int16)  # the kernels round to bf16 by hand and store the bit pattern
    if g.post == 1:
        gp = _p2(g.group)
        per = max(1, ROWS_BLOCK // gp)
        _kernels.decode_rows[(-(-items // per),)](
            out, codes, scales, items, g.base, g.H, g.T, G, g.su, g.sh, g.st, g.n, g.group,
            PACK4=pack4, ITEMS=per, GP=max(gp, 2), BF16=bf16, **_launch_options())
    else:
        _kernels.decode_cols[(items,)](
            out, codes, scales, g.base, g.H, g.T, G, g.su, g.sh, g.st, g.n, g.post, g.group,
            PACK4=pack4, RB=COLS_ROWS, PP=max(_p2(g.post), 2), BF16=bf16, **_launch_options())


class _Staging(threading.local):
    """A page-locked host buffer per thread, grown on demand: device <-> host copies of payload buffers run
    at full bus speed from page-locked memory (pageable memory goes through the driver's own bounce buffer)."""

    buf: torch.Tensor | None = None
    #: recorded after the last host -> device copy out of ``buf``: the buffer is refilled only once it is done
    done: torch.cuda.Event | None = None

    def get(self, nbytes: int) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        if self.buf is None or self.buf.numel() < nbytes:
            pin = _device_type == "cuda" and torch.cuda.is_available()
            # powers of two: a thread that meets growing entries reallocates (and pins) a few times, not per size
            self.buf = torch.empty(max(_p2(nbytes), 1 << 20), dtype=torch.uint8, pin_memory=pin)
        return self.buf[:nbytes]


_staging = _Staging()


def quantize_parts(x: torch.Tensor, parts: list[Geometry], qmax: int, pack4: bool, writer, codec: str) -> None:
    """Quantize each part of ``x`` (contiguous, on the kernels' device) into the payload ``writer``'s buffers
    ``codes_i, scales_i``: codes and scales are made in device memory and copied to the host in one transfer
    through the staging buffer, where the scales are checked (one wait for the GPU per payload)."""
    flat = x.detach().reshape(-1)
    sizes = []
    for g in parts:
        sizes += [_ncodes(g, pack4), 4 * g.nscales]
    for i, size in enumerate(sizes):
        if writer.buffers[i].nbytes != size:
            raise AssertionError(f"payload buffer {i}: {writer.buffers[i].nbytes} B, part needs {size}")
    # one device buffer for every part's codes and scales (scales 4-byte aligned), one copy out
    offs, total = [], 0
    for size in sizes:
        total = -(-total // 4) * 4
        offs.append(total)
        total += size
    with _side_stream(flat.device) as side:
        out = torch.empty(total, dtype=torch.uint8, device=flat.device)
        for i, g in enumerate(parts):
            codes = out[offs[2 * i]: offs[2 * i] + sizes[2 * i]]
            scales = out[offs[2 * i + 1]: offs[2 * i + 1] + sizes[2 * i + 1]].view(torch.float32)
            encode_part(flat, g, qmax, pack4, codes if pack4 else codes.view(torch.int8), scales)
        host = _staging.get(total)
        host.copy_(out, non_blocking=host.is_pinned())
        if side is not None:
            side.synchronize()  # the host needs the bytes; the caller's stream was never held up
    for i in range(1, len(sizes), 2):
        if not bool(torch.isfinite(host[offs[i]: offs[i] + sizes[i]].view(torch.float32)).all()):
            raise CodecError(f"codec {codec!r} cannot encode NaN or inf values; use 'none', 'bf16', 'fp16' or 'zstd'")
    for i, size in enumerate(sizes):
        if size:
            B.payload_tensor(writer.buffers[i], torch.uint8).copy_(host[offs[i]: offs[i] + size])


def dequantize_parts(out: torch.Tensor, parts: list[Geometry], pack4: bool, buffers, codec: str) -> None:
    """Inverse of :func:`quantize_parts` into ``out`` (contiguous, on the kernels' device): the payload's codes
    and scales go up in one transfer, then each part is dequantized there. Checks buffer sizes."""
    offs, total, views = [], 0, []
    for i, g in enumerate(parts):
        for j, need in enumerate((_ncodes(g, pack4), 4 * g.nscales)):
            view = memoryview(buffers[2 * i + j]).cast("B")
            if view.nbytes != need:
                raise CodecError(f"corrupt {codec!r} payload: buffer of {view.nbytes} bytes, layout needs {need}")
            total = -(-total // 4) * 4
            offs.append(total)
            views.append(view)
            total += need
    host = _staging.get(total)
    for off, view in zip(offs, views):
        if view.nbytes:
            host[off: off + view.nbytes].copy_(B.payload_tensor(view, torch.uint8))
    with _side_stream(out.device) as side:
        dev = host.to(out.device, non_blocking=host.is_pinned())
        if side is not None and host.is_pinned():
            _staging.done = torch.cuda.Event()
            _staging.done.record(side)
        flat = out.reshape(-1)
        for i, g in enumerate(parts):
            codes = dev[offs[2 * i]: offs[2 * i] + views[2 * i].nbytes]
            scales = dev[offs[2 * i + 1]: offs[2 * i + 1] + views[2 * i + 1].nbytes].view(torch.float32)
            decode_part(flat, g, pack4, codes if pack4 else codes.view(torch.int8), scales)


class _Streams(threading.local):
    """This thread's side stream per GPU (created on first use)."""

    def __init__(self) -> None:
        self.side: dict[int, torch.cuda.Stream] = {}


_streams = _Streams()


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Run the codec's kernels and copies on a side stream of the tensor's own GPU; yields it (None off CUDA).

    Triton launches on the current device and its current stream, not on the device of its arguments (a
    thread of the prefetch pool, or a vLLM worker that picked its GPU, may hold a tensor on another GPU than
    the current one), so the tensor's GPU is made current. A stream of its own keeps the copies and kernels off
    the caller's stream, where the model computes: the side stream first waits for what the caller's stream
    has queued (the input's writes, the output's earlier reads), and the caller's stream waits for the side
    stream's work before anything queued after it (a decoded tensor is used there), without the CPU waiting."""
    if device.type != "cuda":
        yield None
        return
    with torch.cuda.device(device):
        caller = torch.cuda.current_stream()
        side = _streams.side.get(device.index)
        if side is None:
            side = _streams.side[device.index] = torch.cuda.Stream()
        side.wait_stream(caller)
        try:
            with torch.cuda.stream(side):
                yield side
        finally:
            caller.wait_stream(side)
