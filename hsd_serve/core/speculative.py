"""Speculative sampling on target ids: the verification rule of SD and TLI.

Rule.  Draft tokens ``t_1..t_k`` were sampled position by position from proposal rows
``q_1..q_k`` (``[k, V_target]``; for TLI the drafter's distribution restricted to the vocabulary
intersection and renormalised, ``q'(x) = q(x)·1[x∈I] / q(I)``; for SD the drafter's distribution
itself).  The target scores ``x + t`` in one forward, giving processed rows ``p_1..p_{k+1}``.
For ``i = 1..k``: accept ``t_i`` with probability ``min(1, p_i(t_i) / q_i(t_i))``; at the first
rejection emit a sample from the residual ``norm(max(p_i − q_i, 0))`` and stop; if all ``k`` are
accepted emit a bonus sample from ``p_{k+1}``.

Why it is lossless.  For one position, P(emit x) = q(x)·min(1, p(x)/q(x)) + P(reject)·r(x) with
``r = max(p − q, 0) / Σ max(p − q, 0)`` and ``P(reject) = Σ max(p − q, 0)``; the first term is
``min(p(x), q(x))`` and the second ``max(p(x) − q(x), 0)``, which add to ``p(x)``.  Later
positions are conditioned on the emitted prefix, so the argument chains.  It holds for *any*
proposal rows as long as the verifier uses exactly the rows the drafts were sampled from, which is
why TLI may send a truncated, renormalised ``q'`` (the engine samples from what it sends).
Greedy (``p`` one-hot) reduces to "accept while ``t_i == argmax p_i``, then emit the argmax".

Randomness: the accept uniform for position ``n`` comes from the ``ACCEPT`` stream, residual draws
from ``RESIDUAL``, the bonus is the target's own ``TARGET`` sample (see ``sampling``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from hsd_serve.core.sampling import (ACCEPT, RESIDUAL, SamplingParams, gumbel_sample,
                                     target_choice, uniform)


@dataclass
class VerifyResult:
    """Outcome of one verification: ``accepted`` draft tokens, then one corrected or bonus token."""

    accepted: int
    tokens: list[int] = field(default_factory=list)  # emitted target ids (accepted + 1)


def accept_probability(p_row: torch.Tensor, q_row: torch.Tensor, token: int) -> float:
    """``min(1, p(t) / q(t))`` for a draft token ``t`` sampled from ``q``."""
    q_t = float(q_row[token])
    if q_t <= 0.0:
        raise ValueError(f"draft token {token} has zero proposal probability")
    return min(1.0, float(p_row[token]) / q_t)


def residual(p_row: torch.Tensor, q_row: torch.Tensor) -> torch.Tensor:
    """``norm(max(p − q, 0))`` (``[V]``); falls back to ``p`` when the mass is zero (then a
    rejection has probability zero and the row is never used)."""
    r = torch.clamp(p_row - q_row, min=0.0)
    mass = r.sum()
    if float(mass) <= 0.0:
        return p_row / p_row.sum()
    return r / mass


def verify_speculative(draft: Sequence[int], q: torch.Tensor, p: torch.Tensor,
                       params: SamplingParams, start: int) -> VerifyResult:
    """Verify ``draft`` (target ids) proposed from ``q`` ([k, V_target]) against ``p``
    ([k+1, V_target], the target's processed rows); ``start`` is the absolute output position
    of ``draft[0]``."""
    k = len(draft)
    if p.shape[0] != k + 1:
        raise ValueError(f"need k+1={k + 1} target rows, got {p.shape[0]}")
    out: list[int] = []
    if params.greedy:
        choice = torch.argmax(p, dim=-1).tolist()
        for i, t in enumerate(draft):
            if t != choice[i]:
                return VerifyResult(i, out + [choice[i]])
            out.append(t)
        return VerifyResult(k, out + [choice[k]])
    for i, t in enumerate(draft):
        pos = start + i
        if uniform(params.seed, pos, ACCEPT) < accept_probability(p[i], q[i], t):
            out.append(t)
            continue
        return VerifyResult(i, out + [gumbel_sample(residual(p[i], q[i]), params.seed, pos,
                                                    RESIDUAL)])
    return VerifyResult(k, out + [target_choice(p[k], params, start + k)])


def truncate_proposal(q: torch.Tensor, top_m: int) -> torch.Tensor:
    """Keep the ``top_m`` largest entries of a proposal row and renormalise (0 = keep all).

    Drafts must then be *sampled from the returned row* and the verifier given that same row;
    this keeps messages small (``top_m`` ids and probabilities) without losing exactness.
    """
    if top_m <= 0 or top_m >= q.shape[-1]:
        return q
    vals, idx = torch.topk(q, top_m)
    out = torch.zeros_like(q)
    out[idx] = vals
    return out / out.sum()
