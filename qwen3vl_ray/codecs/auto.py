"""``auto``: the smallest payload whose measured relative Frobenius error is within a budget.

Params: ``max_error`` (default 0.02, i.e. 2% relative Frobenius error, cosine >= 0.9998), ``candidates`` (``|``-separated
codec specs, default :data:`DEFAULT_CANDIDATES`), ``lowrank_max_dim`` (default 512: lowrank is only tried
when the matrix view's smaller side is at most this, since SVD costs ``m * n * min(m, n)``).

The budget is a guarantee: a payload is only chosen after its error was checked on the whole tensor -- by
an upper bound of it the fused kernels take as they quantize (``encode_bounded``, see ``fused.bound_error``),
where that bound meets the budget; else by the error they sum exactly (``encode_measured``: no decode;
rounded up by ~1e-6), else by decoding and measuring. Choosing is kept cheap
by screening on a sample first (tensors with at least ``SAMPLE_MIN_ELEMS`` elements): about 1/``SAMPLE_SHRINK``
of the slices along the leading dims (never the last two, which hold the groups, nor a KV chunk's k/v axis;
for an ``axis=0`` quantizer, slices of the last dim). A candidate whose sample error is over
``SCREEN_SLACK`` x budget, or whose payload scaled from the sample would not beat the best so far, is not
tried on the whole tensor, nor is one at the rate of a fixed-rate winner or above; lowrank is screened by
the energy a row sample (2 x its columns) keeps at the largest rank that could still win. Screening can only make the
choice less thrifty, never break the budget. Fixed-rate codecs go in order of bits per element and stop
at the first rate with one within budget (nothing after it can be smaller). Within a rate, candidates of
near-equal size (``SAME_SIZE``) keep the listed order unless one errs clearly less on its sample
(``MORE_ACCURATE``): it goes first. That ranking screens every candidate of the rate, so it is done only when
the first to pass errs above ``RANK_ABOVE`` of the budget, where accuracy decides how cheaply a remembered
winner is checked: on vision features with hot channels int8 per channel (``int8:axis=0``) errs 2.5x less
than per token at the same bytes, which its cheap bound proves within 2% where per token's needs the exact
measure (~1.2x an encode). Then the variable-size ones (sparse, lowrank, ``+zstd``). ``none`` is the last
resort. The result is the chosen codec's own payload, so it records the choice and ``decode`` needs nothing
from ``auto``. Tensors with NaN/inf only end up with
lossless candidates (lossy ones refuse them or fail the budget).

Choices are remembered per tensor kind (shape, dtype, device): entries of one kind (a model's KV chunks,
its vision features) are alike, so the next tensor of that kind goes straight to the last winner's
whole-tensor encode and, when its error meets the budget, takes it without screening. That encode first
takes only an upper bound of the error (``encode_bounded``, see ``fused.bound_error``): the amax one (the
norm's lower bound from the squares of the largest of each two inputs along a channel, which the kernels find
anyway, and of each row group's largest input, read back from its scale: ~4-6% over a 2 MiB KV chunk's plain
kernel time on two threads, against ~6-10% for the cheap one; on a KV chunk, whose keys hold most of the norm,
as tight as the cheap one, ~2.9x above the true error), then the cheap one (also the largest of each four
inputs in a row's group squared: ~2.0-2.9x above the true error where row groups hold the norm, as per-token
int8's do), then the full one (every input's square, ~26%, ~1.8-2.5x above), then the steps one (the codes'
rounding steps summed exactly, ~90-100%: only the store's rounding, 2^-8 relative in bf16, taken at its worst;
1.1-1.8x above), then the exact measure (``encode_measured``, ~2.2x an encode), each
only where the one before it misses the budget; the kind then starts at the check that served until it is
screened again (and keeps it when a re-screen confirms the winner: a winner that close to the budget stays
close). A kind is chosen afresh after its winner served an interval of tensors (and whenever the remembered
winner misses the budget or refuses a tensor), so a kind whose data grows more compressible finds the smaller
codec again.
The interval adapts: ``RESCREEN_EVERY`` tensors after a new winner, doubled each time a scheduled re-screen
picks the same winner again, up to ``RESCREEN_MAX``, and back to ``RESCREEN_EVERY`` when a re-screen picks
another. The budget stays a guarantee (every payload's error is checked on the whole tensor, by the bound or
the exact measure, whatever the interval); what the memory costs is at most ``RESCREEN_MAX - 1`` tensors of a
long-settled kind stored one codec larger than a fresh choice would have made them. Why: a re-screen costs
7-10 encodes' time (sample encodes of the candidates, the winner's bounded encode, lowrank's range finder: 1.1 ms
on a 2 MiB KV chunk, 1.6-2.1 ms on 4 MiB vision features, measured): every 17th tensor that was 12-30% of the
encode time, at a cap of 256 ~3%, at the cap of 1024 under 1%.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import torch

from qwen3vl_ray.codecs.base import Codec, IdentityCodec, decode, make_codec, register_codec, relative_error
from qwen3vl_ray.errors import CodecError

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("sparse", "lowrank", "kv-int4", "int4", "int4:axis=0", "kv-int8", "int8", "int8:axis=0", "fp8",
                      "bf16", "fp16")
#: bits per element of the fixed-rate codecs, ignoring the scales (they only add a few percent)
_BITS = {"int4": 4, "kv-int4": 4, "int8": 8, "kv-int8": 8, "fp8": 8, "bf16": 16, "fp16": 16}
#: tensors below this many elements are not screened (a whole-tensor trial is already cheap)
SAMPLE_MIN_ELEMS = 1 << 16
#: a sample is about 1/SAMPLE_SHRINK of the tensor
SAMPLE_SHRINK = 64
#: screening slack: a sample error up to this times the budget still earns a whole-tensor trial
SCREEN_SLACK = 1.25
#: a tensor kind's new winner serves this many tensors, then the kind is screened afresh
RESCREEN_EVERY = 16
#: the longest interval between re-screens: it doubles from ``RESCREEN_EVERY`` each time a re-screen confirms
#: the winner, and resets when one picks another
RESCREEN_MAX = 1024
#: same-rate candidates whose sizes, scaled from the sample, are within this factor of the smallest count as the
#: same size and go most accurate first: the scaled size is ~0.5% off (the headers are scaled with the codes), and
#: same-rate payloads of one tensor differ by their headers, a few dozen bytes, unless their groups differ
SAME_SIZE = 1.02
#: ... and the most accurate of them goes ahead of the first listed only when its sample error is below this
#: factor of the first's (near-equal errors, as kv-int4's and int4's on Gaussian values, keep the listed order)
MORE_ACCURATE = 0.8
#: the other same-rate candidates are screened to rank them only when the first to pass errs above this share of
#: the budget on its sample: below it the first is taken on its cheap bound anyway (~2.0-2.9x its error, plus
#: bf16's rounding), and screening the rest (~0.3 ms each on a 2 MiB KV chunk) would double a re-screen's cost
RANK_ABOVE = 0.25
#: tensor kinds remembered (oldest forgotten first)
MEMO_KINDS = 64
#: the checks a remembered winner's tensor can start at, cheapest first (each falls to the one below it):
#: the kernels' bounds (``fused.BOUNDS``), then the exact measure
BOUND_AMAX, BOUND_CHEAP, BOUND_FULL, BOUND_STEPS, BOUND_NONE = 4, 3, 2, 1, 0
_BOUND_OF_LEVEL = {BOUND_AMAX: "amax", BOUND_CHEAP: "cheap", BOUND_FULL: "full", BOUND_STEPS: "steps"}


def sample(tensor: torch.Tensor, axis0: bool = False) -> torch.Tensor | None:
    """About ``1/SAMPLE_SHRINK`` of ``tensor`` as whole slices (see the module docstring); None when too small."""
    nd = tensor.dim()
    if tensor.numel() < SAMPLE_MIN_ELEMS or nd < 2:
        return None
    if axis0:
        dims = [nd - 1]
    else:
        dims = [d for d in range(max(1, nd - 2)) if not (nd >= 4 and d == nd - 4 and tensor.shape[d] == 2)]
    keep = {d: tensor.shape[d] for d in dims}
    target = tensor.numel() // SAMPLE_SHRINK
    size = tensor.numel()
    while size > target:
        d = max(keep, key=keep.get)
        if keep[d] <= 1:
            break
        size = size // keep[d] * ((keep[d] + 1) // 2)
        keep[d] = (keep[d] + 1) // 2
    if all(keep[d] == tensor.shape[d] for d in dims):
        return None
    # strided views, one copy at the end (index_select per dim costs ~10x more here)
    view = [slice(None)] * nd
    for d, k in keep.items():
        view[d] = slice(None, None, -(-tensor.shape[d] // k))
    return tensor[tuple(view)].contiguous()


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
        # (shape, dtype, device) -> [winner, tensors it has served since it was chosen, the check its
        # tensors start at (BOUND_AMAX, BOUND_CHEAP, BOUND_FULL, BOUND_STEPS or BOUND_NONE: the exact measure),
        # tensors it serves before the next re-screen, the kind's bytes] (see the docstring)
        self._memo: dict[tuple, list] = {}
        self._memo_lock = threading.Lock()  # tiers encode from several threads
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

    def _applicable(self, codec: Codec, tensor: torch.Tensor) -> bool:
        if codec.name == "sparse":
            # indices cost 4 bytes each: pointless above ~1/3 density
            return int(torch.count_nonzero(tensor)) * 3 <= tensor.numel()
        if codec.name == "lowrank":
            m = tensor.numel() // max(tensor.shape[-1], 1) if tensor.dim() else 1
            n = tensor.shape[-1] if tensor.dim() else 1
            return min(m, n) <= self.lowrank_max_dim and tensor.numel() >= 4096
        return True

    def _trial(self, codec: Codec, tensor: torch.Tensor) -> tuple[bytearray, float] | None:
        """(payload, measured relative error) of ``codec`` on ``tensor``, or None if it refuses it."""
        try:
            if hasattr(codec, "encode_measured"):
                payload, err = codec.encode_measured(tensor)
            else:
                payload, err = codec.encode(tensor), None
        except CodecError as exc:  # e.g. kv-int4 on a non-KV shape, fp16 overflow, NaN in a quantizer
            log.debug("auto: candidate %s skipped: %s", codec.spec(), exc)
            return None
        if err is None:
            err = 0.0 if codec.lossless else relative_error(tensor, decode(payload, tensor.device))
        return payload, err

    def _bounded(self, codec: Codec, tensor: torch.Tensor, bound: str = "full") -> tuple[bytearray, float] | None:
        """(payload, upper bound of its relative error) from ``codec.encode_bounded`` (``bound``: which of its
        bounds, ``fused.BOUNDS``), or None where the codec has no such path, refuses the tensor or could not
        bound it."""
        if not hasattr(codec, "encode_bounded"):
            return None
        try:
            payload, err = codec.encode_bounded(tensor, bound)
        except CodecError as exc:
            log.debug("auto: remembered %s refused the tensor: %s", codec.spec(), exc)
            return None
        return None if err is None else (payload, err)

    def _lowrank_hopeless(self, codec: Codec, tensor: torch.Tensor, best: int) -> bool:
        """True when, on a row sample, the largest rank whose factors still beat ``best`` bytes keeps less
        than ``1 - max_error^2`` of the energy (randomized range finder with 8 extra directions and one power
        step: a few small GEMMs instead of an SVD, which costs more than quantizing a 2 MiB chunk)."""
        n = tensor.shape[-1]
        mat = tensor.detach().reshape(-1, n)
        m = mat.shape[0]
        r_max = best // (4 * (m + n))
        if r_max < 1:
            return True
        rows = min(m, 2 * n)
        if rows == m or r_max + 8 >= n:
            return False
        part = mat[:: -(-m // rows)].to(torch.float32)
        total = float(torch.linalg.vector_norm(part)) ** 2
        if not math.isfinite(total):
            return True
        if total == 0.0:
            return False
        omega = torch.randn(n, r_max + 8, generator=torch.Generator().manual_seed(0)).to(part.device)
        y = part @ (part.T @ (part @ omega))
        q = torch.linalg.qr(y).Q
        kept = float(torch.linalg.vector_norm(q.T @ part)) ** 2
        return kept < (1 - codec.max_error ** 2) * total

    def choose(self, tensor: torch.Tensor) -> tuple[Codec, bytearray]:
        """The winning codec and its payload."""
        if not tensor.is_floating_point() or tensor.numel() == 0:
            fallback = IdentityCodec()
            return fallback, fallback.encode(tensor)
        # torch.Size hashes as the tuple it is; the device itself, not its type string (~0.3 us less a payload)
        kind = (tensor.shape, tensor.dtype, tensor.device)
        with self._memo_lock:
            memo = self._memo.get(kind)
            winner = memo[0] if memo is not None and memo[1] < memo[3] else None
            # a scheduled re-screen (not one forced by a miss): one that picks the same winner lengthens the interval
            due = memo is not None and winner is None
            if winner is not None:
                memo[1] += 1
                level, raw = memo[2], memo[4]
        if winner is not None:
            # the kernels' upper bounds of the error first, the cheapest one that proves the budget: a winner
            # chosen with room to spare is taken on the amax one. A bound over the budget (the winner near the
            # budget, row groups holding the norm, or no fused path) falls to the next check on the same tensor
            # -- the cheap bound, the full one, the steps one, then the exact measure -- and the kind starts
            # there until it is screened again
            while level:
                got = self._bounded(winner, tensor, _BOUND_OF_LEVEL[level])
                if got is not None and len(got[0]) < raw and got[1] <= self.max_error:
                    return winner, got[0]
                # no bound at all (no fused path for this tensor, a refusal): straight to the exact measure
                level = BOUND_NONE if got is None else level - 1
                with self._memo_lock:
                    memo[2] = level
            got = self._trial(winner, tensor)
            if got is not None and len(got[0]) < raw and (winner.lossless or got[1] <= self.max_error):
                return winner, got[0]
        fallback = IdentityCodec()
        codec, payload = self._choose_afresh(tensor, fallback)
        with self._memo_lock:
            old = self._memo.pop(kind, None)
            if len(self._memo) >= MEMO_KINDS:
                self._memo.pop(next(iter(self._memo)))
            if codec is not fallback:
                confirmed = due and old is not None and old[0] is codec
                interval = min(2 * old[3], RESCREEN_MAX) if confirmed else RESCREEN_EVERY
                level = old[2] if confirmed else BOUND_AMAX if hasattr(codec, "encode_bounded") else BOUND_NONE
                self._memo[kind] = [codec, 0, level, interval, tensor.numel() * tensor.element_size()]
        return codec, payload

    def _choose_afresh(self, tensor: torch.Tensor, fallback: Codec) -> tuple[Codec, bytearray]:
        """Screen and try the candidates (see the module docstring)."""
        best: tuple[int, Codec, bytearray] | None = None
        raw = tensor.numel() * tensor.element_size()
        samples: dict[bool, torch.Tensor | None] = {}

        def screen(codec: Codec) -> tuple[float, float] | None:
            """(payload size scaled from the sample, the sample's error) of a candidate that passes the
            screen, ``(inf, inf)`` where the tensor has no sample to screen on; None where it is screened out."""
            axis0 = getattr(codec, "axis", None) is not None and codec.axis % max(tensor.dim(), 1) == 0
            if axis0 not in samples:
                samples[axis0] = sample(tensor, axis0)
            part = samples[axis0]
            if part is None or not self._applicable(codec, part):
                return math.inf, math.inf
            got = self._trial(codec, part)
            if got is None:
                return None
            est = len(got[0]) * tensor.numel() / part.numel()
            if got[1] > self.max_error * SCREEN_SLACK or (best is not None and est >= best[0] * 0.995):
                return None
            return est, got[1]

        def consider(codec: Codec) -> None:
            nonlocal best
            # the full bound first (see choose); the exact measure where it misses the budget
            got = self._bounded(codec, tensor)
            if got is None or got[1] > self.max_error:
                got = self._trial(codec, tensor)
            if got is None:
                return
            payload, err = got
            # near-ties (same rate, a few header bytes apart) keep the earlier, more accurate candidate
            if len(payload) >= raw or (best is not None and len(payload) >= best[0] * 0.995):
                return
            if codec.lossless or err <= self.max_error:
                best = (len(payload), codec, payload)

        # fixed-rate codecs by bits per element: the first rate with a candidate within budget beats every
        # rate above it, so they stop there. Within a rate, the candidates the screen passes go smallest first
        # and, among near-equal sizes, most accurate first (on the samples' errors): int8 per channel
        # (axis=0) and per token store the same bytes, and on vision features with hot channels the former
        # errs 2.5x less -- which is also what lets a remembered winner be taken on its cheap bound. Without a
        # sample (a small tensor) they keep the listed order. Variable-size ones (sparse, lowrank, +zstd) come
        # after, against that size
        rates: dict[int, list[Codec]] = {}
        for c in self.candidates:
            if _BITS.get(c.name):
                rates.setdefault(_BITS[c.name], []).append(c)
        for bits in sorted(rates):
            pending = [(order, codec) for order, codec in enumerate(rates[bits]) if self._applicable(codec, tensor)]
            while pending and best is None:
                passed = []
                while pending:
                    order, codec = pending.pop(0)
                    got = screen(codec) if not codec.lossless else (math.inf, math.inf)
                    if got is not None:
                        passed.append((got, order, codec))
                    if passed and passed[0][0][1] <= RANK_ABOVE * self.max_error:
                        break  # the first to pass errs little: no need to screen the rest to rank them
                if passed:
                    near = min(est for (est, _), _, _ in passed) * SAME_SIZE
                    passed.sort(key=lambda p: (p[0][0] > near, p[0][0] if p[0][0] > near else 0, p[1]))
                    top = min((p for p in passed if p[0][0] <= near), key=lambda p: p[0][1])
                    if top[0][1] < MORE_ACCURATE * passed[0][0][1]:  # clearly more accurate, not a sample's noise
                        passed.remove(top)
                        passed.insert(0, top)
                for _, _, codec in passed:
                    consider(codec)
                    if best is not None:
                        break
            if best is not None:
                break  # a fixed-rate winner is as small as anything at its rate or above
        for codec in (c for c in self.candidates if not _BITS.get(c.name)):
            if codec.name == "lowrank" and (not self._applicable(codec, tensor) or (
                    best is not None and self._lowrank_hopeless(codec, tensor, best[0]))):
                continue
            if codec.name == "sparse":
                # density on the sample first: counting the whole tensor is a pass of its own
                if False not in samples:
                    samples[False] = sample(tensor)
                part = samples[False]
                if part is not None and int(torch.count_nonzero(part)) * 2 > part.numel():
                    continue
            if not codec.lossless and screen(codec) is None:
                continue
            if not self._applicable(codec, tensor):
                continue
            consider(codec)
        if best is None:
            return fallback, fallback.encode(tensor)
        return best[1], best[2]

    def encode(self, tensor: torch.Tensor) -> bytearray:
        return self.choose(tensor)[1]

    def decode_parts(self, meta: dict[str, Any], buffers, device) -> torch.Tensor:
        raise CodecError("auto payloads name the chosen codec; nothing is ever stored under 'auto'")

    def error_bound(self, tensor: torch.Tensor) -> float:
        return self.max_error
