"""Benchmark arithmetic: the ideal speedup of DESIGN.md §8, acceptance estimates, summaries."""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence


def rotated(seq: Sequence, i: int) -> list:
    """``seq`` started at item ``i`` (modulo its length): pass or prompt ``i``'s order, so that no
    configuration always runs first or after the same neighbour."""
    i %= len(seq)
    return list(seq[i:]) + list(seq[:i])


def ideal_speedup(alpha: float, k: int, c: float) -> float:
    """``S_ideal = (1 − α^(k+1)) / ((1 − α)(k·c + 1))``: expected tokens per round over the cost
    of a round (``k`` drafter steps at ``c`` target steps each, plus one target step)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if k < 0 or c < 0:
        raise ValueError("k and c must be >= 0")
    tokens = (k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return tokens / (k * c + 1.0)


def conditional_alpha(accepted_per_position: Sequence[int],
                      drafted_per_position: Sequence[int]) -> Optional[float]:
    """Per-token acceptance probability α: acceptances over candidates the target got to test.

    A round tests candidate ``i`` only when candidates ``0..i-1`` were accepted; the number of
    rounds that reached ``i`` is taken as ``min(drafted[i], accepted[i-1])`` (exact when every
    round drafts the same number of candidates, an upper bound otherwise).  This is the
    maximum-likelihood α of the i.i.d. model behind ``S_ideal``; ``accepted / drafted`` is lower
    because it also counts candidates after the first rejection.
    """
    acc = list(accepted_per_position)
    dr = list(drafted_per_position)
    if not dr or dr[0] == 0:
        return None
    reached = [dr[0]] + [min(dr[i], acc[i - 1]) for i in range(1, len(dr))]
    tested = sum(reached)
    return sum(acc) / tested if tested else None


def alpha_from_tokens_per_round(tau: float, k: int) -> Optional[float]:
    """α with ``(1 − α^(k+1)) / (1 − α) = tau`` (bisection), for a method with no per-position
    counts (transformers' baseline); ``None`` when ``tau`` is outside ``[1, k+1]``."""
    if k <= 0 or not 1.0 <= tau <= k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        val = (k + 1) if mid >= 1 else (1 - mid ** (k + 1)) / (1 - mid)
        lo, hi = (mid, hi) if val < tau else (lo, mid)
    return (lo + hi) / 2


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (``q`` in [0, 100]); ``None`` for no values."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    pos = (len(vals) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def geomean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in vals)) if vals else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def rnd(x, digits: int = 4):
    """Round floats (recursively in lists/dicts) for JSON output."""
    if isinstance(x, float):
        return round(x, digits) if math.isfinite(x) else None
    if isinstance(x, list):
        return [rnd(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: rnd(v, digits) for k, v in x.items()}
    return x
