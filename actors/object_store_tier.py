"""A host tier whose entries live in the Ray object store, packed into slabs.

Data side. The process that holds this tier (the node agent) calls ``ray.put`` itself, so it owns every
entry: entries outlive the worker that produced them (Ray >= 2.56 has no ``ray.put(_owner=...)``), and they
die with the agent (objects made by ``ray.put`` are never reconstructed), which the directory treats as
misses.

Slabs: one ``ray.put`` costs ~1-1.5 ms of fixed overhead here (serialization, create and seal round trips to
the raylet), and one ``ray.get`` ~0.3-0.5 ms, so putting 1 MiB chunks one by one runs at ~1 GB/s while one
64 MiB object runs near memcpy. A batch (``complete_store_many``) is therefore stored as one object (a slab, at
most ``slab_bytes``, default 64 MiB: with 32 MiB slabs a 64 MiB batch paid the fixed cost twice, ~30% of the
copy, measured by ``benchmarks.cluster`` part (a); the price is a coarser unit of memory return and up to
64 MiB pulled by a cross-node reader): a list of the entries' raw bytes, which Ray serializes out-of-band, so
each entry is copied once, straight into the store, and comes back as a read-only zero-copy buffer. A slab's memory returns to the store only when its last entry goes, so ``used_bytes`` counts whole live
slabs (what the store really holds); entries of a batch age together, so LRU order tends to empty whole slabs.
Readers get the slab zero-copy and copy their slice out; a cross-node reader pulls the whole slab (the chunks
of one prefix are stored together, so that is usually what it wants).

Held room: the tier holds room before the bytes arrive (``holds_room``), as the pooled and disk tiers do, so a
``TieredCache.put_many`` places a whole batch under its lock (``allocate_many``: the bytes are charged from
then on), moves the bytes with its lock released (``write_many``: the batch's payloads go into the store as
one slab per ``slab_bytes``, one ``put`` each) and then publishes them (``commit_many``). A batch larger than
the tier is the cache's business: its newest entries stay here and the older ones go to the tier below, or,
with none, the batch's head stays (a chain's later chunks are useless without it).

Raw entries keep the tensor's bytes (bf16 as an int16 view); another codec stores its self-describing
payload. The backing store is injected: :class:`RayObjectStore` in the service, :class:`LocalObjectStore`
(plain process memory, same semantics) when the node logic is driven without Ray.
"""

from __future__ import annotations

import itertools
import logging
import pickle  # only for PickleBuffer (out-of-band raw buffers); nothing here pickles or unpickles cache data
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from qwen3vl_ray.codecs.base import _VIEW_AS, decode, dtype_from_name, dtype_name, make_codec, tensor_array
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import CacheKey, validate_key
from qwen3vl_ray.tiers.base import PreparedStore, Reservation, Tier

logger = logging.getLogger(__name__)

RAW = "raw"
ALIGN = 64
DEFAULT_SLAB_BYTES = 64 << 20


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


#: the ``slot`` of a reservation whose room went back already (its write was refused, or it was aborted)
_RELEASED = object()


def _fitting_prefix(prepared: Sequence[PreparedStore], room: int) -> int:
    """How many leading entries of a batch fit in ``room`` bytes (a batch is stored in order: a chain's
    later chunks are useless without its earlier ones)."""
    n = 0
    for p in prepared:
        if p.nbytes > room:
            break
        room -= p.nbytes
        n += 1
    return n


class ObjectStore(Protocol):
    """Where the bytes live. ``put`` returns a handle; ``get_many`` returns read-only arrays (zero-copy)."""

    def put(self, value: np.ndarray | list[np.ndarray]) -> Any: ...
    def get_many(self, handles: Sequence[Any]) -> list[Any]: ...


