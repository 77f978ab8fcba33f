"""The storage interface every tier implements (device, host, disk, and the Ray object-store host tier).

Data side only: a tier stores and returns bytes-backed tensors and keeps its own byte accounting. It never
decides what to evict; the :class:`~qwen3vl_ray.cache.tiered_cache.TieredCache` asks a policy and calls
``remove``. Stores are two-phase so the cache can make room for the *encoded* size before committing:

    prepared = tier.prepare_store(key, tensor)   # encodes, reserves nothing, returns its stored size
    ... cache evicts until tier.free_bytes >= prepared.nbytes ...
    tier.complete_store(prepared)                # -> False if it still does not fit (nothing lost)

``put`` is the one-shot form (prepare + complete without eviction).

Tiers that can hold room for an entry before its bytes arrive (``holds_room``: the pooled and disk tiers) also
store in three steps, so the cache moves bytes outside its metadata lock (vLLM's ``prepare_store`` /
``complete_store`` split, ``vllm/v1/kv_offload``):

    res = tier.allocate(prepared)   # metadata side, fast: the room counts in used_bytes now; None if no room
    ok = tier.write(res)            # data side, no cache lock: copy, or file write + fsync; False: room released
    tier.commit(res)                # metadata side: the entry is served (after a True write)
    tier.abort(res)                 # instead of write: the room goes back
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch

from qwen3vl_ray.keys import CacheKey, validate_key

if TYPE_CHECKING:
    from qwen3vl_ray.codecs.base import Codec


@dataclass(slots=True)
class PreparedStore:
    """An entry encoded and ready to be committed to a tier. ``nbytes`` is what it will occupy."""

    key: CacheKey
    nbytes: int
    payload: Any  # tier-specific: the tensor itself, or an encoded uint8 buffer
    meta: dict = field(default_factory=dict)


class EncodedPayload(NamedTuple):
    """A tensor as a codec-backed tier will store it, before the tier adds its own framing and size rules."""

    key: CacheKey  # validated
    payload: Any  # the detached tensor itself (the identity codec "none"), else the codec's encoded buffer
    nbytes: int  # length of ``payload`` in bytes


def encode_payload(codec: Codec, tier_name: str, key: CacheKey, tensor: torch.Tensor) -> EncodedPayload:
    """The part of ``prepare_store`` every codec-backed tier shares: check the key and the value, then encode.

    The identity codec is skipped: its tensor is kept as is (detached) so the tier copies its bytes straight
    from the source instead of through an encoded copy."""
    key = validate_key(key)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{tier_name} tier stores torch.Tensor, got {type(tensor).__name__}")
    if codec.name == "none":
        payload = tensor.detach()
        return EncodedPayload(key, payload, payload.numel() * payload.element_size())
    payload = codec.encode(tensor)
    return EncodedPayload(key, payload, len(payload))


class Placement:
    """Where an addressed tier (``Tier.addressed``) put an entry's bytes, for a caller without a record of its
    own to hold it: the tier's location and its description of the value. ``EntryRecord`` has the same two
    fields; a tier used alone keeps one of these per key."""

    __slots__ = ("loc", "spec")

    def __init__(self) -> None:
        self.loc: Any = None  # the tier's location of the bytes; None: it holds none
        self.spec: Any = None  # the tier's interned description of the value (dtype, shape, encoded)


@dataclass(slots=True)
class Reservation:
    """Room held in a tier for one prepared entry, between ``allocate`` and ``commit``/``abort``.

    ``slot``: where the bytes go (a pooled tier's block runs; a disk tier's held byte count)."""

    prepared: PreparedStore
    slot: Any = None


class Tier(ABC):
    """A storage level with a byte budget. Implementations must be safe for one writer thread plus readers."""

    #: "device", "host" or "disk" (the Ray object-store tier reports "host").
    name: str
    capacity_bytes: int
    #: ``allocate``/``write``/``commit``/``abort`` are implemented: room is held before the bytes arrive and
    #: ``write`` needs no lock of the caller's. Tiers without it (wrappers) are stored with ``complete_store``
    #: under the cache's lock.
    holds_room: bool = False
    #: Writing an entry waits on a device (file write, fsync): the cache never does it under its metadata lock.
    slow_writes: bool = False
    #: A replace of a key this tier holds reuses the old value's room as it lands (the pooled tiers' blocks), so
    #: the cache stores it under its lock with room for the difference only; other tiers replace through held
    #: room (the old value stays readable until the new one commits).
    replaces_in_place: bool = False
    #: The tier is addressed storage: an entry's location lives in a record of the caller's (an object with
    #: ``loc`` and ``spec`` fields; the store passes its ``EntryRecord``), and ``store_into``, ``commit_into``,
    #: ``read``, ``free`` and ``stored_nbytes`` take that record. A store ``attach``es its index so the keyed
    #: methods below find the records too. Other tiers keep an index of their own and are driven by key.
    addressed: bool = False

    # -- accounting ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def keys(self) -> Iterator[CacheKey]: ...

    @abstractmethod
    def entry_nbytes(self, key: CacheKey) -> int | None:
        """Bytes ``key`` occupies in this tier, or None if absent."""

    def entry_shape(self, key: CacheKey) -> tuple[int, ...] | None:
        """The stored tensor's shape, read from the index (nothing is copied), or None if absent or not kept
        in the index (the default)."""
        return None

    # -- two-phase store ----------------------------------------------------------------------
    @abstractmethod
    def prepare_store(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        """Encode ``tensor`` for this tier (no side effects on stored data). Raises ``CapacityError`` if
        the entry is larger than the whole tier."""

    @abstractmethod
    def complete_store(self, prepared: PreparedStore) -> bool:
        """Commit; ``False`` if there is no room (nothing stored is lost). Replaces an existing entry."""

    def put(self, key: CacheKey, tensor: torch.Tensor) -> bool:
        return self.complete_store(self.prepare_store(key, tensor))

    # -- held-room store (where ``holds_room``) ---------------------------------------------------
    def allocate(self, prepared: PreparedStore) -> Reservation | None:
        """Hold room for ``prepared`` (counted in ``used_bytes`` from now on); None if it does not fit.
        Makes no room: evicting is the cache's decision."""
        raise NotImplementedError(f"{type(self).__name__} does not hold room; store it with complete_store")

    def write(self, res: Reservation) -> bool:
        """Move the reserved entry's bytes in. Safe without any lock of the caller's, beside reads and other
        writes. ``False`` on an I/O failure: nothing stored and the room released (no ``abort`` needed)."""
        raise NotImplementedError(f"{type(self).__name__} does not hold room")

    def commit(self, res: Reservation) -> None:
        """Serve the entry written into ``res`` (replacing an existing one of its key)."""
        raise NotImplementedError(f"{type(self).__name__} does not hold room")

    def abort(self, res: Reservation) -> None:
        """Give back the room of a reservation that was never written."""
        raise NotImplementedError(f"{type(self).__name__} does not hold room")

    def write_many(self, reservations: Sequence[Reservation]) -> Iterator[bool]:
        """``write`` for each, in order, yielding each result as its bytes land (a caller interrupted by an
        exception keeps the results it has); a tier may move the batch at once (one object, one syscall)."""
        for res in reservations:
            yield self.write(res)

    def reclaim(self) -> int:
        """Turn the room of removed entries that the tier still counts into free room; bytes freed. A tier that
        frees room as entries go has nothing to do (the default). The Ray object-store tier returns a slab's
        memory only when the slab goes, so it re-packs the thinned slabs' survivors here."""
        return 0

    def allocate_many(self, prepared: Sequence[PreparedStore]) -> list[Reservation | None]:
        """``allocate`` for each, in order (a tier may take its lock once for all)."""
        return [self.allocate(p) for p in prepared]

    def commit_many(self, reservations: Sequence[Reservation]) -> None:
        """``commit`` for each, in order (a tier may take its lock once for all)."""
        for res in reservations:
            self.commit(res)

    # -- addressed storage (where ``addressed``): the caller's record holds the entry's location ----------
    def attach(self, lookup: Callable[[CacheKey], Any], listing: Callable[[], Iterable[CacheKey]]) -> dict:
        """Be driven by a store whose records hold the locations (``lookup(key)``: its record of ``key`` here or
        None; ``listing()``: its keys here). Returns what the tier held alone, key -> ``Placement``."""
        raise NotImplementedError(f"{type(self).__name__} is not addressed storage")

    def store_into(self, prepared: PreparedStore, place: Any) -> bool:
        """``complete_store`` at ``place`` (a record with ``loc``/``spec``), replacing what it holds."""
        raise NotImplementedError(f"{type(self).__name__} is not addressed storage")

    def commit_into(self, pairs: Sequence[tuple[Reservation, Any]]) -> None:
        """``commit`` of each written reservation into its place, releasing what the place held."""
        raise NotImplementedError(f"{type(self).__name__} is not addressed storage")

    def read(self, place: Any, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """``get`` of the entry at ``place``."""
        raise NotImplementedError(f"{type(self).__name__} is not addressed storage")

    def free(self, place: Any) -> bool:
        """``remove`` of the entry at ``place``."""
        raise NotImplementedError(f"{type(self).__name__} is not addressed storage")

    def stored_nbytes(self, place: Any) -> int | None:
        """``entry_nbytes`` of the entry at ``place``."""
        raise NotImplementedError(f"{type(self).__name__} is not addressed storage")

    def value_nbytes(self, place: Any) -> int | None:
        """Bytes of the tensor stored at ``place`` as its caller gave it (before any codec), without reading it."""
        raise NotImplementedError(f"{type(self).__name__} is not addressed storage")

    # -- reads --------------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The tensor bit-exact (or within the codec's bound), as a new tensor owned by the caller, or
        copied into ``out`` (same shape/dtype) when given. None on a miss or a corrupt entry (counted)."""

    @abstractmethod
    def contains(self, key: CacheKey) -> bool: ...

    @abstractmethod
    def remove(self, key: CacheKey) -> bool: ...

    def discard(self, key: CacheKey) -> bool:
        """``remove``, leaving any wait for durability (a directory fsync) to the next ``sync``: the cache
        discards under its metadata lock and syncs after releasing it."""
        return self.remove(key)

    def sync(self) -> None:  # noqa: B027 - optional hook
        """Make every ``discard`` made before this call durable."""

    # -- batched forms (override where one call can do better, e.g. across processes) -------------
    def put_many(self, items: Sequence[tuple[CacheKey, torch.Tensor]]) -> list[bool]:
        return [self.put(k, t) for k, t in items]

    def get_many(self, keys: Sequence[CacheKey]) -> list[torch.Tensor | None]:
        return [self.get(k) for k in keys]

    def contains_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def remove_many(self, keys: Iterable[CacheKey]) -> list[bool]:
        return [self.remove(k) for k in keys]

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """At least: name, capacity_bytes, used_bytes, entries, plus tier-specific counters."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files stay on disk)."""
