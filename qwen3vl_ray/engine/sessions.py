"""Chat sessions: a multi-turn chat keeps its KV (prompt *and* answer) between turns.

After each turn the session's KV goes to the store as full chunks (shared, content-keyed, like any
prompt's) plus one partial "tail" entry for the last < chunk_tokens tokens. The next turn's prompt starts
with the same tokens, so it reloads all of it, tail included, and computes only the new message. Under
device pressure the budget demotes idle sessions' entries first; they come back from host or disk.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from transformers import DynamicCache

from qwen3vl_ray.engine.prefix_kv import LoadedPrefix, PrefixKV
from qwen3vl_ray.keys import CacheKey, ImageSpan

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Session:
    """What one chat has stored: the tokens whose KV exists, their chunk keys and the tail entry."""

    session_id: str
    token_ids: list[int] = field(default_factory=list)
    spans: list[ImageSpan] = field(default_factory=list)
    chunk_keys: list[CacheKey] = field(default_factory=list)
    tail_key: CacheKey | None = None
    last_used: float = 0.0
    turns: int = 0

    @property
    def keys(self) -> list[CacheKey]:
        return self.chunk_keys + ([self.tail_key] if self.tail_key is not None else [])


class Sessions:
    """The session table of one engine (metadata side; bytes live in the store)."""

    def __init__(self, store: Any, prefix: PrefixKV, idle_s: float):
        self.store = store
        self.prefix = prefix
        self.idle_s = idle_s
        self._sessions: dict[str, Session] = {}
        self._running: dict[str, int] = {}  # session id -> turns of it running now (never idle meanwhile)

    @contextmanager
    def running(self, session_id: str | None) -> Iterator[None]:
        """Mark ``session_id``'s turn as running (a None id marks nothing): its entries are no idle session's
        while the turn makes room for itself, loads and stores, however long ago its last turn ended."""
        if session_id is None:
            yield
            return
        self._running[session_id] = self._running.get(session_id, 0) + 1
        try:
            yield
        finally:
            left = self._running.pop(session_id) - 1
            if left:
                self._running[session_id] = left

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def idle_order(self) -> list[str]:
        """Session ids idle for at least ``idle_s`` and not running a turn now, most idle first."""
        now = time.monotonic()
        idle = [s for s in self._sessions.values()
                if now - s.last_used >= self.idle_s and s.session_id not in self._running]
        return [s.session_id for s in sorted(idle, key=lambda s: s.last_used)]

    def idle_keys(self) -> Iterator[CacheKey]:
        """The keys of idle sessions' entries, most idle session first and each session's from its tail (what
        device pressure moves first; a chain shrinks from its end). A chunk another, active session also holds
        (a shared system prompt) is not idle: it stays for that session; one that only idle sessions share comes
        with the last of them, after all their later chunks."""
        idle = self.idle_order()
        waiting = set(idle)
        active = {k for s in self._sessions.values() if s.session_id not in waiting for k in s.keys}
        # a chunk several idle sessions share (a system prompt) goes with the last of them, after every one's own
        # later chunks: taken with the first, it would leave the others' tails on the device without their head
        holders = Counter(k for session_id in idle for k in set(self._sessions[session_id].keys))
        for session_id in idle:
            keys = self._sessions[session_id].keys
            for key in set(keys):
                holders[key] -= 1
            for key in reversed(keys):
                if key not in active and holders[key] == 0:
                    holders[key] = -1  # yielded (a key twice in one session: once)
                    yield key

    def resumable(self, session_id: str) -> bool:
        """True if every entry of the session is still in some tier (its next turn recomputes nothing old)."""
        s = self._sessions.get(session_id)
        return s is not None and all(self.store.contains(k) for k in s.keys)

    def missing(self, session_id: str) -> list[tuple[CacheKey, CacheKey | None]]:
        """``(key, parent)`` of the session's entries the store lacks, in chain order (full chunks, then the
        tail): what a caller with a tier below the store (the Ray worker's node agent) brings back before
        the session's next turn."""
        s = self._sessions.get(session_id)
        if s is None:
            return []
        keys = s.keys
        return [(k, keys[i - 1] if i else None) for i, k in enumerate(keys) if not self.store.contains(k)]

    def resume(self, session_id: str, prompt_ids: Sequence[int], spans: Sequence[ImageSpan], max_tokens: int,
               capacity_tokens: int = 0) -> LoadedPrefix | None:
        """KV of the longest prefix this prompt shares token-for-token with the session's stored tokens.

        Unlike plain prefix reuse this is not limited to whole chunks: a chunk (or the tail) whose first
        tokens match is used up to the first differing token. None if nothing is shared or it is gone."""
        s = self._sessions.get(session_id)
        if s is None:
            return None
        common = _common_prefix(s.token_ids, prompt_ids)
        # Images in the shared region must be the same images at the same places.
        mine = [sp for sp in s.spans if sp.start < common]
        theirs = [sp for sp in spans if sp.start < common]
        if mine != theirs:
            common = min(sp.start for sp in mine + theirs)
        use = min(common, max_tokens)
        if use <= 0:
            return None
        # the tail (partial chunk) is read only when every full chunk was there and ``use`` reaches past them
        return self.prefix.read(s.chunk_keys, s.tail_key, use, capacity_tokens)

    def save(self, session_id: str, cache: DynamicCache, token_ids: Sequence[int], spans: Sequence[ImageSpan]) -> int:
        """Store the session's KV after a turn (``token_ids``: the tokens ``cache`` holds). Returns chunks stored."""
        token_ids = list(token_ids)
        assert cache.get_seq_length() == len(token_ids), (cache.get_seq_length(), len(token_ids))
        c = self.prefix.chunk_tokens
        keys = self.prefix.keys(token_ids, spans)
        stored = self.prefix.store_new(cache, keys)
        old = self._sessions.get(session_id)
        tail_key = None
        tail_key = self.prefix.tail_key(token_ids, spans, keys)
        if tail_key is not None:
            parent = keys[-1] if keys else None
            if self.prefix.store_tail(cache, tail_key, len(keys) * c, len(token_ids), parent):
                stored += 1
            elif not self.store.contains(tail_key):
                logger.info("session %s: no room for its %d-token tail", session_id, len(token_ids) - len(keys) * c)
                tail_key = None
        if old is not None and old.tail_key is not None and old.tail_key != tail_key:
            self.store.remove(old.tail_key)  # superseded by the new turn's tail
        self._sessions[session_id] = Session(
            session_id, token_ids, list(spans), keys, tail_key, time.monotonic(), (old.turns if old else 0) + 1
        )
        return stored

    def close(self, session_id: str) -> None:
        """Forget a session and drop its tail (its full chunks stay as shared prefix entries)."""
        s = self._sessions.pop(session_id, None)
        if s is not None and s.tail_key is not None:
            self.store.remove(s.tail_key)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    ta = torch.as_tensor(list(a[:n]))
    tb = torch.as_tensor(list(b[:n]))
    diff = torch.nonzero(ta != tb)
    return int(diff[0]) if len(diff) else n