class RayObjectStore:
    """The node's Ray object store. Handles are ``ObjectRef``s owned by the calling process.

    A slab travels as a list of ``pickle.PickleBuffer``s over the entries' contiguous arrays: Ray copies each
    buffer once, straight into the store, and ``ray.get`` hands back read-only zero-copy buffers
    (``ray._raylet.SubBuffer``) that keep the store object mapped while referenced. Bare buffers instead of
    numpy arrays: no array reconstruction (dtype unpickling, ``_frombuffer``) per entry on every read, which cost
    ~0.2 ms of a ~0.5 ms ``ray.get`` of a 64-entry slab here; the tier keeps dtype and shape in its own index.
    """

    def put(self, value: np.ndarray | list[np.ndarray]) -> Any:
        import ray  # only this backend needs Ray

        if isinstance(value, list):
            return ray.put([pickle.PickleBuffer(np.ascontiguousarray(a)) for a in value])
        return ray.put(value)

    def get_many(self, handles: Sequence[Any]) -> list[Any]:
        import ray

        return ray.get(list(handles)) if handles else []


class LocalObjectStore:
    """Process memory with the object store's semantics: immutable copies, read-only views on get."""

    def put(self, value: np.ndarray | list[np.ndarray]) -> Any:
        def frozen(a: np.ndarray) -> np.ndarray:
            a = np.array(a, copy=True)
            a.flags.writeable = False
            return a

        return [frozen(a) for a in value] if isinstance(value, list) else frozen(value)

    def get_many(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)


@dataclass(slots=True)
class Slab:
    handle: Any
    nbytes: int
    live: int  # committed entries still pointing into it
    pending: int = 0  # entries written into it whose reservation is neither committed nor aborted yet
    charged: int = 0  # bytes counted in used_bytes (committed entries' bytes; kept until the slab dies)
    live_bytes: int = 0  # bytes of the committed entries still in it
    members: set = field(default_factory=set)  # their keys
    views: Any = None  # the slab as read from the store (read-only zero-copy buffers), held while the slab lives


@dataclass(slots=True)
class StoredEntry:
    """Metadata of one entry: its slice of a slab and how to decode it."""

    slab: int  # slab id
    handle: Any  # the slab's handle (kept here so a reader needs one lookup)
    index: int  # position in the slab's list of arrays
    nbytes: int  # payload bytes
    logical_bytes: int  # bytes of the decoded tensor
    codec: str  # RAW or the payload's codec spec
    dtype: str
    shape: tuple[int, ...]


tensor_to_array = tensor_array  # the codecs' view: bf16/fp8 travel as same-size integers


_HUGE_OUT = 1 << 22  # fresh outputs this large come from numpy, which asks for transparent huge pages (fewer faults)


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 numpy view (no copy for a contiguous CPU tensor, the common case, which
    skips the general path's ~3 us per entry; anything else goes through the codecs' ``tensor_array``)."""
    if t.is_contiguous() and not t.requires_grad and t.device.type == "cpu":
        view_as = _VIEW_AS.get(t.dtype)
        return (t if view_as is None else t.view(view_as)).numpy().reshape(-1).view(np.uint8)
    return tensor_to_array(t).reshape(-1).view(np.uint8)


def copy_plan(array: np.ndarray, dtype: str, shape: Sequence[int],
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None]:
    """Validate one raw entry against its destination and return ``(tensor, dst, src)``: ``np.copyto(dst, src)``
    fills ``tensor`` (a new one, or ``out``, which may be strided); ``dst`` is None for an empty tensor.

    Split from the copy so a batch validates and plans every entry first (~3-4 us of Python each) and then runs
    its copies back to back, instead of interleaving that Python work, cache-cold after every 1 MiB copy, with
    the copies; and so a bad entry is found before any byte of the batch is written."""
    tdtype = dtype_from_name(dtype)
    if out is None:
        n = array.nbytes
        if n >= _HUGE_OUT:
            out = torch.from_numpy(np.empty(n, dtype=np.uint8)).view(tdtype).view(tuple(shape))
        else:
            out = torch.empty(tuple(shape), dtype=tdtype)
    elif out.dtype != tdtype or out.shape != tuple(shape):
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, entry is {tdtype} {tuple(shape)}")
    src = array.reshape(-1).view(np.uint8)
    if not out.numel():
        if src.nbytes:
            raise CodecError(f"stored entry holds {src.nbytes} bytes, {tdtype} {tuple(shape)} needs 0")
        return out, None, None
    view_as = _VIEW_AS.get(tdtype)
    dst = (out if view_as is None else out.view(view_as)).numpy()
    if src.nbytes != dst.nbytes:
        raise CodecError(f"stored entry holds {src.nbytes} bytes, {tdtype} {tuple(shape)} needs {dst.nbytes}")
    if out.is_contiguous():
        return out, dst.reshape(-1).view(np.uint8), src
    return out, dst, src.view(dst.dtype).reshape(dst.shape)  # reshape of a strided view would copy: write through it


def array_to_tensor(array: np.ndarray, dtype: str, shape: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy stored raw bytes (any dtype/shape view of them) into a new tensor (or ``out``)."""
    t, dst, src = copy_plan(array, dtype, shape, out)
    if dst is not None:
        np.copyto(dst, src)
    return t


