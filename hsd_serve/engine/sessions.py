"""Per-request state on a worker, bounded, least recently used first out.

Both workers keep one entry per request (the target: its KV-cache ``Session``; the drafter: its
``DrafterState``).  Bounds: at most ``max_sessions`` entries and (when set) ``max_cached_tokens``
tokens in all their caches together.  Over either bound the least recently used *other* entries
are evicted; their requests rebuild their caches on their next call (a prefill, never a wrong
token).  An entry being served is never evicted during its own call, so one request longer than
the token cap still runs (the cap then holds that one cache only).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Iterator, Optional, TypeVar

S = TypeVar("S")


class SessionTable(Generic[S]):
    """``rid -> state`` in least-recently-used order; ``size(state)`` counts its cached tokens
    and ``free(state)`` releases its cache."""

    def __init__(self, size: Callable[[S], int], free: Callable[[S], None], *,
                 max_sessions: int = 256, max_cached_tokens: Optional[int] = None):
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if max_cached_tokens is not None and max_cached_tokens < 1:
            raise ValueError("max_cached_tokens must be >= 1 (or None for no cap)")
        self._size = size
        self._free = free
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self._items: "OrderedDict[str, S]" = OrderedDict()
        self.evictions = 0  # entries evicted by either bound

    # ---- mapping view (read-only) ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __contains__(self, rid: object) -> bool:
        return rid in self._items

    def __getitem__(self, rid: str) -> S:
        return self._items[rid]

    def get(self, rid: str) -> Optional[S]:
        return self._items.get(rid)

    def values(self):
        return self._items.values()

    def cached_tokens(self) -> int:
        return sum(self._size(s) for s in self._items.values())

    # ---- changes ---------------------------------------------------------------------------------
    def touch(self, rid: str) -> Optional[S]:
        """The entry for ``rid``, now the most recently used (``None`` when absent)."""
        s = self._items.get(rid)
        if s is not None:
            self._items.move_to_end(rid)
        return s

    def add(self, rid: str, state: S) -> S:
        """Insert ``state`` for ``rid`` (freeing an older one), evicting the least recently used
        entries beyond ``max_sessions``."""
        self.pop(rid)
        while len(self._items) >= self.max_sessions:
            _, old = self._items.popitem(last=False)
            self._free(old)
            self.evictions += 1
        self._items[rid] = state
        return state

    def pop(self, rid: str) -> bool:
        """Free and forget ``rid``; whether it was there."""
        s = self._items.pop(rid, None)
        if s is not None:
            self._free(s)
        return s is not None

    def make_room(self, need: dict[str, int]) -> None:
        """Evict least recently used entries not in ``need`` until the caches, with each entry of
        ``need`` counted at its given token count, fit ``max_cached_tokens``."""
        if self.max_cached_tokens is None:
            return
        others = sum(self._size(s) for r, s in self._items.items() if r not in need)
        total_need = sum(need.values())
        for rid in list(self._items):
            if others + total_need <= self.max_cached_tokens:
                break
            if rid in need:
                continue
            old = self._items.pop(rid)
            others -= self._size(old)
            self._free(old)
            self.evictions += 1


class SessionBounds:
    """The bounds and counters both workers expose, read from their ``sessions`` table."""

    sessions: SessionTable

    @property
    def evictions(self) -> int:
        """Sessions evicted (session cap or token cap)."""
        return self.sessions.evictions

    @property
    def max_sessions(self) -> int:
        return self.sessions.max_sessions

    @property
    def max_cached_tokens(self) -> Optional[int]:
        return self.sessions.max_cached_tokens

    def cached_tokens(self) -> int:
        """Tokens held in all sessions' KV caches."""
        return self.sessions.cached_tokens()
