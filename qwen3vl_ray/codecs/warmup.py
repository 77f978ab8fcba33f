"""Compile the fused codec kernels ahead of serving, or load them from numba's disk cache.

Why: numba compiles each kernel on first use, one signature at a time. On this 2-core host that takes ~4-10 s
per kernel, for about 90 of them over the four float dtypes, the error measures that ``auto`` takes and the two
payload buffer kinds. A cold process would do that compiling while it holds the codec launch lock
(``fused._LOCK``). A node agent's first demotions with ``auto`` would then stall every encode and decode in
that process for minutes. Warmed once per install (``qwen3vl-ray warm-kernels``, or :func:`warm_kernels`),
every later process loads the kernels from the cache in well under a second each.

What one item compiles: a plain codec (``int8``, ``int8:axis=0``, ``int4``, ``int4:axis=0``) on one dtype,
through the public API as the tiers call it. That is its encode with every ``measure``: plain,
``encode_measured``, and ``encode_bounded`` for each of ``fused.BOUNDS``. Then the decode of a writable
payload (``bytearray``, as an encode returns it) and of a read-only one (``bytes``, as the disk tier reads
it), since numba types the two buffers apart. Last come the payload segment digests of both buffer kinds.
Row groups (per token) and channel groups (``axis=0``) are separate kernels, and int4 packs its own. The KV
codecs (``kv-int8``, ``kv-int4``) launch the same kernels on strided views: what the plain codecs compile
serves them too.

``jobs`` above one spreads the items over that many spawned processes. Compiling is CPU-bound and
single-threaded, so two jobs on two cores halve the wall time. Their saves into the shared cache are locked
(:mod:`numba_cache_lock`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import time
from dataclasses import dataclass

import numpy as np
import torch

from qwen3vl_ray.errors import ConfigError

#: the plain codecs whose kernels cover every fused kernel (see the module docstring)
CODECS = ("int8", "int8:axis=0", "int4", "int4:axis=0")
#: the float dtypes the kernels take (``fused.available``)
DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class Warmed:
    """One item: ``codec`` on ``dtype``, and the seconds its kernels took to compile or load."""

    codec: str
    dtype: str
    seconds: float


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"warm-kernels: unknown dtype {name!r}; one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def warm_one(codec_spec: str, dtype: str) -> Warmed:
    """Run ``codec_spec``'s every fused kernel on ``dtype`` once (see the module docstring); where the kernels
    are off its codec runs the torch paths, so :func:`warm_kernels` refuses such a host first."""
    from qwen3vl_ray.codecs import base, decode, fused, make_codec

    start = time.perf_counter()
    codec = make_codec(codec_spec)
    # two groups of 128 along each axis, so both quantize one group per row or channel, and odd tails stay out
    t = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)).to(_dtype(dtype))
    payload = codec.encode(t)
    codec.encode_measured(t)
    for bound in fused.BOUNDS:
        codec.encode_bounded(t, bound)
    decode(payload)
    decode(bytes(payload))
    for buf in (payload, bytes(payload)):
        fused.segment_digests(np.frombuffer(buf, dtype=np.uint8), base.SEGMENT)
    return Warmed(codec_spec, dtype, time.perf_counter() - start)


def _warm_item(item: tuple[str, str]) -> Warmed:
    return warm_one(*item)


def warm_kernels(dtypes: tuple[str, ...] | list[str] = DTYPES, jobs: int = 1, progress=None,
                 codecs: tuple[str, ...] | list[str] = CODECS) -> list[Warmed]:
    """Compile (or load) every fused kernel of ``codecs`` (default all: see the module docstring) for
    ``dtypes``, on ``jobs`` processes.

    ``progress``: called with each :class:`Warmed` as it finishes. A :class:`ConfigError` names a bad dtype,
    codec or job count, or a host without the kernels."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"warm-kernels: jobs must be a positive integer, got {jobs!r}")
    if not dtypes or not codecs:
        raise ConfigError(f"warm-kernels: no {'dtypes' if not dtypes else 'codecs'} given")
    for name in dtypes:
        _dtype(name)
    for spec in codecs:
        if spec not in CODECS:
            raise ConfigError(f"warm-kernels: {spec!r} is not one of the codecs whose kernels cover all of them: "
                              f"{', '.join(CODECS)} (the kv- codecs run the same kernels)")
    from qwen3vl_ray.codecs import fused

    if not fused.available():
        raise ConfigError("warm-kernels: the fused codec kernels are off on this host (numba missing, a big-endian "
                          "host, or QWEN3VL_CODEC_KERNELS=torch): there is nothing to compile")
    items = [(c, d) for d in dict.fromkeys(dtypes) for c in dict.fromkeys(codecs)]
    done: list[Warmed] = []
    # spawned, not forked: a child forked from a process that launched a kernel runs serial twins that are
    # never cached (fused._kernel), and compiling is what this is for
    with contextlib.ExitStack() as stack:
        run = map
        if jobs > 1:
            run = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                max_workers=min(jobs, len(items)), mp_context=multiprocessing.get_context("spawn"))).map
        for warmed in run(_warm_item, items):
            done.append(warmed)
            if progress:
                progress(warmed)
    return done
