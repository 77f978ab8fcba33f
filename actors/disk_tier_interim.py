"""A file-per-entry disk tier, used by the agents until the core ``qwen3vl_ray.tiers`` disk tier lands.

Each entry is one file named ``key_hex(key)`` holding a codec payload (self-describing, checksummed: a torn or
corrupt file is a miss, never wrong data). Stores write a temp file, fsync it, rename, fsync the directory, so
a crash leaves either the old entry or the new one. The index is rebuilt from the directory on open, so a
restarted agent serves its disk entries again (Mooncake #1196).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterator

import torch

from qwen3vl_ray.codecs.base import decode, make_codec
from qwen3vl_ray.errors import CapacityError, CodecError, ConfigError
from qwen3vl_ray.keys import CacheKey, key_from_hex, key_hex, validate_key
from qwen3vl_ray.tiers.base import PreparedStore, Tier

logger = logging.getLogger(__name__)


class FileDiskTier(Tier):
    name = "disk"

    def __init__(self, path: str, capacity_bytes: int, codec: str = "none", fsync: bool = True) -> None:
        if capacity_bytes <= 0:
            raise ConfigError(f"disk tier capacity_bytes must be > 0, got {capacity_bytes}")
        self.path, self.capacity_bytes, self.fsync = path, capacity_bytes, fsync
        self.codec = make_codec(codec)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        self._sizes: dict[CacheKey, int] = {}
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "corrupt": 0, "stores": 0}
        for name in os.listdir(path):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(path, name))  # a store that never completed
                continue
            try:
                key = key_from_hex(name)
            except ValueError:
                continue  # not ours
            self._sizes[key] = os.path.getsize(os.path.join(path, name))
        self._used = sum(self._sizes.values())

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> Iterator[CacheKey]:
        return iter(list(self._sizes))

    def entry_nbytes(self, key: CacheKey) -> int | None:
        return self._sizes.get(key)

    def _file(self, key: CacheKey) -> str:
        return os.path.join(self.path, key_hex(key))

    def prepare_store(self, key: CacheKey, tensor: torch.Tensor) -> PreparedStore:
        payload = self.codec.encode(tensor)
        if len(payload) > self.capacity_bytes:
            raise CapacityError(f"entry of {len(payload)} bytes exceeds the disk tier's {self.capacity_bytes}-byte budget")
        return PreparedStore(validate_key(key), len(payload), payload)

    def complete_store(self, prepared: PreparedStore) -> bool:
        with self._lock:
            old = self._sizes.get(prepared.key, 0)
            if self._used - old + prepared.nbytes > self.capacity_bytes:
                return False
            final = self._file(prepared.key)
            tmp = final + ".tmp"
            with open(tmp, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as f:
                f.write(prepared.payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            if self.fsync:
                dfd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self._sizes[prepared.key] = prepared.nbytes
            self._used += prepared.nbytes - old
            self._counts["stores"] += 1
            return True

    def get(self, key: CacheKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        if key not in self._sizes:
            self._counts["misses"] += 1
            return None
        try:
            with open(self._file(key), "rb") as f:
                t = decode(f.read())
        except (OSError, CodecError):
            logger.warning("disk tier: unreadable entry %s dropped", key_hex(key), exc_info=True)
            self._counts["corrupt"] += 1
            self.remove(key)
            return None
        self._counts["hits"] += 1
        if out is not None:
            out.copy_(t)
            return out
        return t

    def contains(self, key: CacheKey) -> bool:
        return key in self._sizes

    def remove(self, key: CacheKey) -> bool:
        with self._lock:
            n = self._sizes.pop(key, None)
            if n is None:
                return False
            self._used -= n
            try:
                os.unlink(self._file(key))
            except FileNotFoundError:
                pass
            return True

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "capacity_bytes": self.capacity_bytes, "used_bytes": self._used,
                "entries": len(self._sizes), "path": self.path, **self._counts}
