"""``auto``: the smallest payload whose measured relative Frobenius error is within a budget.

Params: ``max_error`` (default 0.02, i.e. 2% relative Frobenius error, cosine >= 0.9998), ``candidates`` (``|``-separated
codec specs, default :data:`DEFAULT_CANDIDATES`), ``lowrank_max_dim`` (default 512: lowrank is only tried
when the matrix view's smaller side is at most this, since SVD costs ``m * n * min(m, n)``).

Candidates are tried on the whole tensor (no sampling, so the budget is a guarantee): each is encoded,
decoded and measured. Fixed-rate codecs go in order of bits per element and stop at the first one within
budget (nothing after it can be smaller); variable-size ones (sparse, lowrank, ``+zstd``) are always tried.
``none`` is the last resort. The result is the chosen codec's own payload, so it records the choice and ``decode`` needs
nothing from ``auto``. Tensors with NaN/inf only get lossless candidates (sparse, none).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from qwen3vl_ray.codecs.base import Codec, IdentityCodec, decode, make_codec, register_codec, relative_error
from qwen3vl_ray.errors import CodecError

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("sparse", "lowrank", "kv-int4", "int4", "int4:axis=0", "kv-int8", "int8", "fp8", "bf16", "fp16")
#: bits per element of the fixed-rate codecs, ignoring the scales (they only add a few percent)
_BITS = {"int4": 4, "kv-int4": 4, "int8": 8, "kv-int8": 8, "fp8": 8, "bf16": 16, "fp16": 16}


@register_codec("auto")
class AutoCodec(Codec):
    """Measured choice among candidates; see the module docstring."""

    def __init__(self, max_error: float = 0.02, candidates: str | None = None, lowrank_max_dim: int = 512):
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error < 1:
            raise CodecError(f"codec 'auto': max_error must be a number in [0, 1), got {max_error!r}")
        if not isinstance(lowrank_max_dim, int) or lowrank_max_dim < 1:
            raise CodecError(f"codec 'auto': lowrank_max_dim must be a positive integer, got {lowrank_max_dim!r}")
        self.max_error = float(max_error)
        self.lowrank_max_dim = lowrank_max_dim
        specs = candidates.split("|") if isinstance(candidates, str) else list(candidates or DEFAULT_CANDIDATES)
        if any(s.split(":")[0].split("+")[0] == "auto" for s in specs):
            raise CodecError("codec 'auto' cannot list itself as a candidate")
        self._specs = None if candidates is None else specs
        self.candidates = [make_codec(s) for s in specs]
        for c in self.candidates:
            if c.name == "lowrank":
                # lowrank picks its own rank: give it the budget
                c.max_error = max(min(self.max_error * 0.98, 0.99), 1e-6)

    def spec(self) -> str:
        text = f"auto:max_error={self.max_error:g}"
        if self.lowrank_max_dim != 512:
            text += f",lowrank_max_dim={self.lowrank_max_dim}"
        return text + (f",candidates={'|'.join(self._specs)}" if self._specs else "")

    def _applicable(self, codec: Codec, tensor: torch.Tensor, finite: bool) -> bool:
        if not finite and not codec.lossless:
            return False
        if codec.name == "sparse":
            # indices cost 4 bytes each: pointless above ~1/3 density
            return int(torch.count_nonzero(tensor)) * 3 <= tensor.numel()
        if codec.name == "lowrank":
            m = tensor.numel() // max(tensor.shape[-1], 1) if tensor.dim() else 1
            n = tensor.shape[-1] if tensor.dim() else 1
            return min(m, n) <= self.lowrank_max_dim and tensor.numel() >= 4096
        return True

    def choose(self, tensor: torch.Tensor) -> tuple[Codec, bytearray]:
        """The winning codec and its payload."""
        fallback = IdentityCodec()
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return fallback, fallback.encode(tensor)
        finite = bool(torch.isfinite(tensor).all())
        best: tuple[int, Codec, bytearray] | None = None
        raw = tensor.numel() * tensor.element_size()
        # fixed-rate codecs in order of bits per element: the first that meets the budget beats every later
        # one, so they stop there; variable-size ones (sparse, lowrank, +zstd) are always tried
        fixed = sorted((c for c in self.candidates if _BITS.get(c.name)), key=lambda c: _BITS[c.name])
        variable = [c for c in self.candidates if not _BITS.get(c.name)]
        for codec in variable + fixed:
            if best is not None and _BITS.get(codec.name) and tensor.numel() * _BITS[codec.name] / 8 >= best[0]:
                continue
            if not self._applicable(codec, tensor, finite):
                continue
            try:
                payload = codec.encode(tensor)
            except CodecError as exc:  # e.g. kv-int4 on a non-KV shape, fp16 overflow
                log.debug("auto: candidate %s skipped: %s", codec.spec(), exc)
                continue
            # near-ties (same rate, a few header bytes apart) keep the earlier, more accurate candidate
            if len(payload) >= raw or (best is not None and len(payload) >= best[0] * 0.995):
                continue
            if codec.lossless or relative_error(tensor, decode(payload, tensor.device)) <= self.max_error:
                best = (len(payload), codec, payload)
        if best is None:
            return fallback, fallback.encode(tensor)
        return best[1], best[2]

    def encode(self, tensor: torch.Tensor) -> bytearray:
        return self.choose(tensor)[1]

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        raise CodecError("auto payloads name the chosen codec; nothing is ever stored under 'auto'")

    def error_bound(self, tensor: torch.Tensor) -> float:
        return self.max_error
