"""Slow, obviously-right SLRS quantities by brute force (the test oracle for ``slrs.py``).

Nothing here is clever and nothing is shared with ``slrs.py``:

* ``brute_force_psi`` enumerates **every** drafter token sequence up to depth ``L`` = the longest
  allowed target string (a sequence also ends at a terminal token).  ``L`` non-terminal tokens carry
  at least ``L`` bytes, which fixes whether each target string (at most ``L`` bytes) is a prefix
  of the stream; so the longest match of every (possibly infinite) continuation is already known,
  and no stopping rule is used.  Each sequence's probability is the product of the oracle's rows;
  its outcome is found by scanning every target id.
* ``mixture`` forms ψ'(t) = ψ(t) + ψ(∅)·p(t).
* ``round_output_distribution`` is the textbook one-round law
  ``Σ_u ψ'(u)·a(u)·[u = t] + P(reject)·residual(t)``.

Only for toy vocabularies: the cost is ``|V_D|^L`` oracle rows.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

__all__ = ["brute_force_psi", "mixture", "round_output_distribution"]


def _terminal_ids(drafter_vocab, eos_ids: Iterable[int]) -> set[int]:
    tb = list(drafter_vocab.token_bytes)
    out = set(int(i) for i in eos_ids) | set(getattr(drafter_vocab, "special_ids", ()))
    out |= {i for i, b in enumerate(tb) if not b}
    return out


def _allowed_targets(target_vocab, max_target_bytes: int | None) -> list[tuple[int, bytes]]:
    tb = list(target_vocab.token_bytes)
    special = set(getattr(target_vocab, "special_ids", ()))
    out = []
    for i, b in enumerate(tb):
        if not b or i in special:
            continue
        if max_target_bytes is not None and len(b) > max_target_bytes:
            continue
        if any(bytes(tb[j]) == bytes(b) and j not in special for j in range(i)):
            continue  # not canonical: a lower id has the same string
        out.append((i, bytes(b)))
    return out


def _outcome(stream: bytes, targets: Sequence[tuple[int, bytes]]) -> int | None:
    best: tuple[int, int] | None = None  # (length, id)
    for i, s in targets:
        if stream.startswith(s) and (best is None or len(s) > best[0]):
            best = (len(s), i)
    return None if best is None else best[1]


def brute_force_psi(oracle, drafter_vocab, target_vocab, *, drafter_eos_ids: Iterable[int] = (),
                    max_target_bytes: int | None = None) -> dict[int | None, float]:
    """{target id or None (no match): probability that the longest match is it} by enumeration."""
    tb = [bytes(b) for b in drafter_vocab.token_bytes]
    terminal = _terminal_ids(drafter_vocab, drafter_eos_ids)
    targets = _allowed_targets(target_vocab, max_target_bytes)
    depth = max((len(s) for _, s in targets), default=0)
    out: dict[int | None, float] = {}

    def row(path: tuple[int, ...]) -> list[float]:
        r = oracle.path_dists(path)[-1].to(torch.float64)
        r = r / r.sum()
        return r.tolist()

    def visit(path: tuple[int, ...], stream: bytes, prob: float) -> None:
        if prob == 0.0:
            return
        if len(path) == depth:
            o = _outcome(stream, targets)
            out[o] = out.get(o, 0.0) + prob
            return
        for d, q in enumerate(row(path)):
            if q == 0.0:
                continue
            if d >= len(tb) or d in terminal:
                o = _outcome(stream, targets)
                out[o] = out.get(o, 0.0) + prob * q
            else:
                visit(path + (d,), stream + tb[d], prob * q)

    visit((), b"", 1.0)
    return out


def mixture(psi: dict[int | None, float], p: torch.Tensor, n_target: int) -> torch.Tensor:
    """ψ'(t) = ψ(t) + ψ(∅)·p(t) over ``max(len(p), n_target)`` ids."""
    p = p.to(torch.float64) / p.to(torch.float64).sum()
    n = max(p.shape[0], n_target)
    out = torch.zeros(n, dtype=torch.float64)
    for t, v in psi.items():
        if t is not None:
            out[t] += v
    out[: p.shape[0]] += psi.get(None, 0.0) * p
    return out


def round_output_distribution(
        psi_prime: torch.Tensor, p: torch.Tensor, *,
        accept_prob: Callable[[float, float], float] | None = None,
        residual_keep: Callable[[float, float], float] | None = None) -> torch.Tensor:
    """Exact law of one verification round with proposal ψ' and target ``p``.

    ``accept_prob(p_t, psi_t)`` defaults to ``min(1, p/ψ')``; ``residual_keep(p_t, psi_t)`` is
    the probability a residual try keeps its draw ``t ~ p``, default ``(1 − ψ'/p)⁺`` (so the
    residual is ``p·keep / Σ p·keep = norm((p − ψ')⁺)``).
    """
    if accept_prob is None:
        def accept_prob(a: float, b: float) -> float:
            return 0.0 if a <= 0 else (1.0 if b <= a else a / b)
    if residual_keep is None:
        def residual_keep(a: float, b: float) -> float:
            return 0.0 if a <= 0 or b >= a else 1.0 - b / a
    p = p.to(torch.float64) / p.to(torch.float64).sum()
    n = psi_prime.shape[0]
    pp = torch.zeros(n, dtype=torch.float64)
    pp[: p.shape[0]] = p
    out = torch.zeros(n, dtype=torch.float64)
    reject = 0.0
    keep = torch.zeros(n, dtype=torch.float64)
    for t in range(n):
        a = accept_prob(float(pp[t]), float(psi_prime[t]))
        out[t] += float(psi_prime[t]) * a
        reject += float(psi_prime[t]) * (1.0 - a)
        keep[t] = float(pp[t]) * residual_keep(float(pp[t]), float(psi_prime[t]))
    if float(keep.sum()) > 0:
        out += reject * keep / keep.sum()
    return out
