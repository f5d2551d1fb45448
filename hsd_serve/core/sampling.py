"""Sampling parameters, the target's processed distribution, and position-keyed randomness.

Losslessness is defined against the *processed* distribution ``p``: the target's logits after
temperature, top-k and top-p.  Temperature 0 means greedy: ``p`` is one-hot on the first argmax.

Seeding (DESIGN.md §3).  Every random draw is keyed by ``(seed, absolute output position, stream,
salt)`` and nothing else, using a counter-based construction (a fresh ``torch.Generator`` seeded
with a splitmix64 hash of the key).  Different decisions use different streams (or salts), so they
are independent.

* ``TARGET`` — the target's own sample at position ``n``: a Gumbel-max draw keyed by
  ``(seed, n)`` only.  AR, SLEM and every bonus or target-only token use it, so AR and SLEM emit
  the same tokens for the same seed whatever the drafter, the lookahead or the number of rounds.
* ``DRAFT`` — a drafter's sample (SD, TLI) at position ``n`` is keyed by ``(seed, n, attempt)``,
  ``attempt`` being the coordinator's count of draft calls in this request (unique per call, sent
  over the wire).  SLRS keys its path draws by ``(seed, n, DRAFT, salt=j)`` (see ``core.slrs``).
* ``ACCEPT`` / ``RESIDUAL`` — the accept test and the residual draw at position ``n``.

Independence: why this is exact over many rounds.  Speculative sampling at a position is exact
when, given everything that decided the proposal row ``q`` (and whether the position is drafted
at all), the draft is distributed as ``q`` and the accept and residual uniforms are fresh.  So a
uniform may be used for a decision only if nothing that was already decided depended on it:

* ``DRAFT``: a rejection at position ``j`` discards the drafts after ``j``, and position ``j+1`` is
  drafted again next round.  A discarded draft can shape what the drafter holds next
  (``DrafterText`` keeps drafted tokens whose bytes prefix the committed text: draft ``" the"``,
  target emits ``" there"``), how many tokens it drafts (TLI stops where ``q(I) = 0``; adaptive
  lookahead) or a replica's cache (a timed-out call).  If the redraw reused the key of the
  discarded draft, the new row would depend on the very uniforms that pick the new draft, and the
  draft would no longer be distributed as its row (measured: P(b | "ab") 0.26 against 0.30 on the
  toy pair of ``tests/integration/test_multiround_gof.py``).  Keying by attempt makes every draft
  draw fresh: nothing before the call has seen it, so given the row it is an exact sample of it.
  Audit of the other methods: SD's row depends on the committed ids only (its redraws were
  already fresh; it is keyed by attempt all the same).  SLRS runs one step per position, only for
  the next uncommitted position, and that position is committed after it whatever happens (a
  lost reply gives a target-only token from ``TARGET``, independent of the step's draws), so its
  ``(n, DRAFT, salt=j)`` keys are never reused.  SLEM's drafts are greedy and only the target's
  ``TARGET`` draws decide its output.
* ``ACCEPT`` / ``RESIDUAL`` at ``n`` decide position ``n`` once: a round reaches position ``n``
  only when every earlier draft was accepted, and then ``n`` is committed whatever the outcome.
  Uniforms at positions a round did not reach were never used.  A verify whose reply was lost
  (replica gone) decided nothing the coordinator saw, so redoing it with the same keys is fresh.
* ``TARGET`` at ``n`` is used only for the token committed at ``n`` (AR, bonus, fallback, SLEM:
  where SLEM's discarded choices at later positions are recomputed, they are the same function
  of the same committed prefix and key, hence the same token — the output equals AR's).

What is exact and what is exact up to floating point.  Given the processed rows, every rule is
exact: greedy output is the argmax path, and sampled output has exactly the law of ``p``.  The
rows themselves are float computations: a batched or k-token forward differs from a one-token
forward by ~1e-6 in float32 (~1e-2 in bfloat16), which can flip an argmax or a Gumbel-max between
two tokens whose scores are that close.  So "AR and SLEM emit the same tokens", "the service and
the in-process engine agree" and "batching, retries or the number of rounds cannot change an
output" hold exactly for the keyed randomness and up to such floating-point near-ties for the
model's numbers; the distribution of sampled output is exact for whatever rows the target
computed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

# Randomness streams: one per kind of decision made about a position.
TARGET = 0  # the target's own sample (AR, SLEM, bonus tokens)
DRAFT = 1  # the drafter's proposal
ACCEPT = 2  # the accept/reject uniform of speculative sampling
RESIDUAL = 3  # the draw from the residual distribution after a rejection

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key(seed: int, position: int, stream: int, salt: int = 0) -> int:
    """A 63-bit generator seed that depends only on ``(seed, position, stream, salt)``."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (position & _MASK64))
    h = _splitmix64(h ^ ((stream << 32) | (salt & 0xFFFFFFFF)))
    return h & ((1 << 63) - 1)


def uniforms(seed: int, position: int, stream: int, n: int, salt: int = 0) -> torch.Tensor:
    """``n`` float64 uniforms in the open interval (0, 1), keyed as described in the module doc."""
    g = torch.Generator().manual_seed(key(seed, position, stream, salt))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return u.clamp_(min=1e-300, max=1.0 - 1e-16)


def uniform(seed: int, position: int, stream: int, salt: int = 0) -> float:
    return float(uniforms(seed, position, stream, 1, salt)[0])


def gumbel_sample(probs: torch.Tensor, seed: int, position: int, stream: int = TARGET,
                  salt: int = 0) -> int:
    """An exact sample from ``probs`` (1-D, need not be normalised) by the Gumbel-max trick.

    ``argmax(log p_i - log(-log u_i))`` is distributed as ``p``; tokens with ``p_i = 0`` never win.
    It is computed as the equal ``argmax(p_i / e_i)`` with ``e_i = -log u_i`` (the exponential
    race: one logarithm instead of three), and over the support of ``p`` alone when that is a
    small part of the row (truncated proposals, residuals, top-k): the uniforms stay keyed by
    token index, so the token drawn for a key does not depend on which path computed it.
    """
    u = uniforms(seed, position, stream, probs.shape[-1], salt)
    p = probs.to(torch.float64)
    support = torch.nonzero(p > 0).flatten()
    if 0 < support.numel() <= p.numel() // 4:
        return int(support[torch.argmax(p[support] / -torch.log(u[support]))])
    return int(torch.argmax(p / -torch.log(u)))


@dataclass(frozen=True)
class SamplingParams:
    """How the target's logits become the distribution ``p`` that the output must follow."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not math.isfinite(self.top_p) \
                or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0 \
                or self.seed >= 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def seed_for(temperature: float) -> int:
    """The seed of a request that names none: a fresh random one when sampling (so unseeded
    requests differ; echo it so the output can be reproduced), 0 when greedy (never used)."""
    return secrets.randbits(63) if temperature > 0 else 0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed distribution ``p`` over the last dimension (``[..., V]``), float32 or wider.

    Greedy: one-hot on the first maximal logit.  Otherwise softmax(logits / T) restricted to the
    top-k tokens and then to the smallest set whose mass reaches top-p (ties at the cut kept in
    index order), renormalised.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if params.greedy:
        out = torch.zeros_like(logits)
        out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return out
    scaled = logits / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def target_choice(p: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The target's own token at absolute output ``position`` given its processed ``p`` ([V])."""
    if params.greedy:
        return int(torch.argmax(p))
    return gumbel_sample(p, params.seed, position, TARGET)
