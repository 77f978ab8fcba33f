"""An in-process object store (the tiers' ``LocalObjectStore``) whose puts can be made to fail."""

from __future__ import annotations

from actors.object_store_tier import LocalObjectStore


class FullStore(LocalObjectStore):
    """A ``LocalObjectStore`` whose puts fail while ``full`` is set, as Ray's do with ObjectStoreFullError."""

    full = False

    def put(self, value):
        if self.full:
            raise RuntimeError("ObjectStoreFullError: the node's object store is full")
        return super().put(value)
