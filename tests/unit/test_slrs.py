"""SLRS: ψ against brute force, exactness of one round, sampled goodness of fit, budget.

The drafter is a deterministic toy model: its next-token distribution for a context (a tuple of
drafter ids) comes from a seeded hash of the tuple.  Everything is float64.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

from hsd_serve.core.slrs import (SLRS, SLRSBudgetError, _Round, accept_probability,
                                 residual_acceptance)
from hsd_serve.core.slrs_reference import brute_force_psi, mixture, round_output_distribution


@dataclass(frozen=True)
class V:
    token_bytes: tuple[bytes, ...]
    special_ids: frozenset[int] = frozenset()


class ToyDrafter:
    """``path_dists`` from a seeded hash of the context; counts calls and distinct contexts."""

    def __init__(self, n: int, seed: int, *, kind: str = "dense", width: int | None = None,
                 context: tuple[int, ...] = (), k: int = 2) -> None:
        self.n, self.seed, self.kind, self.k = n, seed, kind, k
        self.width = n if width is None else width
        self.context = context
        self.cache: dict[tuple[int, ...], list[float]] = {}
        self.calls = 0
        self.seen: set[tuple[int, ...]] = set()

    def dist(self, ctx: tuple[int, ...]) -> list[float]:
        r = self.cache.get(ctx)
        if r is None:
            rng = random.Random(f"{self.seed}:{self.kind}:{ctx}")
            r = [rng.random() ** 2 + 1e-3 for _ in range(self.width)]
            if self.kind == "sparse":  # top-k style zeros, never all zero
                keep = set(rng.sample(range(self.width), max(1, self.width // 2)))
                r = [x if i in keep else 0.0 for i, x in enumerate(r)]
            elif self.kind == "topk":  # at most k non-zero entries
                keep = set(rng.sample(range(self.width), min(self.k, self.width)))
                r = [x if i in keep else 0.0 for i, x in enumerate(r)]
            elif self.kind == "greedy":
                j = max(range(self.width), key=lambda i: r[i])
                r = [1.0 if i == j else 0.0 for i in range(self.width)]
            t = sum(r)
            r = [x / t for x in r]
            self.cache[ctx] = r
        return r

    def path_dists(self, path: tuple[int, ...]) -> torch.Tensor:
        self.calls += 1
        rows = []
        for j in range(len(path) + 1):
            self.seen.add(tuple(path[:j]))
            rows.append(self.dist(self.context + tuple(path[:j])))
        return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------- toy vocabularies
T_FULL = V((b"a", b"b", b"c", b"ab", b"abc", b"ba", b"bca", b""), frozenset({7}))
D_BPE = V((b"a", b"b", b"c", b"ab", b"ba", b"abc", b""))  # EOS = 6 (empty bytes, also via eos ids)
D_BYTE = V((b"a", b"b", b"c", b""))
T_NOCOV = V((b"ab", b"bc", b"abc", b"ca", b"cab", b""), frozenset({5}))  # no single bytes: ψ(∅) > 0
T_DISJ = V((b"aa", b"abab", b"c", b"bb", b"ba"))
# "d" leaves the target trie; "<eos>" is special
D_DISJ = V((b"aa", b"b", b"ab", b"bab", b"c", b"d", b"<eos>"), frozenset({6}))
T_DUP = V((b"a", b"b", b"ab", b"ab", b"c", b"abc", b"a"))  # ids 3 and 6 duplicate lower ids
D_DUP = V((b"a", b"a", b"b", b"ab", b"c", b"ab", b"bc", b""))
D_NOEOS = V((b"a", b"b", b"c", b"ab", b"ba", b"abc"))

CASES = {
    # name: (drafter vocab, target vocab, drafter eos ids, kwargs)
    "bpe": (D_BPE, T_FULL, {6}, {}),
    "byte": (D_BYTE, T_FULL, {3}, {}),
    "no_coverage": (D_BPE, T_NOCOV, {6}, {}),
    "disjoint": (D_DISJ, T_DISJ, set(), {}),
    "duplicates": (D_DUP, T_DUP, {7}, {}),
    "no_eos": (D_NOEOS, T_FULL, set(), {}),
    "max_target_bytes": (D_BPE, T_FULL, {6}, {"max_target_bytes": 2}),
}


def make(case: str) -> tuple[SLRS, V, V, set[int], dict]:
    dv, tv, eos, kw = CASES[case]
    return SLRS(dv, tv, drafter_eos_ids=frozenset(eos), **kw), dv, tv, eos, kw


def brute(oracle, dv, tv, eos, kw) -> dict[int | None, float]:
    return brute_force_psi(oracle, dv, tv, drafter_eos_ids=eos,
                           max_target_bytes=kw.get("max_target_bytes"))


def p_of(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g, dtype=torch.float64) ** 3
    if kind == "sparse":
        keep = torch.topk(p, max(2, n // 3)).indices
        q = torch.zeros_like(p)
        q[keep] = p[keep]
        p = q
    elif kind == "onehot":
        p = torch.zeros(n, dtype=torch.float64)
        p[int(torch.randint(n, (1,), generator=g))] = 1.0
    return p / p.sum()


# ---------------------------------------------------------------------- ψ exactness
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["dense", "sparse", "greedy"])
def test_psi_matches_brute_force(case, kind):
    m, dv, tv, eos, kw = make(case)
    for seed in range(3):
        o = ToyDrafter(len(dv.token_bytes), seed, kind=kind)
        bf = brute(o, dv, tv, eos, kw)
        psi, empty = m.psi_table(o)
        for t in range(len(tv.token_bytes)):
            assert abs(float(psi[t]) - bf.get(t, 0.0)) <= 1e-12, (case, kind, seed, t)
            assert abs(m.psi(o, t) - bf.get(t, 0.0)) <= 1e-12
        assert abs(empty - bf.get(None, 0.0)) <= 1e-12
        assert abs(m.psi_empty(o) - bf.get(None, 0.0)) <= 1e-12
        assert abs(float(psi.sum()) + empty - 1.0) <= 1e-12


def test_cases_cover_what_they_claim():
    o = ToyDrafter(7, 0)
    m, *_ = make("no_coverage")
    assert m.psi_empty(o) > 0.05
    m, *_ = make("duplicates")
    o = ToyDrafter(len(D_DUP.token_bytes), 0)
    assert m.psi(o, 3) == 0.0 and m.psi(o, 6) == 0.0 and m.psi(o, 2) > 0
    m, *_ = make("max_target_bytes")
    assert m.psi(ToyDrafter(7, 0), 4) == 0.0  # "abc" excluded: 3 bytes > 2
    m, *_ = make("disjoint")
    assert m.psi_empty(ToyDrafter(len(D_DISJ.token_bytes), 0)) > 0  # "d" and "<eos>" leave the trie


def test_padded_drafter_rows_are_terminal():
    # the oracle returns wider rows than the drafter vocabulary (embedding padding): extra ids end
    # the stream in both the module and the brute force
    m, dv, tv, eos, kw = make("bpe")
    o = ToyDrafter(len(dv.token_bytes), 5, width=len(dv.token_bytes) + 3)
    bf = brute(o, dv, tv, eos, kw)
    psi, empty = m.psi_table(o)
    assert max(abs(float(psi[t]) - bf.get(t, 0.0)) for t in range(8)) <= 1e-12
    assert abs(empty - bf.get(None, 0.0)) <= 1e-12


def test_special_drafter_token_with_bytes_is_terminal():
    dv = V((b"a", b"b", b"ab", b"<s>"), frozenset({3}))
    tv = V((b"a", b"b", b"ab", b"bb", b"aba"))
    m = SLRS(dv, tv)
    for seed in range(3):
        o = ToyDrafter(4, seed)
        bf = brute_force_psi(o, dv, tv)
        psi, empty = m.psi_table(o)
        assert max(abs(float(psi[t]) - bf.get(t, 0.0)) for t in range(5)) <= 1e-12
        assert abs(empty - bf.get(None, 0.0)) <= 1e-12 and empty > 0


_strs = st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=7)


@settings(max_examples=60, deadline=None)
@given(tstrs=_strs, dstrs=st.lists(st.text(alphabet="abcd", min_size=1, max_size=3),
                                   min_size=1, max_size=6),
       with_eos=st.booleans(), seed=st.integers(0, 10**6), pseed=st.integers(0, 10**6),
       kind=st.sampled_from(["dense", "sparse", "topk"]), cut=st.sampled_from([None, 1, 2]))
def test_random_vocabularies_psi_and_round_exact(tstrs, dstrs, with_eos, seed, pseed, kind, cut):
    tv = V(tuple(s.encode() for s in tstrs))
    dv = V(tuple(s.encode() for s in dstrs) + ((b"",) if with_eos else ()))
    eos = {len(dstrs)} if with_eos else set()
    m = SLRS(dv, tv, drafter_eos_ids=frozenset(eos), max_forwards=10**9, max_target_bytes=cut)
    o = ToyDrafter(len(dv.token_bytes), seed, kind=kind)
    bf = brute_force_psi(o, dv, tv, drafter_eos_ids=eos, max_target_bytes=cut)
    psi, empty = m.psi_table(o)
    for t in range(len(tv.token_bytes)):
        assert abs(float(psi[t]) - bf.get(t, 0.0)) <= 1e-12
    assert abs(empty - bf.get(None, 0.0)) <= 1e-12
    p = p_of("dense", len(tv.token_bytes), pseed)
    assert torch.allclose(m.output_distribution(o, p), p, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------- round exactness
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pkind", ["dense", "sparse", "onehot"])
def test_round_output_distribution_is_p(case, pkind):
    m, dv, tv, eos, kw = make(case)
    n = len(tv.token_bytes)
    for seed in range(3):
        o = ToyDrafter(len(dv.token_bytes), seed)
        p = p_of(pkind, n, 100 + seed)
        bf = brute(o, dv, tv, eos, kw)
        q_ref = mixture(bf, p, n)
        q = m.proposal_distribution(o, p)
        assert torch.allclose(q, q_ref, atol=1e-12, rtol=0)
        assert abs(float(q.sum()) - 1.0) <= 1e-12
        # the module's own exact law of a round
        assert torch.allclose(m.output_distribution(o, p), p, atol=1e-9, rtol=0)
        # brute-force ψ' through the module's decision probabilities
        out = round_output_distribution(q_ref, p, accept_prob=accept_probability,
                                        residual_keep=residual_acceptance)
        assert torch.allclose(out, p, atol=1e-9, rtol=0)


def test_p_wider_than_target_vocabulary():
    m, dv, tv, eos, kw = make("no_coverage")
    o = ToyDrafter(7, 3)
    p = p_of("dense", len(tv.token_bytes) + 4, 9)  # ids beyond the vocabulary: no string
    assert torch.allclose(m.output_distribution(o, p), p, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------- negative controls
def _single_path_psi(oracle, dv, tv) -> dict[int, float]:
    """WRONG on purpose: P(s ⊑ B) from the byte-by-byte tokenization only (one path), minus the
    same for the minimal extensions — what you get if you score only one drafter path."""
    tb = [bytes(b) for b in dv.token_bytes]
    ids = {b: i for i, b in reversed(list(enumerate(tb))) if b}
    strings = {bytes(b): i for i, b in reversed(list(enumerate(tv.token_bytes)))
               if b and i not in tv.special_ids}

    def prefix_prob(s: bytes) -> float:
        path, prob = (), 1.0
        for c in s:
            i = ids[bytes((c,))]
            prob *= float(oracle.path_dists(path)[-1][i])
            path += (i,)
        return prob

    out = {}
    for s, t in strings.items():
        ext = [x for x in strings if x.startswith(s) and x != s
               and not any(y != s and y != x and y.startswith(s) and x.startswith(y)
                           for y in strings)]
        out[t] = prefix_prob(s) - sum(prefix_prob(x) for x in ext)
    return out


def test_negative_control_single_path_psi_does_not_match():
    m, dv, tv, eos, kw = make("bpe")
    o = ToyDrafter(len(dv.token_bytes), 1)
    bf = brute(o, dv, tv, eos, kw)
    wrong = _single_path_psi(o, dv, tv)
    assert max(abs(wrong[t] - bf.get(t, 0.0)) for t in wrong) > 1e-3
    # ...while the same single-path formula IS right for a byte-level drafter (one path only)
    m2, dv2, tv2, eos2, kw2 = make("byte")
    o2 = ToyDrafter(len(dv2.token_bytes), 1)
    bf2 = brute(o2, dv2, tv2, eos2, kw2)
    right = _single_path_psi(o2, dv2, tv2)
    assert max(abs(right[t] - bf2.get(t, 0.0)) for t in right) <= 1e-12


def test_negative_control_without_extension_subtraction():
    # ψ("ab") must subtract the mass of the longer match "abc": scoring "ab" with a target
    # vocabulary that lacks "abc" gives P("ab" ⊑ B), which is NOT ψ("ab")
    m, dv, tv, eos, kw = make("bpe")
    o = ToyDrafter(len(dv.token_bytes), 2)
    bf = brute(o, dv, tv, eos, kw)
    tv_short = V(tuple(b"" if b == b"abc" else b for b in tv.token_bytes), tv.special_ids)
    prefix_prob = SLRS(dv, tv_short, drafter_eos_ids=frozenset(eos)).psi(o, 3)
    assert abs(prefix_prob - (bf[3] + bf[4])) <= 1e-12  # = P("ab" ⊑ B)
    assert prefix_prob - bf[3] > 1e-3
    assert abs(make("bpe")[0].psi(o, 3) - bf[3]) <= 1e-12


def test_negative_control_proposal_without_mixture_is_not_lossless():
    m, dv, tv, eos, kw = make("no_coverage")
    o = ToyDrafter(7, 0)
    p = p_of("dense", len(tv.token_bytes), 4)
    psi, empty = m.psi_table(o)
    assert empty > 0.05
    out = round_output_distribution(psi, p)  # ψ instead of ψ' = ψ + ψ(∅)p: not a distribution
    assert float((out - p).abs().max()) > 1e-3


# ---------------------------------------------------------------------- sampled path
def _chi2(tokens: list[int], p: torch.Tensor) -> float:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=p.shape[0]).to(torch.float64)
    assert float(counts[p == 0].sum()) == 0.0, "emitted a token with p = 0"
    exp = p * n
    obs, e = [], []
    small_o = small_e = 0.0
    for i in range(p.shape[0]):
        if exp[i] == 0:
            continue
        if exp[i] < 5:
            small_o += float(counts[i])
            small_e += float(exp[i])
        else:
            obs.append(float(counts[i]))
            e.append(float(exp[i]))
    if small_e > 0:
        obs.append(small_o)
        e.append(small_e)
    return float(stats.chisquare(obs, e).pvalue)


@pytest.mark.parametrize("case", ["bpe", "no_coverage"])
def test_step_goodness_of_fit(case):
    m, dv, tv, eos, kw = make(case)
    o = ToyDrafter(len(dv.token_bytes), 1)
    n = len(tv.token_bytes)
    if case == "bpe":
        p = torch.tensor([0.3, 0.05, 0.05, 0.1, 0.05, 0.2, 0.25, 0.0], dtype=torch.float64)
    else:  # ψ(∅) ≈ 0.66 here, so P(reject) ≤ 0.34; most of p sits on the special id 5
        p = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.1, 0.7], dtype=torch.float64)
    res = [m.step(o, p, seed=s, position=11) for s in range(4000)]
    tokens = [r.token for r in res]
    rejected = sum(not r.accepted for r in res)
    assert 0.15 * len(res) < rejected < 0.9 * len(res)  # rejection happens often
    assert sum(r.residual_tries >= 2 for r in res) > 100  # the residual loop repeats often
    if case == "no_coverage":
        assert sum(r.proposed is None for r in res) > 200  # the ∅ mixture branch is exercised
    assert _chi2(tokens, p) > 1e-3
    # negative control: the same samples do NOT fit the proposal distribution ψ'
    q = m.proposal_distribution(o, p)[:n]
    assert _chi2_against(tokens, q) < 1e-6


def _chi2_against(tokens: list[int], q: torch.Tensor) -> float:
    q = q.clone()
    counts = torch.bincount(torch.tensor(tokens), minlength=q.shape[0]).to(torch.float64)
    mask = q > 0
    if float(counts[~mask].sum()) > 0:
        return 0.0
    return float(stats.chisquare(counts[mask].tolist(), (q[mask] * len(tokens)).tolist()).pvalue)


def test_step_is_keyed_and_reports_consistently():
    m, dv, tv, eos, kw = make("bpe")
    p = p_of("dense", 8, 3)
    for s in range(200):
        a = m.step(ToyDrafter(7, 4), p, seed=s, position=2)
        b = m.step(ToyDrafter(7, 4), p, seed=s, position=2)
        assert a.token == b.token and a.drafted_path == b.drafted_path
        assert a.psi == b.psi or (math.isnan(a.psi) and math.isnan(b.psi))
        assert a.drafted_bytes == b"".join(dv.token_bytes[i] for i in a.drafted_path)
        if a.proposed is not None:
            assert tv.token_bytes[a.proposed] and a.drafted_bytes.startswith(
                tv.token_bytes[a.proposed])
            assert a.proposal == a.proposed
        if a.accepted:
            assert a.token == a.proposal and a.residual_tries == 0
        assert a.forwards <= a.contexts
        if a.residual_tries == 0 and not a.residual_exact:
            assert a.contexts <= m.estimated_forwards
    tokens = {m.step(ToyDrafter(7, 4), p, seed=1, position=k).token for k in range(40)}
    assert len(tokens) > 1  # the position is part of the key


def test_greedy_target_emits_argmax():
    for case in ["bpe", "no_coverage", "disjoint"]:
        m, dv, tv, eos, kw = make(case)
        n = len(tv.token_bytes)
        for s in range(100):
            p = p_of("onehot", n, s)
            r = m.step(ToyDrafter(len(dv.token_bytes), s), p, seed=s, position=0)
            assert r.token == int(torch.argmax(p))
            if r.accepted:
                assert r.proposal == r.token


def test_step_with_greedy_drafter_uses_one_chain():
    m, dv, tv, eos, kw = make("bpe")
    p = p_of("dense", 8, 1)
    for s in range(50):
        o = ToyDrafter(7, s, kind="greedy")
        r = m.step(o, p, seed=s, position=0)
        assert r.token in range(8)
        assert r.contexts <= m.estimated_forwards or r.residual_tries > 0


# ---------------------------------------------------------------------- residual loop
def test_residual_loop_terminates_and_is_exact_when_psi_close_to_p():
    m0, dv, tv, eos, kw = make("bpe")
    o = ToyDrafter(7, 6)
    psi, empty = m0.psi_table(o)
    p0 = psi / (1 - empty)  # the fixed point p0 = ψ + ψ(∅)·p0, i.e. ψ' = p0 exactly
    # p within ~1e-3 of ψ': the residual mass α is tiny, so the loop would need ~1/α tries
    g = torch.Generator().manual_seed(0)
    p = p0 * (1 + 2e-3 * (torch.rand(8, generator=g, dtype=torch.float64) - 0.5))
    p = p / p.sum()
    q = m0.proposal_distribution(o, p)
    alpha = float((p - q).clamp(min=0).sum())
    assert 0 < alpha < 2e-3
    res = norm = (p - q).clamp(min=0)
    res = norm / norm.sum()
    m = SLRS(dv, tv, drafter_eos_ids=frozenset(eos), max_residual_tries=30)
    draws = [m.sample_residual(o, p, seed=s, position=5) for s in range(2000)]
    assert all(tries <= 30 for _, tries, _ in draws)
    assert sum(exact for _, _, exact in draws) > 1300  # the exact fallback carried most draws
    assert sum(not exact for _, _, exact in draws) > 0  # ...and the loop itself some
    assert _chi2([t for t, _, _ in draws], res) > 1e-3
    # the whole round stays exact and rarely rejects
    assert torch.allclose(m.output_distribution(o, p), p, atol=1e-9, rtol=0)
    rounds = [m.step(o, p, seed=s, position=5) for s in range(300)]
    assert sum(not r.accepted for r in rounds) < 20


def test_residual_loop_without_tries_is_the_exact_residual():
    m, dv, tv, eos, kw = make("bpe")
    m = SLRS(dv, tv, drafter_eos_ids=frozenset(eos), max_residual_tries=0)
    o = ToyDrafter(7, 1)
    p = p_of("dense", 8, 77)
    q = m.proposal_distribution(o, p)
    res = (p - q).clamp(min=0)
    res = res / res.sum()
    draws = [m.sample_residual(o, p, seed=s, position=1) for s in range(2000)]
    assert all(exact and tries == 0 for _, tries, exact in draws)
    assert _chi2([t for t, _, _ in draws], res) > 1e-3
    out = [m.step(o, p, seed=s, position=1).token for s in range(2000)]
    assert _chi2(out, p) > 1e-3


def test_p_equal_to_proposal_always_accepts():
    m, dv, tv, eos, kw = make("no_coverage")
    o = ToyDrafter(7, 2)
    # ψ' depends on p only through ψ(∅)p; p = ψ/(1-ψ(∅)) solves p = ψ + ψ(∅)p
    psi, empty = m.psi_table(o)
    p = psi / (1 - empty)
    assert torch.allclose(m.proposal_distribution(o, p), p, atol=1e-12, rtol=0)
    rounds = [m.step(o, p, seed=s, position=0) for s in range(300)]
    assert all(r.accepted for r in rounds)
    tok, tries, exact = m.sample_residual(o, p, seed=0, position=0)  # no residual: still terminates
    assert 0 <= tok < 6


# ---------------------------------------------------------------------- cost and budget
@pytest.mark.parametrize("case", list(CASES))
def test_contexts_estimate_is_exact_per_token(case):
    m, dv, tv, eos, kw = make(case)
    worst = 0
    for t in range(len(tv.token_bytes)):
        o = ToyDrafter(len(dv.token_bytes), 3)
        rnd = _Round(m, o)
        rnd.psi_prime(t, 0.5)
        assert len(rnd.rows) == m.contexts_needed(t), (case, t)
        assert len(o.seen) == len(rnd.rows)  # every row read is cached once, none wasted
        assert rnd.forwards <= len(rnd.rows)
        worst = max(worst, len(rnd.rows))
    assert worst == m.estimated_forwards


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 2])
def test_drafter_top_k_bounds_forwards_and_keeps_psi_exact(case, k):
    dv, tv, eos, kw = CASES[case]
    m = SLRS(dv, tv, drafter_eos_ids=frozenset(eos), drafter_top_k=k, **kw)
    assert m.estimated_forwards <= make(case)[0].estimated_forwards
    for seed in range(4):
        o = ToyDrafter(len(dv.token_bytes), seed, kind="topk", k=k)
        bf = brute(o, dv, tv, eos, kw)
        for t in range(len(tv.token_bytes)):
            rnd = _Round(m, o)
            rnd.psi_prime(t, 0.5)
            # calls are made only for needed contexts (non-zero path probability); rows riding
            # along a prefetched chain may be more
            assert rnd.forwards <= m.estimated_forwards
            assert abs(rnd.psi(t) - bf.get(t, 0.0)) <= 1e-12
        p = p_of("dense", len(tv.token_bytes), seed)
        assert torch.allclose(m.output_distribution(o, p), p, atol=1e-9, rtol=0)
        for s in range(20):
            r = m.step(o, p, seed=s, position=0)
            if r.residual_tries == 0 and not r.residual_exact:
                assert r.forwards <= m.estimated_forwards


def test_byte_level_drafter_is_cheap_for_long_target_token():
    tv = V(tuple(bytes((i,)) for i in range(256)) + (b"abcdefgh",))
    dv = V(tuple(bytes((i,)) for i in range(256)) + (b"",))
    m = SLRS(dv, tv, drafter_eos_ids=frozenset({256}), max_forwards=64)
    assert m.estimated_forwards == 8  # the 8 prefixes of "abcdefgh"; extensions of "a" reuse them
    o = ToyDrafter(257, 0)
    rnd = _Round(m, o)
    rnd.psi_prime(256, 0.5)
    assert len(rnd.rows) == 8 and rnd.forwards == 1  # one chain, one call
    assert "byte-level" in m.drafter_kind


def test_bpe_drafter_against_long_target_tokens_exceeds_budget():
    toks = [bytes(x) for n in range(1, 5) for x in __import__("itertools").product(b"ab", repeat=n)]
    dv = V(tuple(toks) + (b"",))
    tv = V((b"a", b"b", b"ab" * 6, b"ba" * 5))
    est = SLRS(dv, tv, max_forwards=10**9).estimated_forwards
    assert est > 64
    with pytest.raises(SLRSBudgetError) as e:
        SLRS(dv, tv, max_forwards=64)
    msg = str(e.value)
    # the worst token is the 1-byte "a": ψ("a") must subtract P("abababababab" ⊑ B), and that
    # needs every segmentation of the long extension's prefixes
    assert str(est) in msg and "max_forwards=64" in msg and "b'a'" in msg
    assert "b'abababababab' (12 bytes)" in msg and "multi-byte" in msg
    assert isinstance(e.value, ValueError)
    # leaving long target tokens to the residual brings it back under budget
    assert SLRS(dv, tv, max_forwards=64, max_target_bytes=4).estimated_forwards <= 64


def test_budget_estimate_matches_running_cost_on_bpe_case():
    toks = [bytes(x) for n in range(1, 4) for x in __import__("itertools").product(b"ab", repeat=n)]
    dv = V(tuple(toks))
    tv = V((b"a", b"b", b"abab", b"aba"))
    m = SLRS(dv, tv, max_forwards=10**6)
    o = ToyDrafter(len(toks), 0)
    rnd = _Round(m, o)
    rnd.psi_prime(2, 0.5)
    assert len(rnd.rows) == m.contexts_needed(2) > 4  # several tokenizations of "abab"'s prefixes
    bf = brute_force_psi(o, dv, tv)
    assert abs(rnd.psi(2) - bf[2]) <= 1e-12


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_raise():
    m, dv, tv, eos, kw = make("bpe")
    o = ToyDrafter(7, 0)
    for bad in [torch.tensor([-0.1, 1.1]), torch.tensor([float("nan"), 1.0]), torch.zeros(3),
                torch.tensor([float("inf"), 1.0]), torch.tensor([float("-inf"), 1.0]),
                torch.ones(2, 2), torch.tensor([])]:
        with pytest.raises(ValueError):
            m.step(o, bad, seed=0, position=0)

    class BadOracle:
        def path_dists(self, path):
            return torch.ones(len(path) + 2, 7)

    with pytest.raises(ValueError, match="path_dists"):
        m.step(BadOracle(), p_of("dense", 8, 0), seed=0, position=0)

    class NegOracle:
        def path_dists(self, path):
            return -torch.ones(len(path) + 1, 7)

    with pytest.raises(ValueError, match="not a distribution"):
        m.step(NegOracle(), p_of("dense", 8, 0), seed=0, position=0)
    with pytest.raises(ValueError):
        SLRS(dv, tv, max_forwards=0)
    with pytest.raises(ValueError):
        SLRS(dv, tv, max_target_bytes=0)
