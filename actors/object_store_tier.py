"""A host tier whose entries live in the Ray object store.

Data side. The process that holds this tier (the node agent) calls ``ray.put`` itself, so it owns every
entry: entries outlive the worker that produced them (Ray >= 2.56 has no ``ray.put(_owner=...)``), and they
die with the agent (objects made by ``ray.put`` are never reconstructed), which the directory treats as
misses. Raw entries are stored as a numpy array of the tensor's own shape (bf16 as an int16 view, fp8 as
uint8) so any process on the node reads them zero-copy; a codec other than ``none`` stores its
self-describing payload as a flat uint8 array.

The backing store is injected: :class:`RayObjectStore` in the service, :class:`LocalObjectStore` (plain
process memory, same semantics) when the node logic is driven without Ray.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from qwen3vl_ray.codecs.base import decode, dtype_from_name, dtype_name, make_codec
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import CacheKey, validate_key
from qwen3vl_ray.tiers.base import PreparedStore, Tier

logger = logging.getLogger(__name__)

# torch dtypes without a numpy twin travel as a same-size integer view.
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}
RAW = "raw"


class ObjectStore(Protocol):
    """Where the bytes live. ``put`` returns a handle; ``get`` returns a read-only array (zero-copy)."""

    def put(self, array: np.ndarray) -> Any: ...
    def get_many(self, handles: Sequence[Any]) -> list[np.ndarray]: ...


class RayObjectStore:
    """The node's Ray object store. Handles are ``ObjectRef``s owned by the calling process."""

    def put(self, array: np.ndarray) -> Any:
        import ray  # only this backend needs Ray

        return ray.put(array)

    def get_many(self, handles: Sequence[Any]) -> list[np.ndarray]:
        import ray

        return ray.get(list(handles)) if handles else []


class LocalObjectStore:
    """Process memory with the object store's semantics: immutable copies, read-only views on get."""

    def put(self, array: np.ndarray) -> Any:
        stored = np.array(array, copy=True)
        stored.flags.writeable = False
        return stored

    def get_many(self, handles: Sequence[Any]) -> list[np.ndarray]:
        return list(handles)


@dataclass(slots=True)
class StoredEntry:
    """Metadata of one entry; ``handle`` keeps the object alive."""

    handle: Any
    nbytes: int  # bytes held in the store
    logical_bytes: int  # bytes of the decoded tensor
    codec: str  # RAW or the payload's codec spec
    dtype: str
    shape: tuple[int, ...]


def tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU contiguous numpy view of ``tensor`` with its shape (copies only if it must)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    return t.numpy()


