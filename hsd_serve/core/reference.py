"""Slow, obviously-right reference implementations used as test oracles.

Plain Python floats and explicit enumeration, no vectorisation, no shortcuts.  A "model" here is
any function ``context (tuple of ids) -> list of probabilities``.  The fast rules in
``speculative``/``exact_match``/``slrs`` are tested against these.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

Dist = list[float]
Model = Callable[[tuple[int, ...]], Sequence[float]]


def ref_accept(p: Sequence[float], q: Sequence[float], t: int) -> float:
    return 1.0 if p[t] >= q[t] else p[t] / q[t]


def ref_residual(p: Sequence[float], q: Sequence[float]) -> Dist:
    r = [max(a - b, 0.0) for a, b in zip(p, q)]
    s = sum(r)
    return [x / s for x in r] if s > 0 else [x / sum(p) for x in p]


def ref_speculative_round(target: Model, proposal: Model, ctx: tuple[int, ...], k: int,
                          accept=ref_accept, resid=ref_residual) -> dict[tuple[int, ...], float]:
    """Exact distribution of the tokens emitted by one speculative round of lookahead ``k``.

    ``proposal(ctx)`` is the distribution each draft token is sampled from (over target ids).
    ``accept``/``resid`` default to the reference rule; tests pass the fast ones in to enumerate
    the fast path exactly.
    """
    out: dict[tuple[int, ...], float] = {}
    vocab = len(target(ctx))
    for draft in itertools.product(range(vocab), repeat=k):
        prob_draft = 1.0
        c = ctx
        for t in draft:
            prob_draft *= proposal(c)[t]
            c = c + (t,)
        if prob_draft == 0.0:
            continue
        # walk the verification
        weight = prob_draft
        c = ctx
        emitted: tuple[int, ...] = ()
        for t in draft:
            p, q = list(target(c)), list(proposal(c))
            a = accept(p, q, t)
            if a < 1.0:
                r = resid(p, q)
                for x, rx in enumerate(r):
                    if rx > 0:
                        key = emitted + (x,)
                        out[key] = out.get(key, 0.0) + weight * (1.0 - a) * rx
            weight *= a
            if weight == 0.0:
                break
            emitted += (t,)
            c = c + (t,)
        else:
            p = list(target(c))
            for x, px in enumerate(p):
                if px > 0:
                    key = emitted + (x,)
                    out[key] = out.get(key, 0.0) + weight * px
    return out


def ref_generate_dist(round_fn: Callable[[tuple[int, ...]], dict[tuple[int, ...], float]],
                      ctx: tuple[int, ...], length: int) -> dict[tuple[int, ...], float]:
    """Distribution of the first ``length`` emitted tokens when rounds are chained."""
    result: dict[tuple[int, ...], float] = {}

    def walk(c: tuple[int, ...], prefix: tuple[int, ...], weight: float) -> None:
        if len(prefix) >= length:
            key = prefix[:length]
            result[key] = result.get(key, 0.0) + weight
            return
        for emitted, w in round_fn(c).items():
            walk(c + emitted, prefix + emitted, weight * w)

    walk(ctx, (), 1.0)
    return result


def ref_target_joint(target: Model, ctx: tuple[int, ...], length: int) -> dict[tuple[int, ...], float]:
    """What the target alone emits: the product of its conditionals."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, w in out.items():
            for x, px in enumerate(target(ctx + seq)):
                if px > 0:
                    nxt[seq + (x,)] = nxt.get(seq + (x,), 0.0) + w * px
        out = nxt
    return out


def ref_exact_match(candidates: Sequence[int], choices: Sequence[int]) -> list[int]:
    """SLEM: the emitted tokens are the target's own choices up to and including the first
    position where the candidate differs (or the bonus)."""
    emitted = []
    for j, c in enumerate(choices):
        emitted.append(c)
        if j >= len(candidates) or candidates[j] != c:
            break
    return emitted
