"""``auto``: the smallest payload whose measured relative Frobenius error is within a budget.

Params: ``max_error`` (default 0.01, i.e. 1% relative Frobenius error), ``candidates`` (``|``-separated
codec specs, default :data:`DEFAULT_CANDIDATES`), ``lowrank_max_dim`` (default 1024: lowrank is only tried
when the matrix view's smaller side is at most this, since SVD costs ``m * n * min(m, n)``).

Every candidate is tried on the whole tensor (no sampling, so the budget is a guarantee): it is encoded,
then candidates are decoded in order of payload size until one meets the budget. ``none`` is always the
last resort. The result is the chosen codec's own payload, so it records the choice and ``decode`` needs
nothing from ``auto``. Tensors with NaN/inf only get lossless candidates (sparse, none).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from qwen3vl_ray.codecs.base import Codec, IdentityCodec, decode, make_codec, register_codec, relative_error
from qwen3vl_ray.errors import CodecError

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("sparse", "kv-int4", "int4", "kv-int8", "int8", "fp8", "lowrank", "bf16", "fp16")


@register_codec("auto")
class AutoCodec(Codec):
    """Measured choice among candidates; see the module docstring."""

    def __init__(self, max_error: float = 0.01, candidates: str | None = None, lowrank_max_dim: int = 1024):
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error < 1:
            raise CodecError(f"codec 'auto': max_error must be a number in [0, 1), got {max_error!r}")
        if not isinstance(lowrank_max_dim, int) or lowrank_max_dim < 1:
            raise CodecError(f"codec 'auto': lowrank_max_dim must be a positive integer, got {lowrank_max_dim!r}")
        self.max_error = float(max_error)
        self.lowrank_max_dim = lowrank_max_dim
        specs = candidates.split("|") if isinstance(candidates, str) else list(candidates or DEFAULT_CANDIDATES)
        if any(s.split(":")[0].split("+")[0] == "auto" for s in specs):
            raise CodecError("codec 'auto' cannot list itself as a candidate")
        self.candidates = [make_codec(s) for s in specs]
        for c in self.candidates:
            if c.name == "lowrank":
                # lowrank picks its own rank: give it the budget
                c.max_error = max(min(self.max_error * 0.98, 0.99), 1e-6)

    def spec(self) -> str:
        return f"auto:max_error={self.max_error:g},candidates={'|'.join(c.spec() for c in self.candidates)}"

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
        tried: list[tuple[int, int, Codec, bytearray]] = []
        for i, codec in enumerate(self.candidates):
            if not self._applicable(codec, tensor, finite):
                continue
            try:
                tried.append((0, i, codec, codec.encode(tensor)))
            except CodecError as exc:  # e.g. kv-int4 on a non-KV shape, fp16 overflow
                log.debug("auto: candidate %s skipped: %s", codec.spec(), exc)
        tried = [(len(p), i, c, p) for _, i, c, p in tried]
        for size, _, codec, payload in sorted(tried, key=lambda t: (t[0], t[1])):
            if size >= tensor.numel() * tensor.element_size() + 256:
                break  # no smaller than raw: 'none' wins
            if codec.lossless or relative_error(tensor, decode(payload, tensor.device)) <= self.max_error:
                return codec, payload
        return fallback, fallback.encode(tensor)

    def encode(self, tensor: torch.Tensor) -> bytearray:
        return self.choose(tensor)[1]

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        raise CodecError("auto payloads name the chosen codec; nothing is ever stored under 'auto'")

    def error_bound(self, tensor: torch.Tensor) -> float:
        return self.max_error