def array_to_tensor(array: np.ndarray, dtype: str, shape: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy a stored raw array into a new tensor (or ``out``) of ``dtype``/``shape``."""
    tdtype = dtype_from_name(dtype)
    if out is None:
        out = torch.empty(tuple(shape), dtype=tdtype)
    elif out.dtype != tdtype or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, entry is {tdtype} {tuple(shape)}")
    if out.numel():
        dst = out.view(_VIEW_AS.get(tdtype, tdtype)).numpy()
        np.copyto(dst, array.reshape(dst.shape), casting="no")
    return out


class ObjectStoreTier(Tier):
    """Host tier in the Ray object store with its own byte budget (payload bytes, not plasma overhead)."""

    name = "host"

    def __init__(self, capacity_bytes: int, codec: str = "none", store: ObjectStore | None = None) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError(f"ObjectStoreTier capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.codec = make_codec(codec)
        self._store: ObjectStore = store if store is not None else RayObjectStore()
        self._entries: dict[CacheKey, StoredEntry] = {}
        self._used = 0
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "stores": 0, "rejected": 0, "removes": 0, "corrupt": 0,
                        "bytes_in": 0, "bytes_out": 0, "recompressed": 0}

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
        return None if e is None else e.nbytes

    def entry(self, key: CacheKey) -> StoredEntry | None:
        """The entry's metadata and handle (the agent hands handles out for zero-copy and cross-node reads)."""
        return self._entries.get(key)

    # -- two-phase store ----------------------------------------------------------------------
    def prepare_store(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        key = validate_key(key)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ObjectStoreTier stores torch tensors, got {type(tensor).__name__}")
        logical = tensor.numel() * tensor.element_size()
        if self.codec.name == "none":
            payload, codec = tensor_to_array(tensor), RAW
        else:
            payload, codec = np.frombuffer(self.codec.encode(tensor), dtype=np.uint8), self.codec.spec()
        if payload.nbytes > self.capacity_bytes:
            raise CapacityError(f"entry of {payload.nbytes} bytes exceeds the host tier's {self.capacity_bytes}-byte budget")
        meta = {"codec": codec, "dtype": dtype_name(tensor.dtype), "shape": tuple(tensor.shape), "logical": logical}
        return PreparedStore(key=key, nbytes=int(payload.nbytes), payload=payload, meta=meta)

    def complete_store(self, prepared: PreparedStore) -> bool:
        with self._lock:
            old = self._entries.get(prepared.key)
            if self._used - (old.nbytes if old else 0) + prepared.nbytes > self.capacity_bytes:
                self._counts["rejected"] += 1
                return False
        handle = self._store.put(prepared.payload)  # the copy into the store, outside the lock
        m = prepared.meta
        with self._lock:
            old = self._entries.pop(prepared.key, None)
            if old is not None:
                self._used -= old.nbytes
            self._entries[prepared.key] = StoredEntry(handle, prepared.nbytes, m["logical"], m["codec"], m["dtype"], m["shape"])
            self._used += prepared.nbytes
            self._counts["stores"] += 1
            self._counts["bytes_in"] += prepared.nbytes
        return True

    def put_many(self, items: Sequence[tuple[CacheKey, torch.Tensor]]) -> list[bool]:
        return [self.complete_store(self.prepare_store(k, t)) for k, t in items]

    def replace_payload(self, key: CacheKey, payload: np.ndarray | bytes | bytearray, codec: str) -> bool:
        """Swap an entry's stored form for an already encoded ``payload`` (recompression). False if absent
        or if the new form does not fit."""
        arr = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload
        with self._lock:
            old = self._entries.get(key)
            if old is None or self._used - old.nbytes + arr.nbytes > self.capacity_bytes:
                return False
        handle = self._store.put(arr)
        with self._lock:
            old = self._entries.get(key)
            if old is None:  # removed meanwhile
                return False
            self._used += arr.nbytes - old.nbytes
            self._entries[key] = StoredEntry(handle, int(arr.nbytes), old.logical_bytes, codec, old.dtype, old.shape)
            self._counts["recompressed"] += 1
        return True

    # -- reads --------------------------------------------------------------------------------
    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.get_many([key], outs=[out])[0]

    def get_many(self, keys: Sequence[CacheKey], outs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """One batched read of the store (zero-copy views), then a copy out per entry."""
        with self._lock:
            entries = [self._entries.get(k) for k in keys]
        present = [e for e in entries if e is not None]
        arrays = iter(self._store.get_many([e.handle for e in present]))
        result: list[torch.Tensor | None] = []
        for i, e in enumerate(entries):
            if e is None:
                self._counts["misses"] += 1
                result.append(None)
                continue
            result.append(self._decode(keys[i], e, next(arrays), outs[i] if outs else None))
        return result

    def read_array(self, key: CacheKey) -> tuple[np.ndarray, StoredEntry] | None:
        """The stored array itself (read-only, zero-copy) with its metadata; for transcoding and spilling."""
        e = self._entries.get(key)
        if e is None:
            return None
        return self._store.get_many([e.handle])[0], e

    def _decode(self, key: CacheKey, e: StoredEntry, array: np.ndarray, out: torch.Tensor | None) -> torch.Tensor | None:
        try:
            if e.codec == RAW:
                t = array_to_tensor(array, e.dtype, e.shape, out)
            else:
                t = decode(array)
                if out is not None:
                    out.copy_(t)
                    t = out
        except CodecError:
            # A corrupt payload is a miss, never wrong data: drop it and count it.
            logger.warning("host tier: corrupt entry %s dropped", key.hex(), exc_info=True)
            self._counts["corrupt"] += 1
            self.remove(key)
            return None
        self._counts["hits"] += 1
        self._counts["bytes_out"] += e.nbytes
        return t

    def contains(self, key: CacheKey) -> bool:
        return key in self._entries

    def remove(self, key: CacheKey) -> bool:
        with self._lock:
            e = self._entries.pop(key, None)
            if e is None:
                return False
            self._used -= e.nbytes  # dropping the handle frees the object once no reader holds it
            self._counts["removes"] += 1
            return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            logical = sum(e.logical_bytes for e in self._entries.values())
            return {"name": self.name, "capacity_bytes": self.capacity_bytes, "used_bytes": self._used,
                    "entries": len(self._entries), "codec": self.codec.spec(),
                    "compression_ratio": (logical / self._used) if self._used else 1.0, **self._counts}

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0