def slice_of(slab: Any, index: int, nbytes: int) -> np.ndarray:
    """Entry ``index`` of a slab as read from the store (a list of arrays or raw buffers; a bare array for one
    entry), as a flat read-only uint8 view that keeps the store's buffer alive."""
    arr = slab[index] if isinstance(slab, list) else slab
    flat = arr.reshape(-1).view(np.uint8) if isinstance(arr, np.ndarray) else np.frombuffer(arr, dtype=np.uint8)
    if flat.nbytes != nbytes:
        raise CodecError(f"slab entry {index} holds {flat.nbytes} bytes, its index says {nbytes}")
    return flat


class ObjectStoreTier(Tier):
    """Host tier in the Ray object store with its own byte budget (whole live slabs)."""

    name = "host"
    holds_room = True

    def __init__(self, capacity_bytes: int, codec: str = "none", store: ObjectStore | None = None,
                 slab_bytes: int = DEFAULT_SLAB_BYTES, map_slabs: bool = True) -> None:
        """``map_slabs``: read each slab back once when it is stored and hold its zero-copy buffers while it
        lives, so this process's reads make no store round trip (a ``ray.get`` is an IPC to the raylet, 0.3-1 ms
        on a loaded node, ~10% of a 64 MiB read). The cost moves to the store path, which is off the critical
        path of a hit. Mapped slabs are "in use" for Ray, so Ray will not spill them: keep the tier's budget
        below the node's object store (``AgentConfig.host_bytes`` says so)."""
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError(f"ObjectStoreTier capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if slab_bytes <= 0:
            raise ConfigError(f"ObjectStoreTier slab_bytes must be > 0, got {slab_bytes}")
        self.capacity_bytes = capacity_bytes
        self.slab_bytes = slab_bytes
        self.map_slabs = map_slabs
        self.codec = make_codec(codec)
        self._store: ObjectStore = store if store is not None else RayObjectStore()
        self._entries: dict[CacheKey, StoredEntry] = {}
        self._thinned: set[int] | None = None  # slabs thinned inside deferred_compaction(), compacted at its end
        self._slabs: dict[int, Slab] = {}
        self._ids = itertools.count()
        self._used = 0
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "stores": 0, "rejected": 0, "removes": 0, "corrupt": 0,
                        "bytes_in": 0, "bytes_out": 0, "recompressed": 0, "slabs_put": 0,
                        "compactions": 0}

    # -- accounting ---------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[CacheKey]:
        return iter(list(self._entries))

    def entry_nbytes(self, key: CacheKey) -> int | None:
        e = self._entries.get(key)
        return None if e is None else _aligned(e.nbytes)

    def entry(self, key: CacheKey) -> StoredEntry | None:
        """The entry's metadata and slab handle (handed out for zero-copy and cross-node reads)."""
        return self._entries.get(key)

    def slab_mates(self, key: CacheKey) -> list[CacheKey]:
        """Keys sharing ``key``'s slab (memory returns to the store only when all of them are gone)."""
        e = self._entries.get(key)
        return [] if e is None else [k for k, x in self._entries.items() if x.slab == e.slab]

    # -- stores -------------------------------------------------------------------------------
    def prepare_store(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        return self._encode(validate_key(key), tensor)

    def _encode(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ObjectStoreTier stores torch tensors, got {type(tensor).__name__}")
        logical = tensor.numel() * tensor.element_size()
        if self.codec.name == "none":  # flat bytes: the slab holds 1-D uint8 buffers, dtype/shape live in the index
            payload, codec = raw_bytes(tensor), RAW
        else:
            payload, codec = np.frombuffer(self.codec.encode(tensor), dtype=np.uint8), self.codec.spec()
        nbytes = _aligned(payload.nbytes)
        if nbytes > self.capacity_bytes:
            raise CapacityError(f"entry of {nbytes} bytes exceeds the host tier's {self.capacity_bytes}-byte budget")
        meta = {"codec": codec, "dtype": dtype_name(tensor.dtype), "shape": tuple(tensor.shape), "logical": logical}
        return PreparedStore(key=key, nbytes=nbytes, payload=payload, meta=meta)

    def complete_store(self, prepared: PreparedStore) -> bool:
        return self.complete_store_many([prepared])[0]

    def complete_store_many(self, prepared: Sequence[PreparedStore]) -> list[bool]:
        """Commit a batch at once: the longest prefix of the batch that fits is packed into slabs of at most
        ``slab_bytes`` (one ``put`` each), replacing their keys' entries; the rest is refused (False) and keeps
        what it had: a replaced entry goes only once its new value is stored."""
        return self._store_batch(prepared)

    def _store_batch(self, prepared: Sequence[PreparedStore],
                     expect: dict[CacheKey, StoredEntry] | None = None) -> list[bool]:
        """``complete_store_many``; with ``expect`` (a re-pack) an entry is only replaced while it is still the
        entry ``expect`` names: one replaced or removed meanwhile keeps what it has now, and its copy in the new
        slab is dead room, as a removed entry's is (the slab's charge)."""
        with self._lock:
            n_fit = len(prepared)
            while True:  # the room the replaced entries give back depends on which of them go
                fit = _fitting_prefix(prepared[:n_fit], self.capacity_bytes - self._used
                                      + self._freed_by_dropping({p.key for p in prepared[:n_fit]}))
                if fit == n_fit:
                    break
                n_fit = fit
            self._counts["rejected"] += len(prepared) - n_fit
            # held while the slabs are put; each replaced entry goes when its new value is served (``_publish``)
            self._used += sum(p.nbytes for p in prepared[:n_fit])
        ok = [False] * len(prepared)
        done = 0
        for group in self._slab_groups(prepared[:n_fit]):
            try:
                entries = self._put_slab(group)
            except Exception:  # the store is full or gone: these are not stored, what they replace stays
                logger.warning("object store refused a slab of %d entries", len(group), exc_info=True)
                with self._lock:
                    self._used -= sum(p.nbytes for p in group)
                    self._counts["rejected"] += len(group)
            else:
                with self._lock:
                    for j, (p, e) in enumerate(zip(group, entries)):
                        if expect is None or self._entries.get(p.key) is expect.get(p.key):
                            self._publish(p, e)
                            ok[done + j] = True
                        else:
                            self._slabs[e.slab].charged += p.nbytes
                    if entries:
                        self._free_if_empty(entries[0].slab)  # every copy in it dead: it goes at once
            done += len(group)
        return ok

    def _freed_by_dropping(self, keys: set[CacheKey]) -> int:
        """Bytes that dropping ``keys`` would give back (lock held): a slab's charge returns only when its last
        entry goes (and nothing written into it waits for its commit); a thinner slab gives back nothing until it
        is compacted."""
        slabs = {self._entries[k].slab for k in keys if k in self._entries}
        return sum(self._slabs[s].charged for s in slabs
                   if self._slabs[s].pending == 0 and self._slabs[s].members <= keys)

    # -- held-room store (``TieredCache.put_many``) --------------------------------------------
    def allocate(self, prepared: PreparedStore) -> Reservation | None:
        return self.allocate_many([prepared])[0]

    def allocate_many(self, prepared: Sequence[PreparedStore]) -> list[Reservation | None]:
        """Hold room for each entry that fits (its bytes count in ``used_bytes`` from now on); None for the rest."""
        out: list[Reservation | None] = []
        with self._lock:
            for p in prepared:
                if p.nbytes > self.capacity_bytes - self._used:
                    out.append(None)
                    continue
                self._used += p.nbytes
                out.append(Reservation(p))
        return out

    def write(self, res: Reservation) -> bool:
        return next(iter(self.write_many([res])))

    def write_many(self, reservations: Sequence[Reservation]) -> Iterator[bool]:
        """The batch's payloads into the store, one slab (one ``put``) per ``slab_bytes``, yielding each entry's
        result as its slab lands; each written reservation then points at its place (``slot``), served once
        committed. A slab the store refuses releases its room (and its reservations need no ``abort``)."""
        done = 0
        for group in self._slab_groups([r.prepared for r in reservations]):
            mine = reservations[done: done + len(group)]
            done += len(group)
            try:
                entries = self._put_slab(group)
            except Exception:  # the store is full or gone: these entries are not stored, nothing else is lost
                logger.warning("object store refused a slab of %d entries", len(group), exc_info=True)
                with self._lock:
                    self._used -= sum(p.nbytes for p in group)
                    for res in mine:
                        res.slot = _RELEASED
                yield from [False] * len(group)
                continue
            with self._lock:
                for res, e in zip(mine, entries):
                    res.slot = e
                    self._slabs[e.slab].pending += 1
            yield from [True] * len(group)

    def commit(self, res: Reservation) -> None:
        self.commit_many([res])

    def commit_many(self, reservations: Sequence[Reservation]) -> None:
        with self._lock:
            for res in reservations:
                e, res.slot = res.slot, None
                self._slabs[e.slab].pending -= 1
                self._publish(res.prepared, e)

    def abort(self, res: Reservation) -> None:
        with self._lock:
            e, res.slot = res.slot, _RELEASED
            if e is _RELEASED:  # its room went back already (a refused write, or aborted before)
                return
            self._used -= res.prepared.nbytes
            if e is not None:  # written but never served
                self._slabs[e.slab].pending -= 1
                self._free_if_empty(e.slab)

    def reclaim(self) -> int:
        """Re-pack the survivors of every slab holding dead bytes (entries removed, the slab still charged), so
        the room of removed entries becomes free (``TieredCache._make_room`` asks once its victims' bytes cover
        what it needs). Returns bytes freed."""
        with self._lock:
            thin = [sid for sid, slab in self._slabs.items()
                    if slab.pending == 0 and slab.live and slab.live_bytes < slab.charged]
        return self.compact(thin) if thin else 0

    def _slab_groups(self, prepared: Sequence[PreparedStore]) -> list[list[PreparedStore]]:
        groups: list[list[PreparedStore]] = []
        size = 0
        for p in prepared:
            if not groups or size + p.nbytes > self.slab_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.nbytes
        return groups

    def _put_slab(self, group: Sequence[PreparedStore]) -> list[StoredEntry]:
        """Put ``group``'s payloads into the store as one object (each array copied once); their entries, not
        served yet (the caller publishes them). Their room is already counted."""
        total = sum(p.nbytes for p in group)
        handle = self._store.put([p.payload for p in group])
        views = self._store.get_many([handle])[0] if self.map_slabs else None
        with self._lock:
            sid = next(self._ids)
            self._slabs[sid] = Slab(handle, total, 0, views=views)
            self._counts["bytes_in"] += total
            self._counts["slabs_put"] += 1
        return [StoredEntry(sid, handle, i, int(p.payload.nbytes), p.meta["logical"], p.meta["codec"], p.meta["dtype"],
                            p.meta["shape"]) for i, p in enumerate(group)]

    def _publish(self, p: PreparedStore, e: StoredEntry) -> None:
        """Serve ``e`` as ``p.key``'s entry, replacing a committed one (lock held; its room is counted already,
        and the slab keeps it charged until the slab dies)."""
        self._drop(p.key)
        slab = self._slabs[e.slab]
        self._entries[p.key] = e
        slab.live += 1
        slab.charged += p.nbytes
        slab.live_bytes += p.nbytes
        slab.members.add(p.key)
        self._counts["stores"] += 1

    def put_many(self, items: Sequence[tuple[CacheKey, torch.Tensor]]) -> list[bool]:
        return self.complete_store_many([self.prepare_store(k, t) for k, t in items])

    def _drop(self, key: CacheKey) -> bool:
        """Remove a committed entry; free its slab if it was the last one. Caller holds the lock."""
        e = self._entries.pop(key, None)
        if e is None:
            return False
        slab = self._slabs[e.slab]
        slab.live -= 1
        slab.live_bytes -= _aligned(e.nbytes)
        slab.members.discard(key)
        self._free_if_empty(e.slab)
        return True

    def _free_if_empty(self, sid: int) -> None:
        slab = self._slabs[sid]
        if slab.live == 0 and slab.pending == 0:
            del self._slabs[sid]  # dropping the last handle frees the object once no reader holds it
            self._used -= slab.charged

    def recompress_slabs(self, keys: Sequence[CacheKey], codec: str | None) -> dict:
        """Re-pack every slab holding one of ``keys`` into a new slab, re-encoding its raw entries with
        ``codec`` (None: copy as they are, which compacts a slab whose other entries are gone). The old slabs'
        memory returns. Entries that would not shrink stay raw. Returns the drop in ``used_bytes`` as
        ``bytes`` and the number of re-encoded entries."""
        c = make_codec(codec) if codec else None
        with self._lock:
            slab_ids = {self._entries[k].slab for k in keys if k in self._entries}
            members = [(k, self._entries[k]) for s in slab_ids for k in self._slabs[s].members]
        if not members:
            return {"bytes": 0, "entries": 0}
        arrays = dict(zip(slab_ids, self._store.get_many([self._slabs[s].handle for s in slab_ids])))
        before = self._used
        batch, count = [], 0
        for k, e in members:
            raw = slice_of(arrays[e.slab], e.index, e.nbytes)
            if c is not None and e.codec == RAW:
                payload = np.frombuffer(c.encode(array_to_tensor(raw, e.dtype, e.shape)), dtype=np.uint8)
                if payload.nbytes < e.nbytes:
                    count += 1
                    batch.append(PreparedStore(k, _aligned(payload.nbytes), payload,
                                               {"codec": c.spec(), "dtype": e.dtype, "shape": e.shape,
                                                "logical": e.logical_bytes}))
                    continue
            batch.append(PreparedStore(k, _aligned(e.nbytes), np.array(raw),
                                       {"codec": e.codec, "dtype": e.dtype, "shape": e.shape, "logical": e.logical_bytes}))
        del arrays
        # Each entry is replaced by its copy in the new slab (the old slabs' room counts for it: every member of
        # them is in the batch), only once that slab is stored: if the store refuses it, every entry keeps its
        # old slab; one replaced or removed meanwhile keeps what it has now.
        ok = self._store_batch(batch, expect=dict(members))
        self._counts["recompressed"] += count
        if not all(ok):
            logger.warning("re-pack kept %d of %d entries in their old slabs (the store refused the new slab, or "
                           "they changed meanwhile)", len(ok) - sum(ok), len(ok))
        return {"bytes": before - self._used, "entries": count}

    def compact(self, slab_ids: Sequence[int]) -> int:
        """Re-pack the survivors of the given slabs (those still partly dead). Returns bytes freed."""
        with self._lock:
            keys = [next(iter(self._slabs[s].members)) for s in set(slab_ids)
                    if s in self._slabs and self._slabs[s].live and self._slabs[s].pending == 0
                    and self._slabs[s].live_bytes < self._slabs[s].charged]
        return self.recompress_slabs(keys, None)["bytes"] if keys else 0

    # -- reads --------------------------------------------------------------------------------
    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.get_many([key], outs=[out])[0]

    def get_many(self, keys: Sequence[CacheKey], outs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """One batched read of the slabs involved (zero-copy views), then a copy out per entry into tensors the
        caller owns (``outs[i]`` when given). Every entry is validated and planned before the first copy, and the
        copies then run back to back (see :func:`copy_plan`)."""
        arrays: dict[int, Any] = {}  # slab id -> the slab's buffers
        handles: dict[int, Any] = {}  # slabs not mapped yet: read from the store, in one call
        with self._lock:
            entries = [self._entries.get(k) for k in keys]
            for e in entries:
                if e is not None and e.slab not in arrays and e.slab not in handles:
                    slab = self._slabs.get(e.slab)
                    if slab is not None and slab.views is not None:
                        arrays[e.slab] = slab.views  # held here, so valid even if the slab dies meanwhile
                    else:
                        handles[e.slab] = e.handle
        if handles:
            arrays.update(zip(handles, self._store.get_many(list(handles.values()))))
        result: list[torch.Tensor | None] = [None] * len(keys)
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        misses = hits = nbytes = 0
        for i, e in enumerate(entries):
            if e is None:
                misses += 1
                continue
            out = outs[i] if outs else None
            try:
                array = slice_of(arrays[e.slab], e.index, e.nbytes)
                if e.codec == RAW:
                    t, dst, src = copy_plan(array, e.dtype, e.shape, out)
                    if dst is not None:
                        copies.append((dst, src))
                else:
                    t = decode(array)
                    if out is not None:
                        out.copy_(t)
                        t = out
            except CodecError:
                # A corrupt payload is a miss, never wrong data: drop it and count it.
                logger.warning("host tier: corrupt entry %s dropped", keys[i].hex(), exc_info=True)
                self._counts["corrupt"] += 1
                self.remove(keys[i])
                continue
            result[i] = t
            hits += 1
            nbytes += e.nbytes
        for dst, src in copies:
            np.copyto(dst, src)
        self._counts["misses"] += misses
        self._counts["hits"] += hits
        self._counts["bytes_out"] += nbytes
        return result

    def contains(self, key: CacheKey) -> bool:
        return key in self._entries

    def remove(self, key: CacheKey) -> bool:
        """Remove an entry. A slab whose live entries fell to half its charged bytes or less is compacted (its
        survivors re-packed into a new slab), so removals free memory promptly and an evicting cache stops
        after about the bytes it needed instead of emptying whole slabs."""
        with self._lock:
            e = self._entries.get(key)
            ok = self._drop(key)
            if not ok:
                return False
            self._counts["removes"] += 1
            slab = self._slabs.get(e.slab)
            survivor = None
            if self._thinned is not None:
                self._thinned.add(e.slab)
            elif slab is not None and slab.pending == 0 and slab.live and 2 * slab.live_bytes <= slab.charged:
                survivor = next(iter(slab.members))
        if survivor is not None:
            self.recompress_slabs([survivor], None)
            self._counts["compactions"] += 1
        return True

    @contextmanager
    def deferred_compaction(self):
        """Removes inside the block compact nothing; each slab they thinned is compacted once at the end (its
        survivors re-packed into one new slab, or nothing if it emptied). Demoting a whole slab entry by entry
        would otherwise re-pack its shrinking survivors at every halving, a store put each time."""
        with self._lock:
            outer, self._thinned = self._thinned, set() if self._thinned is None else self._thinned
        try:
            yield
        finally:
            if outer is None:
                with self._lock:
                    thinned, self._thinned = self._thinned, None
                self.compact(list(thinned))

    def remove_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        """Remove many entries, then compact the slabs they leave half-empty or worse (once, not per key)."""
        touched: set[int] = set()
        out = []
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                ok = self._drop(k)
                out.append(ok)
                if ok:
                    self._counts["removes"] += 1
                    touched.add(e.slab)
            thin = [sid for sid in touched if sid in self._slabs
                    and 2 * self._slabs[sid].live_bytes <= self._slabs[sid].charged]
        if thin:
            self.compact(thin)
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            logical = sum(e.logical_bytes for e in self._entries.values())
            payload = sum(e.nbytes for e in self._entries.values())
            return {"name": self.name, "capacity_bytes": self.capacity_bytes, "used_bytes": self._used,
                    "entries": len(self._entries), "slabs": len(self._slabs), "codec": self.codec.spec(),
                    "live_payload_bytes": payload,
                    "compression_ratio": (logical / payload) if payload else 1.0, **self._counts}

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._slabs.clear()
            self._used = 0
