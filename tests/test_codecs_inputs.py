"""Hypothesis strategies for codec tests: random and adversarial float tensors, plain or non-contiguous."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KINDS = ["normal", "zeros", "constant", "outliers", "tiny", "sparse", "uniform"]
VIEWS = ["plain", "transpose", "stride", "slice"]


def make_tensor(shape, dtype, kind, seed, view="plain"):
    """A tensor of ``shape`` (after ``view``) with the value pattern ``kind``; deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    # build a bigger base so the view can be non-contiguous and still have ``shape``
    base_shape = list(shape)
    if view == "stride" and base_shape:
        base_shape[0] *= 2
    if view == "slice" and base_shape:
        base_shape[-1] += 3
    if view == "transpose" and len(base_shape) >= 2:
        base_shape[-1], base_shape[-2] = base_shape[-2], base_shape[-1]
    x = torch.randn(base_shape, generator=gen, dtype=torch.float64)
    huge = 6e4 if dtype == torch.float16 else 1e30
    if kind == "zeros":
        x.zero_()
    elif kind == "constant":
        x.fill_(float(torch.randn(1, generator=gen)) * 3)
    elif kind == "outliers":
        mask = torch.rand(base_shape, generator=gen) < 0.02
        x = torch.where(mask, x * huge, x)
    elif kind == "tiny":
        x = x * (1e-6 if dtype == torch.float16 else 1e-35)
    elif kind == "sparse":
        x = torch.where(torch.rand(base_shape, generator=gen) < 0.9, 0.0, x)
    elif kind == "uniform":
        x = torch.rand(base_shape, generator=gen, dtype=torch.float64) * 1000 - 500
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # stay finite: these are adversarial inputs, not overflow tests
    x = x.to(dtype)
    if view == "stride" and x.dim():
        x = x[::2]
    elif view == "slice" and x.dim():
        x = x[..., 3:]
    elif view == "transpose" and x.dim() >= 2:
        x = x.transpose(-1, -2)
    assert tuple(x.shape) == tuple(shape), (x.shape, shape)
    return x


shapes = st.lists(st.integers(1, 9), min_size=0, max_size=4) | st.sampled_from([(1,), (0, 3), (3, 130), (257,), (2, 3, 129)])


@st.composite
def float_tensors(draw, dtypes=DTYPES, kinds=KINDS):
    shape = tuple(draw(shapes))
    return make_tensor(shape, draw(st.sampled_from(dtypes)), draw(st.sampled_from(kinds)),
                       draw(st.integers(0, 2 ** 31)), draw(st.sampled_from(VIEWS)))


@st.composite
def kv_tensors(draw, dtypes=DTYPES, kinds=KINDS):
    """[layers, 2, kv_heads, tokens, head_dim] with odd sizes; keys get outlier channels."""
    shape = (draw(st.integers(1, 2)), 2, draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 4, 16, 33])))
    dtype = draw(st.sampled_from(dtypes))
    x = make_tensor(shape, dtype, draw(st.sampled_from(kinds)), draw(st.integers(0, 2 ** 31)), draw(st.sampled_from(VIEWS)))
    if draw(st.booleans()):
        x = x.clone()
        # an outlier key channel, as real keys have (kept finite in fp16)
        x[:, 0, :, :, 0] = (x[:, 0, :, :, 0].double() * 20).clamp(-6e4, 6e4).to(dtype)
    return x
