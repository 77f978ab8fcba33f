"""A tier whose bytes live in the blocks of one preallocated :class:`BlockPool` (data side).

The device tier (slab on the model's device) and the host tier (slab in process memory, page-locked when
CUDA is present) are this one class with two configurations. An entry is a list of block ids, stored as
runs ``(start, count)``: a fresh or tidy pool hands out ascending ids, so most entries are one run and move
with one copy per run. Accounting is in whole blocks (what the entry really occupies).

Codecs: ``"none"`` takes a raw path (the tensor's own bytes go straight into the blocks; no payload is
built). Any other codec stores ``codec.encode(tensor)`` bytes and decodes with ``codecs.decode``.

Thread safety: one lock guards the index, the pool and the copies out of blocks, so a reader never sees
blocks that a concurrent remove/replace has handed to another entry. ``complete_store`` copies in under it
too; the held-room store (``allocate``, ``write``, ``commit``) copies without it: the blocks ``allocate``
took belong to no entry until ``commit``, so nobody else reads or hands them out meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from qwen3vl_ray.codecs import decode, make_codec
from qwen3vl_ray.errors import CapacityError
from qwen3vl_ray.keys import CacheKey, Namespace, validate_key
from qwen3vl_ray.pools.block_pool import BlockPool
from qwen3vl_ray.tiers.base import PreparedStore, Reservation, Tier, encode_payload
from qwen3vl_ray.tiers.config import TierConfig

log = logging.getLogger(__name__)

MIN_BLOCKS = 16  # a tier smaller than this many configured blocks gets smaller blocks instead


def effective_block_bytes(capacity_bytes: int, block_bytes: int) -> int:
    """``block_bytes``, shrunk for small tiers so a tier holds at least ``MIN_BLOCKS`` blocks.

    Without this a 64 KiB test tier with the default 1 MiB block could not hold anything.
    """
    if capacity_bytes >= MIN_BLOCKS * block_bytes:
        return block_bytes
    return min(block_bytes, capacity_bytes, max(64, capacity_bytes // MIN_BLOCKS))


class _Entry:
    """Index record; kept small (the metadata budget is <= 256 B per entry, key and dict slot included).

    ``spec`` is an interned ``(dtype, shape, encoded)`` tuple shared by all entries of that kind;
    ``runs`` is the first block id when the entry is one run, else a flat tuple ``(s0, n0, s1, n1, ...)``.
    """

    __slots__ = ("nbytes", "spec", "runs")

    def __init__(self, nbytes: int, spec: tuple, runs: int | tuple[int, ...]) -> None:
        self.nbytes = nbytes  # payload bytes (raw tensor bytes, or the encoded payload's length)
        self.spec = spec
        self.runs = runs


def _as_runs(ids: list[int]) -> int | tuple[int, ...]:
    ids.sort()
    if ids[-1] - ids[0] == len(ids) - 1:  # ids are distinct: this is one run (the common case), no loop
        return ids[0]
    flat: list[int] = []
    start = prev = ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            flat += (start, prev - start + 1)
            start = i
        prev = i
    flat += (start, prev - start + 1)
    return flat[0] if len(flat) == 2 else tuple(flat)


def _iter_runs(runs: int | tuple[int, ...], nblocks: int) -> Iterator[tuple[int, int]]:
    if isinstance(runs, int):
        yield runs, nblocks
    else:
        for j in range(0, len(runs), 2):
            yield runs[j], runs[j + 1]


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (no copy)."""
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _cpu_bytes_np(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 numpy array, no copy, valid while ``t`` lives.

    ctypes instead of ``t.reshape(-1).view(torch.uint8).numpy()``: four torch dispatches cost a few us per
    put, which is most of the Python overhead of a put; this also works for dtypes numpy lacks (bfloat16).
    """
    n = t.numel() * t.element_size()
    if n == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer((ctypes.c_ubyte * n).from_address(t.data_ptr()), dtype=np.uint8)


class PooledTier(Tier):
    """Entries in blocks of a byte pool on ``device``. Built by :func:`~qwen3vl_ray.tiers.factory.make_tier`."""

    holds_room = True
    replaces_in_place = True

    def __init__(self, name: str, cfg: TierConfig, namespace: Namespace, device: str | torch.device, pin_memory: bool = False) -> None:
        self.name = name
        self.cfg = cfg
        self.namespace = namespace
        self.codec = make_codec(cfg.codec)
        self._raw = self.codec.name == "none"
        self.block_bytes = effective_block_bytes(cfg.capacity_bytes, cfg.block_bytes)
        nblocks = cfg.capacity_bytes // self.block_bytes
        self.pool = BlockPool((self.block_bytes,), torch.uint8, nblocks, device, zero_on_release=cfg.zero_on_release,
                              pin_memory=pin_memory)
        self.device = self.pool.device
        # Usable bytes: whole blocks only, so free_bytes never promises room a block cannot give.
        self.capacity_bytes = nblocks * self.block_bytes
        self._flat = self.pool.slab.view(-1)
        # CPU<->CPU copies go through numpy: one plain memcpy per run. torch's copy_ splits large copies
        # over its intra-op threads, which on a busy 2-core host ran 2-10x slower than a single memcpy.
        self._flat_np = self._flat.numpy() if self.device.type == "cpu" else None
        self._index: dict[CacheKey, _Entry] = {}
        self._specs: dict[tuple, tuple] = {}
        self._lock = threading.Lock()
        self._c = dict(puts=0, gets=0, hits=0, misses=0, rejected=0, removes=0, bytes_written=0, bytes_read=0)
        if self.block_bytes != cfg.block_bytes:
            log.info("%s tier: %d-byte budget < %d blocks of %d; using %d-byte blocks", name, cfg.capacity_bytes, MIN_BLOCKS, cfg.block_bytes, self.block_bytes)

    # -- accounting ------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self.pool.in_use * self.block_bytes

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> Iterator[CacheKey]:
        with self._lock:
            return iter(list(self._index))

    def _blocks(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes)

    def entry_nbytes(self, key: CacheKey) -> int | None:
        e = self._index.get(key)
        return None if e is None else self._blocks(e.nbytes) * self.block_bytes

    def entry_shape(self, key: CacheKey) -> tuple[int, ...] | None:
        e = self._index.get(key)
        return None if e is None else e.spec[1]

    # -- store -----------------------------------------------------------------------------------
    def prepare_store(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        key, payload, nbytes = encode_payload(self.codec, self.name, key, tensor)
        need = self._blocks(nbytes) * self.block_bytes
        if need > self.capacity_bytes:
            raise CapacityError(
                f"entry of {nbytes} bytes ({need} in {self.block_bytes}-byte blocks) is larger than the whole "
                f"{self.name} tier ({self.capacity_bytes} bytes)"
            )
        return PreparedStore(key, need, payload, {"dtype": tensor.dtype, "shape": tuple(tensor.shape), "len": nbytes})

    def _source(self, prepared: PreparedStore) -> torch.Tensor | np.ndarray:
        """The bytes to copy in, as a flat view (``prepared`` keeps the tensor alive until the copy is done)."""
        if self._raw:
            t = prepared.payload
            if self._flat_np is not None and t.device.type == "cpu" and t.is_contiguous():
                return _cpu_bytes_np(t)
            return _byte_view(t.contiguous())
        n = prepared.meta["len"]
        return torch.frombuffer(prepared.payload, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)

    def _spec(self, prepared: PreparedStore) -> tuple:
        meta = prepared.meta
        spec_key = (meta["dtype"], meta["shape"], not self._raw)
        return self._specs.setdefault(spec_key, spec_key)

    def complete_store(self, prepared: PreparedStore) -> bool:
        nbytes = prepared.meta["len"]
        need = self._blocks(nbytes)
        src = self._source(prepared)
        with self._lock:
            old = self._index.get(prepared.key)
            old_blocks = self._blocks(old.nbytes) if old is not None else 0
            if need > self.pool.free + old_blocks:
                self._c["rejected"] += 1
                return False
            if need > self.pool.free:  # fits only in place of the entry it replaces: free that first
                self._release(self._index.pop(prepared.key))
                old = None
            ids = self.pool.acquire_ids(need) if need else []
            assert ids is not None, "free count checked under the lock"
            runs = _as_runs(ids) if need else ()
            self._copy_in(src, runs, need)
            self._index[prepared.key] = _Entry(nbytes, self._spec(prepared), runs)
            if old is not None:
                self._release(old)
            self._c["puts"] += 1
            self._c["bytes_written"] += nbytes
        return True

    # -- held-room store: blocks taken under the lock, filled outside it, published under it ----------
    def allocate(self, prepared: PreparedStore) -> Reservation | None:
        return self.allocate_many((prepared,))[0]

    def allocate_many(self, prepared: Sequence[PreparedStore]) -> list[Reservation | None]:
        out: list[Reservation | None] = []
        with self._lock:
            for p in prepared:
                need = self._blocks(p.meta["len"])
                if need > self.pool.free:
                    self._c["rejected"] += 1
                    out.append(None)
                    continue
                ids = self.pool.acquire_ids(need) if need else []
                assert ids is not None, "free count checked under the lock"
                out.append(Reservation(p, _as_runs(ids) if need else ()))
        return out

    def write(self, res: Reservation) -> bool:
        # The blocks are this reservation's alone until commit: no lock, so other puts and reads go on.
        self._copy_in(self._source(res.prepared), res.slot, self._blocks(res.prepared.meta["len"]))
        return True

    def commit(self, res: Reservation) -> None:
        self.commit_many((res,))

    def commit_many(self, reservations: Sequence[Reservation]) -> None:
        with self._lock:
            for res in reservations:
                p = res.prepared
                nbytes = p.meta["len"]
                old = self._index.get(p.key)
                self._index[p.key] = _Entry(nbytes, self._spec(p), res.slot)
                if old is not None:
                    self._release(old)
                self._c["puts"] += 1
                self._c["bytes_written"] += nbytes

    def abort(self, res: Reservation) -> None:
        with self._lock:
            self._release(_Entry(res.prepared.meta["len"], (), res.slot))

    def _copy_in(self, src: torch.Tensor | np.ndarray, runs: int | tuple, nblocks: int) -> None:
        B, flat, pos, total = self.block_bytes, self._flat, 0, (src.size if isinstance(src, np.ndarray) else src.numel())
        if isinstance(src, np.ndarray):
            flat = self._flat_np
        elif self._flat_np is not None and src.device.type == "cpu":
            flat, src = self._flat_np, src.numpy()
        for start, count in _iter_runs(runs, nblocks) if nblocks else ():
            n = min(count * B, total - pos)
            flat[start * B: start * B + n] = src[pos: pos + n]
            pos += n

    def _copy_out(self, dst: torch.Tensor, e: _Entry) -> None:
        """Copy entry ``e`` into ``dst`` (contiguous, exactly ``e.nbytes`` bytes, any dtype)."""
        B, flat, pos, total = self.block_bytes, self._flat, 0, e.nbytes
        if self._flat_np is not None and dst.device.type == "cpu":
            flat, dst = self._flat_np, _cpu_bytes_np(dst)  # the caller holds ``dst``
        else:
            dst = _byte_view(dst)
        for start, count in _iter_runs(e.runs, self._blocks(total)) if total else ():
            n = min(count * B, total - pos)
            dst[pos: pos + n] = flat[start * B: start * B + n]
            pos += n

    def _release(self, e: _Entry) -> None:
        nblocks = self._blocks(e.nbytes)
        if not nblocks:
            return
        if isinstance(e.runs, int):  # one run: hand the pool a range, no per-block list
            self.pool.release_ids(range(e.runs, e.runs + nblocks))
        else:
            self.pool.release_ids([i for s, c in _iter_runs(e.runs, nblocks) for i in range(s, s + c)])

    # -- reads -----------------------------------------------------------------------------------
    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        key = validate_key(key)
        with self._lock:
            self._c["gets"] += 1
            e = self._index.get(key)
            if e is None:
                self._c["misses"] += 1
                return None
            dtype, shape, encoded = e.spec
            if out is not None and (tuple(out.shape) != shape or out.dtype != dtype):
                raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, entry is {dtype} {shape}")
            if encoded:
                buf = torch.empty(e.nbytes, dtype=torch.uint8)
                self._copy_out(buf, e)
            else:
                direct = out is not None and out.is_contiguous()
                result = out if direct else torch.empty(shape, dtype=dtype, device=self.device)
                self._copy_out(result, e)
            self._c["hits"] += 1
            self._c["bytes_read"] += e.nbytes
        if encoded:
            if out is not None:
                # straight into ``out``: no result tensor to allocate and copy; on a GPU ``out`` the compressed
                # codes cross the bus and expand there
                return decode(buf.numpy(), out=out)
            result = decode(buf.numpy(), self.device)
            direct = False
        if out is not None and not direct:
            out.copy_(result)
            return out
        return result

    def contains(self, key: CacheKey) -> bool:
        return validate_key(key) in self._index

    def remove(self, key: CacheKey) -> bool:
        key = validate_key(key)
        with self._lock:
            e = self._index.pop(key, None)
            if e is None:
                return False
            self._release(e)
            self._c["removes"] += 1
            return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            ps = self.pool.stats()
            return {
                "name": self.name,
                "device": str(self.device),
                "pinned": self.pool.pinned,
                "codec": self.codec.spec(),
                "capacity_bytes": self.capacity_bytes,
                "used_bytes": ps.in_use * self.block_bytes,
                "free_bytes": (ps.capacity - ps.in_use) * self.block_bytes,
                "high_water_bytes": ps.high_water * self.block_bytes,
                "entries": len(self._index),
                "block_bytes": self.block_bytes,
                "blocks_total": ps.capacity,
                "blocks_in_use": ps.in_use,
                "corrupt": 0,
                **self._c,
            }

    def close(self) -> None:
        with self._lock:
            for e in self._index.values():
                self._release(e)
            self._index.clear()

    def __repr__(self) -> str:
        return f"PooledTier({self.name!r}, {self.capacity_bytes} B on {self.device}, codec={self.codec.spec()!r})"
