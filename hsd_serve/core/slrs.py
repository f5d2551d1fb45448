"""SLRS: string-level rejection sampling between models that share no vocabulary.

One round proposes **one** target token from a stream of drafter tokens and verifies it against
the target's processed distribution ``p`` (temperature / top-k / top-p applied; greedy = one-hot)
so that the emitted token is distributed *exactly* as ``p``.

Notation
--------
``S``        the allowed target strings: the non-empty byte strings of non-special target ids
             (optionally only those of at most ``max_target_bytes`` bytes).  When several ids share
             one byte string the lowest id is *canonical*; the others are never proposed (ψ = 0).
``q(·|π)``   the drafter's processed next-token distribution after the committed drafter context
             extended by the drafter path ``π`` (a tuple of drafter ids), read from
             ``DrafterOracle.path_dists`` and normalised in float64.
terminal     drafter ids that end the stream: the given EOS ids, the drafter's ``special_ids``, ids
             whose byte string is empty, and ids beyond the drafter vocabulary (padding rows).
``b(π)``     the concatenated bytes of ``π``.
``u ⊑ v``    ``u`` is a prefix of ``v`` (``⊏``: a proper prefix); "``w`` is extendable" means
             some ``s ∈ S`` has ``w ⊏ s``.

The proposal
------------
The drafter generates a stream ``d1, d2, …`` (``d_j`` drawn from ``q(·|d1..d_{j-1})``; a terminal
token ends it), i.e. a byte stream ``B``.  The rule ``f`` maps the stream to one target token:

    f(B) = canonical id of the longest ``s ∈ S`` with ``s ⊑ B``, or ``∅`` when there is none.

The rule is *not* the target tokenizer; the target verifies token ids and only needs ``P(f = t)``
exactly.  ``ψ(t) = P(f(B) = t)`` and ``ψ(∅) = 1 − Σ_t ψ(t)``.  Because a stream may match nothing
(drafter EOS first, a target vocabulary without byte coverage, ``max_target_bytes``), the proposal
actually verified is the mixture

    proposal = f(B) if f(B) ≠ ∅ else a fresh draw t ~ p,   so   ψ'(t) = ψ(t) + ψ(∅)·p(t),

which sums to one: ``Σ_t ψ'(t) = (1 − ψ(∅)) + ψ(∅) = 1``.

Stopping the stream does not bias ψ.  Drafting stops at the first prefix ``π`` of the run whose
bytes ``w = b(π)`` are not extendable (or when a terminal token is drawn).  For every continuation
``B ⊒ w`` we have ``f(B) = f(w)``: an ``s ∈ S`` with ``s ⊑ B`` and ``|s| ≤ |w|`` satisfies
``s ⊑ w``, and one with ``|s| > |w|`` would make ``w`` extendable.  So the stopped run determines
the outcome of the whole (possibly infinite) stream; the stopping time is a function of the drawn
prefix only, and ``ψ`` is the law of ``f(B)`` of the full stream whatever we decide to look at.

Computing ψ exactly
-------------------
``ψ(o) = Σ_{stopped runs π, f(b(π)) = o} Π_j q(d_j | d1..d_{j-1})`` is evaluated by a recursion
over the tree of run prefixes, pruned where the outcome can no longer be ``o``.  Write ``s`` for the
string of ``o`` (``b""`` for ``∅``) and ``V(π) = P(f = o | run prefix π)``:

* Phase A, ``w = b(π)`` a proper prefix of ``s``, rest ``r = s[|w|:]``: a token ``d`` that is a
  proper prefix of ``r`` continues in phase A; a token with ``r ⊑ d`` (it may overrun the end of
  ``s``) puts ``s`` into the stream; every other token (and a terminal one) makes ``f ≠ o``:

      V(π) = Σ_{d ⊏ r} q(d) V(πd) + Σ_{d ⊒ r} q(d) [1 − killed(d) − recursing(d)·K(πd)].

* Phase B, ``|w| ≥ |s|`` (``s ⊑ w`` and no longer string of ``S`` is a prefix of ``w`` yet):
  ``V(π) = 1 − K(π)`` with ``K(π)`` the probability that a string of ``S`` longer than ``w``
  becomes a prefix of the stream:

      K(π) = Σ_{d killed} q(d) + Σ_{d recursing} q(d) K(πd).

  ``d`` is *killed* when ``w·d`` has a prefix in ``S`` longer than ``max(|s|, |w|)``; it is
  *recursing* when it is not killed and ``w·d`` is extendable (the run goes on); any other token,
  terminal ones included, stops the run with outcome ``o``.  The killed and recursing tokens are
  found by walking the drafter token trie and the target trie together below ``w`` (``_scan``), so
  a context costs the size of that intersection, not ``|V_D|``.

This is the brief's ``ψ(t) = P(s_t ⊑ B) − Σ_{s' ∈ ext(s_t)} P(s' ⊑ B)`` (``ext`` = the minimal
strict extensions of ``s_t`` in ``S``; pairwise non-prefix, hence disjoint events) with each
``P(s ⊑ B)`` summed over **every** drafter tokenization of ``s`` whose last token may overrun it;
and ``ψ(∅) = 1 − Σ_{s ∈ ext(b"")} P(s ⊑ B)``.  Phase A for a byte-level drafter is a single chain;
for a BPE drafter the number of run prefixes is the number of segmentations of the prefixes of
``s`` and grows exponentially with ``|s|`` — hence the budget below.

Every row used is read once per round and cached: the rows used to *draw* the drafted path are the
same numbers used in ψ, so ψ is the law of the proposal actually drawn (to float64 rounding),
provided ``path_dists`` is a function of the path (see "Engine contract").

Verification (standard rejection sampling with an exact proper proposal)
--------------------------------------------------------------------------
Accept the proposal ``t`` with probability ``a(t) = min(1, p(t)/ψ'(t))``; on rejection emit a draw
from ``res = norm((p − ψ')⁺)``.  Then

    P(emit t) = ψ'(t)·a(t) + P(rej)·res(t)
              = min(ψ', p)(t) + [Σ_u (ψ' − p)⁺(u)] · (p − ψ')⁺(t) / Σ_u (p − ψ')⁺(u)
              = min(ψ', p)(t) + (p − ψ')⁺(t) = p(t),

because ``Σ (ψ' − p)⁺ = Σ (p − ψ')⁺`` for two distributions.  This needs ψ' only at the proposed
token and is exact for *any* proper ψ', however poor; the drafter only affects the speed.

The residual without ψ' over the whole vocabulary.  A *try* draws ``t ~ p`` and keeps it with
probability ``r(t) = (1 − ψ'(t)/p(t))⁺``.  ``P(try keeps t) = p(t) r(t) = (p − ψ')⁺(t) = α·res(t)``
with ``α = Σ (p − ψ')⁺ = P(rej) > 0`` whenever a rejection happened, so the kept token of the first
successful try is distributed as ``res``.  Termination is guaranteed by switching to the exact
residual (ψ' evaluated on the whole support of ``p``, then one draw from ``(p − ψ')⁺``) after
``max_residual_tries`` failed tries, or earlier once every support token has been evaluated (then it
is free).  Switching after any history of failed tries stays exact: conditioned on that history the
exact branch outputs ``res``, and by induction so does each further try followed by the rest of the
procedure.  Given a rejection the number of tries is geometric with mean ``1/α``, so the expected
number of tries per round is ``P(rej)/α = 1``; ψ' values are cached per round, so repeated draws of
the same token cost no forwards.

Randomness.  Every uniform has its own key (DESIGN.md "Seeding"): drafter token ``j`` of the round
at output position ``n`` uses ``gumbel_sample(row, seed, n, DRAFT, salt=j)``; the no-match draw from
``p`` uses ``(DRAFT, salt=NO_MATCH_SALT)``; the accept test ``uniform(seed, n, ACCEPT)``; residual
try ``i`` two uniforms from ``(RESIDUAL, salt=i)``; the exact residual
``(RESIDUAL, salt=EXACT_SALT)``.  The keys are distinct, so the draws are independent as the
argument assumes, and the emitted token depends only on ``(seed, n)`` and the two models'
distributions.

Shortcuts that change nothing: ``p(t) = 0`` rejects and ``p(t) = 1`` accepts without computing ψ'
(``psi`` is then ``nan``); a ``p`` with a single support token has that token as its residual.

Cost and budget
---------------
A *context* is a drafter path whose next-token row the recursion needs.  Every oracle call is made
for a needed context not yet cached, so oracle calls ≤ needed contexts (a call names the leftmost
leaf below that context, so it may also return rows past zero-probability tokens, at no extra call).
The contexts of one round without residual tries are those of ``ψ(t)`` for the verified ``t``
together with those of ``ψ(∅)`` (the drafted run itself lies inside them).  ``estimated_forwards``
is the exact worst case of that union over all ``t`` (``contexts_needed(t)`` per token), counted
without model calls by a DP over the two vocabularies: the number of drafter segmentations of each
proper prefix of ``s_t`` (phase A) plus the phase-B subtrees below each transition, plus the
no-match contexts.  A byte-level drafter needs about ``|s_t|`` plus the number of non-token nodes of
the target trie between ``s_t`` and its next longer matches; a BPE drafter grows exponentially with
``|s_t|``.  Construction raises ``SLRSBudgetError`` when the estimate exceeds ``max_forwards``.
Residual tries add the contexts of the tokens they draw (one try per round on average).
Zero-probability drafter tokens are pruned at run time, so a peaked drafter costs less.

Two knobs keep real pairs under budget without touching exactness:

* ``max_target_bytes``: target strings longer than this leave ``S`` (the rule never proposes them;
  the target still emits them through the ψ(∅) mixture and the residual).  Any subset of target
  strings gives a valid rule.
* ``drafter_top_k``: a promise that every oracle row has at most ``k`` non-zero entries (the engine
  applies top-k to the drafter).  The estimate then keeps only the ``k`` costliest children of every
  context (an upper bound).  ψ stays exact because it is computed from the same truncated rows the
  stream is drawn from; a row with more non-zeros only costs more than estimated.

Measured worst cases (byte-level drafter; real target vocabularies from ``shared/assets``):
GPT-2 128 and Llama-3 371 contexts unrestricted (long runs of spaces / mojibake, and short
tokens such as ``.set`` with hundreds of non-token trie nodes below them); with
``max_target_bytes=8, drafter_top_k=4``: 36 and 60.  The median token needs about 7.  A 512-token
SentencePiece drafter (stories260K) needs ~10^3 even then: multi-byte drafters suit short targets
only.

Engine contract
---------------
``path_dists(path)`` returns ``[len(path)+1, V_D]`` rows for the committed drafter context extended
by ``path[:j]``.  ``step`` asks for the drafted prefixes one at a time (a draw needs the previous
one) and then for the leaves of the ψ recursion (each call fills every prefix of the path it names).
The committed drafter context may be any deterministic drafter tokenization of the committed text;
losslessness does not depend on it.  Rows must not depend on which call produced them beyond float
noise (caching KV for shared prefixes is fine).

This module is pure: stdlib and torch only.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch

from .sampling import ACCEPT, DRAFT, RESIDUAL, gumbel_sample, uniform, uniforms

__all__ = [
    "VocabLike",
    "DrafterOracle",
    "SLRSBudgetError",
    "SLRSResult",
    "SLRS",
    "accept_probability",
    "residual_acceptance",
    "NO_MATCH_SALT",
    "EXACT_SALT",
]

NO_MATCH_SALT = 0x7FFFFFFF  # (DRAFT stream) the draw from p when the drafted stream matched nothing
EXACT_SALT = 0xFFFFFFFF  # (RESIDUAL stream) the draw from the exactly computed residual
_MAX_SCAN_CACHE = 200_000  # entries per structural cache (cleared when full)
_MAX_GATHER = 4096  # kill sets up to this many drafter ids are summed with one cached gather


class VocabLike(Protocol):
    """Anything with per-id byte strings (``hsd_serve.core.vocab.Vocab`` qualifies).

    ``special_ids`` is read when present; ids with ``b""`` are treated as special either way.
    """

    @property
    def token_bytes(self) -> Sequence[bytes]: ...


class DrafterOracle(Protocol):
    def path_dists(self, path: tuple[int, ...]) -> torch.Tensor:
        """``[len(path)+1, V_D]`` probabilities: row ``j`` is the drafter's processed next-token
        distribution after the committed drafter context extended by ``path[:j]``.  One call is one
        drafter forward."""
        ...


class SLRSBudgetError(ValueError):
    """The worst-case drafter forwards of one SLRS round exceed the configured budget."""


@dataclass(frozen=True)
class SLRSResult:
    token: int  # the emitted target token (distributed exactly as p)
    accepted: bool  # the verified proposal was accepted (token == proposal)
    proposed: int | None  # target id the drafted stream matched; None = matched no target string
    proposal: int  # target id that was verified: ``proposed``, or the draw from p on no match
    psi: float  # ψ'(proposal) used in the accept test; nan when p(proposal) is 0 or 1 (not needed)
    p_proposal: float  # p(proposal)
    forwards: int  # oracle calls (drafter forwards) this round
    contexts: int  # distinct drafter contexts whose rows were read this round
    drafted_path: tuple[int, ...]  # drafter ids sampled (a terminal id that ended it excluded)
    drafted_bytes: bytes
    residual_tries: int  # tries of the residual-by-rejection loop (0 when accepted)
    residual_exact: bool  # the residual was computed exactly over the support of p


def accept_probability(p_t: float, psi_t: float) -> float:
    """``min(1, p(t)/ψ'(t))`` — probability of accepting proposal ``t``."""
    if p_t <= 0.0:
        return 0.0
    if psi_t <= p_t:
        return 1.0
    return p_t / psi_t


def residual_acceptance(p_t: float, psi_t: float) -> float:
    """``(1 − ψ'(t)/p(t))⁺`` — probability that a residual try keeps its draw ``t ~ p``."""
    if p_t <= 0.0 or psi_t >= p_t:
        return 0.0
    return 1.0 - psi_t / p_t


def _nbytes(s: bytes) -> str:
    return f"{len(s)} byte" if len(s) == 1 else f"{len(s)} bytes"


def _show(s: bytes, limit: int = 32) -> str:
    return repr(s) if len(s) <= limit else repr(s[:limit]) + "..."


def _prefix_upper(x: bytes) -> bytes | None:
    """Smallest byte string greater than every string with prefix ``x`` (None: no bound)."""
    y = x.rstrip(b"\xff")
    if not y:
        return None
    return y[:-1] + bytes((y[-1] + 1,))


class SLRS:
    """String-level rejection sampling for one drafter/target vocabulary pair (see module doc)."""

    def __init__(self, drafter_vocab: VocabLike, target_vocab: VocabLike, *,
                 drafter_eos_ids: Iterable[int] = frozenset(), max_forwards: int = 64,
                 max_residual_tries: int = 1024, max_target_bytes: int | None = None,
                 drafter_top_k: int | None = None) -> None:
        if not isinstance(max_forwards, int) or max_forwards < 1:
            raise ValueError(f"max_forwards must be an integer >= 1, got {max_forwards!r}")
        if not isinstance(max_residual_tries, int) or not 0 <= max_residual_tries < 2**31 - 1:
            raise ValueError(f"max_residual_tries must be an integer in [0, 2**31-1), "
                             f"got {max_residual_tries!r}")
        if max_target_bytes is not None and (not isinstance(max_target_bytes, int)
                                             or max_target_bytes < 1):
            raise ValueError(f"max_target_bytes must be None or an integer >= 1, "
                             f"got {max_target_bytes!r}")
        if drafter_top_k is not None and (not isinstance(drafter_top_k, int) or drafter_top_k < 1):
            raise ValueError(f"drafter_top_k must be None or an integer >= 1, "
                             f"got {drafter_top_k!r}")
        self.max_forwards = max_forwards
        self.drafter_top_k = drafter_top_k
        self.max_residual_tries = max_residual_tries
        self.max_target_bytes = max_target_bytes

        # ---- target: canonical allowed strings and their trie ------------------------------
        t_bytes = tuple(bytes(b) for b in target_vocab.token_bytes)
        t_special = frozenset(int(i) for i in getattr(target_vocab, "special_ids", ()))
        self.n_target = len(t_bytes)
        self._t_bytes = t_bytes
        t_id: dict[bytes, int] = {}
        for i, b in enumerate(t_bytes):
            if not b or i in t_special:
                continue
            if max_target_bytes is not None and len(b) > max_target_bytes:
                continue
            t_id.setdefault(b, i)
        self._t_id = t_id
        t_next: dict[bytes, set[int]] = {}
        for s in t_id:
            for k in range(len(s)):
                t_next.setdefault(s[:k], set()).add(s[k])
        # node -> sorted next bytes; its keys are exactly the extendable byte strings
        self._t_next: dict[bytes, bytes] = {k: bytes(sorted(v)) for k, v in t_next.items()}

        # ---- drafter: terminal ids, exact-string index, prefix trie, sorted blocks ----------
        d_bytes = tuple(bytes(b) for b in drafter_vocab.token_bytes)
        d_special = frozenset(int(i) for i in getattr(drafter_vocab, "special_ids", ()))
        self.n_drafter = len(d_bytes)
        self._d_bytes = d_bytes
        terminal = set(int(i) for i in drafter_eos_ids) | set(d_special)
        terminal |= {i for i, b in enumerate(d_bytes) if not b}
        self._d_terminal = frozenset(terminal)
        d_ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(d_bytes):
            if i not in terminal:
                d_ids.setdefault(b, []).append(i)
        self._d_ids: dict[bytes, tuple[int, ...]] = {b: tuple(v) for b, v in d_ids.items()}
        d_next: dict[bytes, set[int]] = {}
        for b in self._d_ids:
            for k in range(len(b)):
                d_next.setdefault(b[:k], set()).add(b[k])
        self._d_next: dict[bytes, bytes] = {k: bytes(sorted(v)) for k, v in d_next.items()}
        self._d_sorted: list[bytes] = sorted(self._d_ids)
        offsets = [0]
        flat: list[int] = []
        for b in self._d_sorted:
            flat.extend(self._d_ids[b])
            offsets.append(len(flat))
        self._d_offsets = offsets
        self._d_flat = torch.tensor(flat, dtype=torch.long)
        self._d_maxlen = max((len(b) for b in self._d_ids), default=0)
        self._d_scheme = getattr(drafter_vocab, "scheme", None)

        self._scan_cache: dict[tuple[bytes, bytes, int], tuple[tuple[bytes, ...],
                                                               tuple[tuple[int, bytes], ...]]] = {}
        self._block_cache: dict[bytes, tuple[int, int]] = {}
        self._kill_idx: dict[tuple[bytes, bytes, int], torch.Tensor | list[tuple[int, int]]] = {}

        # ---- worst-case cost -------------------------------------------------------------
        self._b_count: dict[int | None, dict[bytes, int]] = {}
        self.no_match_contexts = self._phase_b_count(b"") if b"" in self._t_next else 0
        worst, worst_s, worst_a = self.no_match_contexts, None, 0
        if drafter_top_k is not None and self.no_match_contexts:
            worst = min(worst, self._phase_b_count(b"", drafter_top_k))
        for s in t_id:
            total, phase_a = self._contexts_for_string(s)
            if total > worst:
                worst, worst_s, worst_a = total, s, phase_a
        self.estimated_forwards: int = worst
        self.worst_target_id: int | None = None if worst_s is None else t_id[worst_s]
        if worst > max_forwards:
            if worst_s is None:
                what = (f"the no-match outcome needs {worst} contexts (drafter paths through "
                        f"prefixes of target strings before any of them matches)")
            else:
                longest = max((s for s in t_id if s.startswith(worst_s)), key=len)
                what = (f"worst target token id {t_id[worst_s]} {_show(worst_s)} "
                        f"({_nbytes(worst_s)}): "
                        f"{worst_a} contexts on drafter tokenizations of its proper prefixes plus "
                        f"{worst - worst_a} contexts for its longer matches (longest "
                        f"{_show(longest)} ({_nbytes(longest)})) and the no-match outcome")
            topk = "" if drafter_top_k is None else f", drafter_top_k={drafter_top_k}"
            cut = "" if max_target_bytes is None else f", max_target_bytes={max_target_bytes}"
            raise SLRSBudgetError(
                f"SLRS would need up to {worst} drafter forwards in one round but max_forwards="
                f"{max_forwards}{topk}{cut}; {what}; drafter vocabulary: {self.drafter_kind}; "
                f"target: {len(t_id)} strings, longest {max(map(len, t_id))} bytes. Use a byte- or "
                f"character-level drafter, raise max_forwards, set max_target_bytes to leave long "
                f"target tokens to the residual, apply top-k to the drafter (drafter_top_k), or "
                f"use SLEM/TLI.")

    # ------------------------------------------------------------------ descriptions
    @property
    def drafter_kind(self) -> str:
        n = len(self._d_flat)
        scheme = f", scheme {self._d_scheme}" if self._d_scheme else ""
        if self._d_maxlen <= 1:
            return f"byte-level ({n} text tokens of one byte{scheme})"
        return f"multi-byte/BPE-like ({n} text tokens, longest {self._d_maxlen} bytes{scheme})"

    # ------------------------------------------------------------------ structure (no model)
    def _is_terminal(self, d: int) -> bool:
        return d >= self.n_drafter or d < 0 or d in self._d_terminal

    def _scan(self, w: bytes, x0: bytes, limit: int, cache: bool = True
              ) -> tuple[tuple[bytes, ...], tuple[tuple[int, bytes], ...]]:
        """Classify drafter tokens ``d ⊒ x0`` appended at bytes ``w`` (``w·x0`` a target-trie node).

        Returns ``(kills, recursing)``: ``kills`` are strings ``x`` such that every drafter token
        with prefix ``x`` is killed (``w·x ∈ S`` and ``|w·x| > limit``, the first such along the
        way); ``recursing`` are ``(id, x)`` for tokens ``x`` (not killed) with ``w·x`` extendable.
        Every other token ``⊒ x0`` leaves the trie without a new match (the run stops there).
        """
        k = (w, x0, limit)
        hit = self._scan_cache.get(k)
        if hit is not None:
            return hit
        kills: list[bytes] = []
        rec: list[tuple[int, bytes]] = []
        t_next, t_id, d_next, d_ids = self._t_next, self._t_id, self._d_next, self._d_ids
        if not x0 or x0 in d_next or x0 in d_ids:
            stack = [x0]
            while stack:
                x = stack.pop()
                wx = w + x
                if len(wx) > limit and wx in t_id:
                    kills.append(x)
                    continue
                tn = t_next.get(wx)
                if x and tn is not None:
                    ids = d_ids.get(x)
                    if ids:
                        rec.extend((i, x) for i in ids)
                dn = d_next.get(x)
                if dn is None or tn is None:
                    continue
                small, big = (dn, tn) if len(dn) <= len(tn) else (tn, dn)
                for c in small:
                    if c in big:
                        stack.append(x + bytes((c,)))
        out = (tuple(kills), tuple(rec))
        if cache:
            if len(self._scan_cache) >= _MAX_SCAN_CACHE:
                self._scan_cache.clear()
            self._scan_cache[k] = out
        return out

    def _children(self, w: bytes, s: bytes) -> list[tuple[int, bytes]]:
        """Child contexts ``(id, bytes)`` of a context with bytes ``w`` for outcome string ``s``."""
        out: list[tuple[int, bytes]] = []
        if len(w) < len(s):
            r = s[len(w):]
            for j in range(1, len(r)):
                ids = self._d_ids.get(r[:j])
                if ids:
                    out.extend((i, w + r[:j]) for i in ids)
                if r[:j] not in self._d_next:
                    break
            out.extend((i, w + x) for i, x in self._scan(w, r, len(s))[1])
        else:
            out.extend((i, w + x) for i, x in self._scan(w, b"", len(w))[1])
        return out

    @staticmethod
    def _sum_top(vals: list[int], k: int | None) -> int:
        if k is None or len(vals) <= k:
            return sum(vals)
        return sum(heapq.nlargest(k, vals))

    def _phase_b_count(self, w: bytes, k: int | None = None) -> int:
        """Contexts in the phase-B subtree of a context with bytes ``w``: all of them, or with
        ``k`` the worst case when every row has at most ``k`` non-zero entries."""
        memo = self._b_count.setdefault(k, {})
        c = memo.get(w)
        if c is None:
            c = 1 + self._sum_top([self._phase_b_count(w + x, k)
                                   for _, x in self._scan(w, b"", len(w), cache=False)[1]], k)
            memo[w] = c
        return c

    def _contexts_for_string(self, s: bytes) -> tuple[int, int]:
        """(contexts of ψ(s) ∪ ψ(∅), contexts spent on tokenizations of s's proper prefixes).

        Exact without ``drafter_top_k`` (every drafter path that the recursion can visit); with it,
        the smaller of that and a worst case in which each context keeps its ``k`` costliest
        children.  No model calls.
        """
        n = len(s)
        d_ids, d_next = self._d_ids, self._d_next
        k_top = self.drafter_top_k
        seg = [0] * n  # number of drafter id sequences whose bytes are exactly s[:k]
        seg[0] = 1
        moves: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # k -> [(j, multiplicity)]
        for i in range(n):
            if not seg[i]:
                continue
            for j in range(i + 1, n):
                x = s[i:j]
                ids = d_ids.get(x)
                if ids:
                    seg[j] += seg[i] * len(ids)
                    moves[i].append((j, len(ids)))
                if x not in d_next:
                    break
        # exact: every path, each with the phase-B subtrees below its transitions
        total = own0 = 0
        trans: list[tuple[int, ...]] = [()] * n
        for k in range(n):
            if not seg[k]:
                continue
            own0 += seg[k]
            total += seg[k]
            r = s[k:]
            if r in d_next or r in d_ids:
                trans[k] = tuple(len(x) for _, x in self._scan(s[:k], r, n, cache=False)[1])
                total += seg[k] * sum(self._phase_b_count(s[:k + j]) for j in trans[k])
        if self.no_match_contexts:  # shared with ψ(∅): phase-A contexts before the first match
            m = next(k for k in range(1, n + 1) if s[:k] in self._t_id)
            total += self.no_match_contexts - sum(seg[:m])
        if k_top is None:
            return total, own0
        # worst case with at most k_top non-zero entries per row: position DP
        full = [0] * n
        own = [0] * n
        for k in range(n - 1, -1, -1):
            if not seg[k]:
                continue
            ch_full: list[int] = []
            ch_own: list[int] = []
            for j, mult in moves[k]:
                ch_full.extend([full[j]] * mult)
                ch_own.extend([own[j]] * mult)
            ch_full.extend(self._phase_b_count(s[:k + j], k_top) for j in trans[k])
            full[k] = 1 + self._sum_top(ch_full, k_top)
            own[k] = 1 + self._sum_top(ch_own, k_top)
        bound = full[0]
        if self.no_match_contexts:
            bound += self._phase_b_count(b"", k_top) - 1  # the root is shared
        return min(total, bound), min(own0, own[0])

    def contexts_needed(self, target_id: int | None) -> int:
        """Worst-case distinct drafter contexts to evaluate ψ'(target_id) (None: ψ(∅) only)."""
        if target_id is None:
            return self.no_match_contexts
        s = self._canonical_string(target_id)
        if s is None:
            return self.no_match_contexts
        return self._contexts_for_string(s)[0]

    def _canonical_string(self, t: int) -> bytes | None:
        if not 0 <= t < self.n_target:
            return None
        b = self._t_bytes[t]
        return b if b and self._t_id.get(b) == t else None

    def _block(self, x: bytes) -> tuple[int, int]:
        """Range in ``_d_flat`` of the non-terminal drafter ids whose bytes have prefix ``x``."""
        r = self._block_cache.get(x)
        if r is None:
            lo = bisect.bisect_left(self._d_sorted, x)
            up = _prefix_upper(x)
            hi = len(self._d_sorted) if up is None else bisect.bisect_left(self._d_sorted, up)
            r = (self._d_offsets[lo], self._d_offsets[hi])
            if len(self._block_cache) >= _MAX_SCAN_CACHE:
                self._block_cache.clear()
            self._block_cache[x] = r
        return r

    def _mass(self, row: torch.Tensor, x: bytes) -> float:
        lo, hi = self._block(x)
        if hi - lo == 0:
            return 0.0
        if hi - lo == 1:
            return float(row[self._d_flat[lo]])
        return float(row[self._d_flat[lo:hi]].sum())

    def _kill_mass(self, row: torch.Tensor, key: tuple[bytes, bytes, int],
                   kills: tuple[bytes, ...]) -> float:
        """Total mass of the drafter ids in the ``kills`` blocks of scan ``key`` (one gather)."""
        idx = self._kill_idx.get(key)
        if idx is None:
            ranges = [self._block(x) for x in kills]
            if sum(hi - lo for lo, hi in ranges) <= _MAX_GATHER:
                idx = torch.cat([self._d_flat[lo:hi] for lo, hi in ranges]) if ranges \
                    else self._d_flat[:0]
            else:
                idx = ranges
            if len(self._kill_idx) >= _MAX_SCAN_CACHE:
                self._kill_idx.clear()
            self._kill_idx[key] = idx
        if isinstance(idx, torch.Tensor):
            return float(row[idx].sum()) if idx.numel() else 0.0
        return sum(float(row[self._d_flat[lo:hi]].sum()) for lo, hi in idx)

    def _longest_match(self, w: bytes) -> bytes | None:
        for k in range(len(w), 0, -1):
            if w[:k] in self._t_id:
                return w[:k]
        return None

    # ------------------------------------------------------------------ public API
    def step(self, oracle: DrafterOracle, p: torch.Tensor, *, seed: int, position: int
             ) -> SLRSResult:
        """One SLRS round at absolute output ``position``: draft, propose, verify, emit a token."""
        pv = _check_p(p)
        rnd = _Round(self, oracle)
        # 1. draft until the longest match is determined
        path: tuple[int, ...] = ()
        w = b""
        while w in self._t_next:
            row = rnd.row_exact(path)
            d = gumbel_sample(row, seed, position, DRAFT, salt=len(path))
            if self._is_terminal(d):
                break
            path += (d,)
            w += self._d_bytes[d]
        # 2. the proposal
        s = self._longest_match(w)
        proposed = None if s is None else self._t_id[s]
        if proposed is None:
            proposal = gumbel_sample(pv, seed, position, DRAFT, salt=NO_MATCH_SALT)
        else:
            proposal = proposed
        p_t = float(pv[proposal]) if proposal < pv.shape[0] else 0.0
        # 3. verification
        psi_t = math.nan
        if p_t <= 0.0:
            accepted = False
        elif p_t >= 1.0:
            accepted = True
        else:
            psi_t = rnd.psi_prime(proposal, p_t)
            accepted = uniform(seed, position, ACCEPT) < accept_probability(p_t, psi_t)
        tries, exact = 0, False
        token = proposal
        if not accepted:
            token, tries, exact = self._residual(rnd, pv, seed, position)
        return SLRSResult(token=token, accepted=accepted, proposed=proposed, proposal=proposal,
                          psi=psi_t, p_proposal=p_t, forwards=rnd.forwards,
                          contexts=len(rnd.rows), drafted_path=path, drafted_bytes=w,
                          residual_tries=tries, residual_exact=exact)

    def sample_residual(self, oracle: DrafterOracle, p: torch.Tensor, *, seed: int,
                        position: int) -> tuple[int, int, bool]:
        """A draw from ``norm((p − ψ')⁺)`` as ``step`` makes it after a rejection.

        Returns ``(token, tries, exact_fallback_used)``.  Exposed for tests; ``p`` must differ
        from ψ' (otherwise there is no residual and the fallback returns a draw from ``p``).
        """
        return self._residual(_Round(self, oracle), _check_p(p), seed, position)

    def _residual(self, rnd: "_Round", pv: torch.Tensor, seed: int, position: int
                  ) -> tuple[int, int, bool]:
        support = torch.nonzero(pv > 0).flatten().tolist()
        if len(support) == 1:
            return support[0], 0, True
        cdf = torch.cumsum(pv, 0)
        total = float(cdf[-1])
        last = support[-1]
        known: dict[int, float] = {}
        tries = 0
        for i in range(self.max_residual_tries):
            if len(known) >= len(support):
                break
            u = uniforms(seed, position, RESIDUAL, 2, salt=i)
            t = min(int(torch.searchsorted(cdf, float(u[0]) * total, right=True)), last)
            p_t = float(pv[t])
            if t not in known:
                known[t] = rnd.psi_prime(t, p_t)
            tries = i + 1
            if float(u[1]) < residual_acceptance(p_t, known[t]):
                return t, tries, False
        weights = torch.zeros_like(pv)
        for t in support:
            p_t = float(pv[t])
            if t not in known:
                known[t] = rnd.psi_prime(t, p_t)
            weights[t] = max(p_t - known[t], 0.0)
        if not float(weights.sum()) > 0.0:  # ψ' ≥ p everywhere: only reachable by rounding
            weights = pv
        return gumbel_sample(weights, seed, position, RESIDUAL, salt=EXACT_SALT), tries, True

    def psi(self, oracle: DrafterOracle, target_id: int) -> float:
        """Exact ψ(target_id) = P(longest match of the drafted stream is this token), no mixture."""
        return _Round(self, oracle).psi(target_id)

    def psi_empty(self, oracle: DrafterOracle) -> float:
        """Exact ψ(∅) = P(the drafted stream matches no allowed target string)."""
        return _Round(self, oracle).value(b"")

    def psi_table(self, oracle: DrafterOracle) -> tuple[torch.Tensor, float]:
        """(ψ over all target ids ``[n_target]`` float64, ψ(∅)), sharing one row cache."""
        rnd = _Round(self, oracle)
        out = torch.zeros(self.n_target, dtype=torch.float64)
        for s, t in self._t_id.items():
            out[t] = rnd.value(s)
        return out, rnd.value(b"")

    def proposal_distribution(self, oracle: DrafterOracle, p: torch.Tensor) -> torch.Tensor:
        """ψ'(t) = ψ(t) + ψ(∅)·p(t) over ``max(len(p), n_target)`` ids (float64)."""
        pv = _check_p(p)
        rnd = _Round(self, oracle)
        n = max(pv.shape[0], self.n_target)
        out = torch.zeros(n, dtype=torch.float64)
        for t in range(n):  # the very function ``step`` uses for ψ'
            out[t] = rnd.psi_prime(t, float(pv[t]) if t < pv.shape[0] else 0.0)
        return out

    def output_distribution(self, oracle: DrafterOracle, p: torch.Tensor) -> torch.Tensor:
        """The exact law of ``step``'s emitted token, from ψ' and the decision probabilities
        ``accept_probability`` / ``residual_acceptance`` that ``step`` uses (tests: equals p)."""
        pv = _check_p(p)
        q = self.proposal_distribution(oracle, p)
        pp = torch.zeros_like(q)
        pp[: pv.shape[0]] = pv
        acc = torch.tensor([accept_probability(float(a), float(b)) for a, b in zip(pp, q)],
                           dtype=torch.float64)
        keep = torch.tensor([float(a) * residual_acceptance(float(a), float(b))
                             for a, b in zip(pp, q)], dtype=torch.float64)
        out = q * acc
        reject = float((q * (1.0 - acc)).sum())
        if float(keep.sum()) > 0.0:
            out = out + reject * keep / keep.sum()
        return out


def _check_p(p: torch.Tensor) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.shape[0] == 0:
        raise ValueError(f"p must be a non-empty 1-D tensor [V_target], got "
                         f"{getattr(p, 'shape', type(p))}")
    pv = p.detach().to(torch.float64)
    total, low = float(pv.sum()), float(pv.min())  # NaN/inf surface in the sum or the min
    if not (math.isfinite(total) and low >= 0.0):
        raise ValueError("p must be finite and non-negative")
    if not total > 0.0:
        raise ValueError("p must have positive mass")
    return pv / total


class _Round:
    """Per-round state: drafter rows by path (each read once), oracle call count, ψ by outcome."""

    def __init__(self, slrs: SLRS, oracle: DrafterOracle) -> None:
        self.m = slrs
        self.oracle = oracle
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}
        self.forwards = 0
        self.values: dict[bytes, float] = {}

    # -- rows
    def _fetch(self, path: tuple[int, ...]) -> None:
        out = self.oracle.path_dists(path)
        self.forwards += 1
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(path) + 1:
            raise ValueError(f"path_dists({path}) must return [len(path)+1, V_D] = "
                             f"[{len(path) + 1}, V_D], got {getattr(out, 'shape', type(out))}")
        out = out.detach().to(torch.float64)
        if out.shape[1] < self.m.n_drafter:
            out = torch.nn.functional.pad(out, (0, self.m.n_drafter - out.shape[1]))
        for j in range(len(path) + 1):
            key = path[:j]
            if key in self.rows:
                continue
            r = out[j]
            total, low = float(r.sum()), float(r.min())
            if not (math.isfinite(total) and total > 0.0 and low >= 0.0):
                raise ValueError(f"drafter row for path {key} is not a distribution "
                                 f"(sum {total}, min {low})")
            self.rows[key] = r / total

    def row_exact(self, path: tuple[int, ...]) -> torch.Tensor:
        if path not in self.rows:
            self._fetch(path)
        return self.rows[path]

    def row(self, path: tuple[int, ...], w: bytes, s: bytes) -> torch.Tensor:
        """Row at ``path``; on a miss fetch the leftmost leaf below it so one call fills a chain."""
        r = self.rows.get(path)
        if r is not None:
            return r
        leaf = path
        while True:
            ch = self.m._children(w, s)
            if not ch:
                break
            i, w = ch[0]
            leaf = leaf + (i,)
        self._fetch(leaf)
        return self.rows[path]

    # -- ψ
    def value(self, s: bytes) -> float:
        """P(outcome string == s); ``s = b""`` is the no-match outcome."""
        v = self.values.get(s)
        if v is None:
            m = self.m
            if b"" not in m._t_next:
                v = 1.0 if s == b"" else 0.0
            elif s and s not in m._t_id:
                v = 0.0
            else:
                v = min(max(self._v((), b"", s), 0.0), 1.0)
            self.values[s] = v
        return v

    def psi(self, t: int) -> float:
        s = self.m._canonical_string(t)
        return 0.0 if s is None else self.value(s)

    def psi_prime(self, t: int, p_t: float) -> float:
        v = self.psi(t)
        if p_t > 0.0:
            v += self.value(b"") * p_t
        return v

    def _v(self, path: tuple[int, ...], w: bytes, s: bytes) -> float:
        if len(w) >= len(s):
            return 1.0 - self._k(path, w)
        m = self.m
        row = self.row(path, w, s)
        r = s[len(w):]
        total = 0.0
        for j in range(1, len(r)):
            x = r[:j]
            for i in m._d_ids.get(x, ()):
                q = float(row[i])
                if q > 0.0:
                    total += q * self._v(path + (i,), w + x, s)
            if x not in m._d_next:
                break
        kills, rec = m._scan(w, r, len(s))
        into = m._mass(row, r) - m._kill_mass(row, (w, r, len(s)), kills)
        for i, x in rec:
            q = float(row[i])
            if q > 0.0:
                into -= q * self._k(path + (i,), w + x)
        return total + into

    def _k(self, path: tuple[int, ...], w: bytes) -> float:
        m = self.m
        row = self.row(path, w, b"")
        kills, rec = m._scan(w, b"", len(w))
        k = m._kill_mass(row, (w, b"", len(w)), kills)
        for i, x in rec:
            q = float(row[i])
            if q > 0.0:
                k += q * self._k(path + (i,), w + x)
        return k
