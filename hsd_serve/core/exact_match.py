"""SLEM verification: string-level exact match.

Rule.  The drafter's text, re-encoded by the target tokenizer after a window of known text, gives
candidate target ids ``t_1..t_m`` (the engine builds them; this module never looks at text).  One
target forward over ``x + t`` gives processed rows ``p_1..p_{m+1}``.  The target's *own choice* at
absolute position ``n`` is ``c_n = target_choice(p, n)``: the argmax when greedy, otherwise the
Gumbel-max sample keyed by ``(seed, n)``.  Emit the longest prefix with ``t_j == c_{start+j}``,
then ``c`` at the first mismatch (or the bonus ``c`` after ``t_m``).

Why it is lossless.  Every emitted token is ``c_n`` computed from the target's processed
distribution given exactly the emitted prefix (a candidate is only kept when it equals ``c_n``, so
the next row is conditioned on the right prefix).  That is precisely what AR emits with the same
seed, whatever the candidates were: the drafter and both tokenizers only decide how many target
choices are checked per forward, never which token is emitted.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hsd_serve.core.sampling import SamplingParams, target_choice
from hsd_serve.core.speculative import VerifyResult


def verify_exact_match(candidates: Sequence[int], p: torch.Tensor, params: SamplingParams,
                       start: int) -> VerifyResult:
    """``p`` is ``[m+1, V_target]``; ``start`` is the absolute position of ``candidates[0]``."""
    m = len(candidates)
    if p.shape[0] != m + 1:
        raise ValueError(f"need m+1={m + 1} target rows, got {p.shape[0]}")
    if params.greedy:
        choices = torch.argmax(p, dim=-1).tolist()
        for j, t in enumerate(candidates):
            if t != choices[j]:
                return VerifyResult(j, list(candidates[:j]) + [choices[j]])
        return VerifyResult(m, list(candidates) + [choices[m]])
    for j, t in enumerate(candidates):
        c = target_choice(p[j], params, start + j)
        if t != c:
            return VerifyResult(j, list(candidates[:j]) + [c])
    return VerifyResult(m, list(candidates) + [target_choice(p[m], params, start + m)])
