"""The common prefix of two sequences (ids, bytes): where a cache, a chain of drafted ids or a
drafter's text stops agreeing with what was committed."""

from __future__ import annotations

from typing import Optional, Sequence


def common_prefix_len(a: Sequence, b: Sequence, start: int = 0,
                      limit: Optional[int] = None) -> int:
    """How many leading items ``a`` and ``b`` share, looking no further than ``limit`` items;
    the first ``start`` are taken as equal (known by the caller) and not compared again."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    i = min(max(start, 0), n)
    while i < n and a[i] == b[i]:
        i += 1
    return i
