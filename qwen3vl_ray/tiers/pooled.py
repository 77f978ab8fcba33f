"""A tier whose bytes live in the blocks of one preallocated :class:`BlockPool` (data side).

The device tier (slab on the model's device) and the host tier (slab in process memory, page-locked when
CUDA is present) are this one class with two configurations. An entry is a list of block ids, stored as
runs ``(start, count)``: a fresh or tidy pool hands out ascending ids, so most entries are one run and move
with one copy per run. Accounting is in whole blocks (what the entry really occupies).

Where an entry lives (its *location*: payload length and block runs packed in one int) is kept in the caller's
record of it: the store's own ``EntryRecord`` when a ``TieredCache`` drives the tier, so one record per entry
serves the store, its policy and the tier (vLLM's ``kv_offload`` managers likewise keep block ids in their own
metadata and hand them to the storage side). Used alone, the tier keeps a small record per key itself.

Codecs: ``"none"`` takes a raw path (the tensor's own bytes go straight into the blocks; no payload is
built). Any other codec stores ``codec.encode(tensor)`` bytes and decodes with ``codecs.decode``.

Thread safety: one lock guards the locations held in records, the pool and the copies out of blocks, so a
reader never sees blocks that a concurrent free/replace has handed to another entry. ``store_into`` copies in
under it too; the held-room store (``allocate``, ``write``, ``commit_into``) copies without it: the blocks
``allocate`` took belong to no entry until the commit, so nobody else reads or hands them out meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from qwen3vl_ray.codecs import decode, make_codec
from qwen3vl_ray.errors import CapacityError, ConfigError
from qwen3vl_ray.keys import CacheKey, Namespace, validate_key
from qwen3vl_ray.pools.block_pool import BlockPool
from qwen3vl_ray.tiers.base import Placement, PreparedStore, Reservation, Tier, encode_payload
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


# A location packs the entry's payload length and its blocks: ``nbytes << 32 | first block`` when the entry is
# one run of blocks (the common case: a fresh or tidy pool hands out ascending ids), else a tuple ``(nbytes, s0,
# n0, s1, n1, ...)``. One int object per entry, not a record of three fields (the per-entry metadata budget is
# 256 B for the store, its policy and the tier together).
_RUN_BITS = 32
_RUN_MASK = (1 << _RUN_BITS) - 1


def _pack(nbytes: int, ids: list[int]) -> int | tuple[int, ...]:
    if not ids:
        return nbytes << _RUN_BITS
    ids.sort()
    if ids[-1] - ids[0] == len(ids) - 1:  # ids are distinct: this is one run (the common case), no loop
        return nbytes << _RUN_BITS | ids[0]
    flat: list[int] = [nbytes]
    start = prev = ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            flat += (start, prev - start + 1)
            start = i
        prev = i
    flat += (start, prev - start + 1)
    return tuple(flat)


def _loc_nbytes(loc: int | tuple[int, ...]) -> int:
    return loc >> _RUN_BITS if isinstance(loc, int) else loc[0]


def _iter_runs(loc: int | tuple[int, ...], nblocks: int) -> Iterator[tuple[int, int]]:
    if not nblocks:
        return
    if isinstance(loc, int):
        yield loc & _RUN_MASK, nblocks
    else:
        for j in range(1, len(loc), 2):
            yield loc[j], loc[j + 1]


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
    """Entries in blocks of a byte pool on ``device``. Built by :func:`~qwen3vl_ray.tiers.factory.make_tier`.

    Addressed storage: where an entry lives is a *placement* (any object with ``loc`` and ``spec`` fields),
    and ``store_into``, ``commit_into``, ``read``, ``free``, ``stored_nbytes`` work on placements. A store that
    drives the tier passes its own records as the placements and ``attach``es its index, so the tier keeps no
    per-entry map; used alone, the tier keeps a ``Placement`` per key and the keyed API below works on those.
    """

    holds_room = True
    replaces_in_place = True
    addressed = True

    def __init__(self, name: str, cfg: TierConfig, namespace: Namespace, device: str | torch.device, pin_memory: bool = False) -> None:
        self.name = name
        self.cfg = cfg
        self.namespace = namespace
        self.codec = make_codec(cfg.codec)
        self._raw = self.codec.name == "none"
        self.block_bytes = effective_block_bytes(cfg.capacity_bytes, cfg.block_bytes)
        nblocks = cfg.capacity_bytes // self.block_bytes
        if nblocks > _RUN_MASK:
            raise ConfigError(f"{name} tier of {nblocks} blocks: at most {_RUN_MASK} (use larger block_bytes)")
        self.pool = BlockPool((self.block_bytes,), torch.uint8, nblocks, device, zero_on_release=cfg.zero_on_release,
                              pin_memory=pin_memory)
        self.device = self.pool.device
        # Usable bytes: whole blocks only, so free_bytes never promises room a block cannot give.
        self.capacity_bytes = nblocks * self.block_bytes
        self._flat = self.pool.slab.view(-1)
        # CPU<->CPU copies go through numpy: one plain memcpy per run. torch's copy_ splits large copies
        # over its intra-op threads, which on a busy 2-core host ran 2-10x slower than a single memcpy.
        self._flat_np = self._flat.numpy() if self.device.type == "cpu" else None
        self._own: dict[CacheKey, Placement] = {}  # standalone use: the placement of each key
        self._lookup: Callable[[CacheKey], Any] | None = None  # attached: the store's record of a key here
        self._listing: Callable[[], Iterable[CacheKey]] | None = None
        self._entries = 0
        self._specs: dict[tuple, tuple] = {}
        self._lock = threading.Lock()
        self._c = dict(puts=0, gets=0, hits=0, misses=0, rejected=0, removes=0, bytes_written=0, bytes_read=0)
        if self.block_bytes != cfg.block_bytes:
            log.info("%s tier: %d-byte budget < %d blocks of %d; using %d-byte blocks", name, cfg.capacity_bytes, MIN_BLOCKS, cfg.block_bytes, self.block_bytes)

    def attach(self, lookup: Callable[[CacheKey], Any], listing: Callable[[], Iterable[CacheKey]]) -> dict[CacheKey, Placement]:
        """Be driven by a store: ``lookup(key)`` gives the store's record of ``key`` in this tier (or None) and
        ``listing()`` the keys it has here. The keyed reads below then go through the store's records; stores
        go through the store (``store_into`` / ``commit_into`` with its records). Returns the entries the tier
        held alone (key -> placement), for the store to take into its records."""
        with self._lock:
            held, self._own = self._own, {}
            self._lookup, self._listing = lookup, listing
        return held

    def _place(self, key: CacheKey) -> Any:
        return self._lookup(key) if self._lookup is not None else self._own.get(key)

    def _keyed_store(self, key: CacheKey) -> Placement:
        """The record a keyed store of ``key`` goes into (lock held: finding or making it, storing into it and
        dropping it again when the store fails are one step for other threads)."""
        if self._lookup is not None:
            raise RuntimeError(f"the {self.name} tier belongs to a store: store {key.hex()[:8]} through it")
        slot = self._own.get(key)
        if slot is None:
            slot = self._own[key] = Placement()
        return slot

    # -- accounting ------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self.pool.in_use * self.block_bytes

    def __len__(self) -> int:
        return self._entries

    def keys(self) -> Iterator[CacheKey]:
        if self._listing is not None:
            return iter(list(self._listing()))
        with self._lock:
            return iter([k for k, slot in self._own.items() if slot.loc is not None])

    def _blocks(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes)

    def stored_nbytes(self, place: Any) -> int | None:
        """Bytes the entry at ``place`` occupies here (whole blocks), or None if it holds none."""
        loc = None if place is None else place.loc
        return None if loc is None else self._blocks(_loc_nbytes(loc)) * self.block_bytes

    def value_nbytes(self, place: Any) -> int | None:
        if place is None or place.loc is None:
            return None
        dtype, shape, _ = place.spec
        return math.prod(shape) * dtype.itemsize

    def entry_nbytes(self, key: CacheKey) -> int | None:
        return self.stored_nbytes(self._place(key))

    def entry_shape(self, key: CacheKey) -> tuple[int, ...] | None:
        place = self._place(key)
        return None if place is None or place.loc is None else place.spec[1]

    def block_runs(self, key: CacheKey) -> list[tuple[int, int]]:
        """The ``(first block, count)`` runs holding ``key`` (empty if absent): where its bytes are in the slab."""
        place = self._place(key)
        with self._lock:
            loc = None if place is None else place.loc
            return [] if loc is None else list(_iter_runs(loc, self._blocks(_loc_nbytes(loc))))

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
        src = self._source(prepared)
        with self._lock:
            slot = self._keyed_store(prepared.key)
            ok = self._store_locked(prepared, slot, src)
            if not ok and slot.loc is None:
                del self._own[prepared.key]
            return ok

    def store_into(self, prepared: PreparedStore, place: Any) -> bool:
        """Store ``prepared`` at ``place``, replacing what it holds (its blocks count as room for the new value);
        False if there is no room (nothing lost). The copy runs under the tier's lock."""
        src = self._source(prepared)
        with self._lock:
            return self._store_locked(prepared, place, src)

    def _store_locked(self, prepared: PreparedStore, place: Any, src: torch.Tensor | np.ndarray) -> bool:
        """``store_into`` with the lock held and ``src`` the bytes to copy in."""
        nbytes = prepared.meta["len"]
        need = self._blocks(nbytes)
        old = place.loc
        old_blocks = self._blocks(_loc_nbytes(old)) if old is not None else 0
        if need > self.pool.free + old_blocks:
            self._c["rejected"] += 1
            return False
        if need > self.pool.free:  # fits only in place of the entry it replaces: free that first
            self._release(old)
            place.loc = old = None
            self._entries -= 1
        ids = self.pool.acquire_ids(need) if need else []
        assert ids is not None, "free count checked under the lock"
        loc = _pack(nbytes, ids)
        self._copy_in(src, loc, need)
        self._publish(place, loc, self._spec(prepared))
        if old is not None:
            self._release(old)
        return True

    def _publish(self, place: Any, loc: int | tuple[int, ...], spec: tuple) -> None:
        """``place`` serves the entry at ``loc`` (lock held); what it served before is the caller's to release."""
        if place.loc is None:
            self._entries += 1
        place.spec = spec  # before the location: a reader that sees the location sees its spec
        place.loc = loc
        self._c["puts"] += 1
        self._c["bytes_written"] += _loc_nbytes(loc)

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
                out.append(Reservation(p, _pack(p.meta["len"], ids)))
        return out

    def write(self, res: Reservation) -> bool:
        # The blocks are this reservation's alone until commit: no lock, so other puts and reads go on.
        self._copy_in(self._source(res.prepared), res.slot, self._blocks(res.prepared.meta["len"]))
        return True

    def commit(self, res: Reservation) -> None:
        self.commit_many((res,))

    def commit_many(self, reservations: Sequence[Reservation]) -> None:
        with self._lock:
            self._commit_locked([(res, self._keyed_store(res.prepared.key)) for res in reservations])

    def commit_into(self, pairs: Sequence[tuple[Reservation, Any]]) -> None:
        """Each ``(reservation, place)``: ``place`` serves the written reservation from now on; the value it
        served before (a replace) is released."""
        with self._lock:
            self._commit_locked(pairs)

    def _commit_locked(self, pairs: Sequence[tuple[Reservation, Any]]) -> None:
        """``commit_into`` with the lock held."""
        for res, place in pairs:
            old = place.loc
            self._publish(place, res.slot, self._spec(res.prepared))
            if old is not None:
                self._release(old)

    def abort(self, res: Reservation) -> None:
        with self._lock:
            self._release(res.slot)

    def _copy_in(self, src: torch.Tensor | np.ndarray, loc: int | tuple, nblocks: int) -> None:
        B, flat, pos, total = self.block_bytes, self._flat, 0, (src.size if isinstance(src, np.ndarray) else src.numel())
        if isinstance(src, np.ndarray):
            flat = self._flat_np
        elif self._flat_np is not None and src.device.type == "cpu":
            flat, src = self._flat_np, src.numpy()
        for start, count in _iter_runs(loc, nblocks):
            n = min(count * B, total - pos)
            flat[start * B: start * B + n] = src[pos: pos + n]
            pos += n

    def _copy_out(self, dst: torch.Tensor, loc: int | tuple) -> None:
        """Copy the entry at ``loc`` into ``dst`` (contiguous, exactly its payload's bytes, any dtype)."""
        B, flat, pos, total = self.block_bytes, self._flat, 0, _loc_nbytes(loc)
        if self._flat_np is not None and dst.device.type == "cpu":
            flat, dst = self._flat_np, _cpu_bytes_np(dst)  # the caller holds ``dst``
        else:
            dst = _byte_view(dst)
        for start, count in _iter_runs(loc, self._blocks(total)):
            n = min(count * B, total - pos)
            dst[pos: pos + n] = flat[start * B: start * B + n]
            pos += n

    def _release(self, loc: int | tuple) -> None:
        nblocks = self._blocks(_loc_nbytes(loc))
        if not nblocks:
            return
        if isinstance(loc, int):  # one run: hand the pool a range, no per-block list
            first = loc & _RUN_MASK
            self.pool.release_ids(range(first, first + nblocks))
        else:
            self.pool.release_ids([i for s, c in _iter_runs(loc, nblocks) for i in range(s, s + c)])

    # -- reads -----------------------------------------------------------------------------------
    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.read(self._place(validate_key(key)), out)

    def read(self, place: Any, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The entry at ``place`` (see ``Tier.get``); None if it holds none. Its blocks are copied under the
        tier's lock, so a concurrent ``free`` or replace never hands them to another entry mid-copy."""
        with self._lock:
            self._c["gets"] += 1
            loc = None if place is None else place.loc
            if loc is None:
                self._c["misses"] += 1
                return None
            dtype, shape, encoded = place.spec
            if out is not None and (tuple(out.shape) != shape or out.dtype != dtype):
                raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, entry is {dtype} {shape}")
            nbytes = _loc_nbytes(loc)
            if encoded:
                buf = torch.empty(nbytes, dtype=torch.uint8)
                self._copy_out(buf, loc)
            else:
                direct = out is not None and out.is_contiguous()
                result = out if direct else torch.empty(shape, dtype=dtype, device=self.device)
                self._copy_out(result, loc)
            self._c["hits"] += 1
            self._c["bytes_read"] += nbytes
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
        key = validate_key(key)
        if self._lookup is None:
            return key in self._own  # a key's own record goes with its value (``complete_store``, ``remove``)
        place = self._lookup(key)
        return place is not None and place.loc is not None

    def remove(self, key: CacheKey) -> bool:
        key = validate_key(key)
        if self._lookup is not None:
            return self.free(self._lookup(key))
        with self._lock:
            return self._free_locked(self._own.pop(key, None))

    def free(self, place: Any) -> bool:
        """Release the entry at ``place`` (its blocks go back to the pool); False if it held none."""
        with self._lock:
            return self._free_locked(place)

    def _free_locked(self, place: Any) -> bool:
        """``free`` with the lock held."""
        loc = None if place is None else place.loc
        if loc is None:
            return False
        place.loc = None
        self._entries -= 1
        self._release(loc)
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
                "entries": self._entries,
                "block_bytes": self.block_bytes,
                "blocks_total": ps.capacity,
                "blocks_in_use": ps.in_use,
                "corrupt": 0,
                **self._c,
            }

    def close(self) -> None:
        places = [self._lookup(k) for k in self._listing()] if self._listing is not None else list(self._own.values())
        for place in places:
            self.free(place)
        self._own.clear()

    def __repr__(self) -> str:
        return f"PooledTier({self.name!r}, {self.capacity_bytes} B on {self.device}, codec={self.codec.spec()!r})"
