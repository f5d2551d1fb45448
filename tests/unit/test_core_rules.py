"""Exactness of the verification rules on toy vocabularies (float64, exhaustive enumeration)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch
from scipy import stats

from hsd_serve.core import reference as ref
from hsd_serve.core.exact_match import verify_exact_match
from hsd_serve.core.sampling import (SamplingParams, gumbel_sample, process_logits,
                                     target_choice, uniforms)
from hsd_serve.core.speculative import accept_probability, residual, verify_speculative
from hsd_serve.core.vocab import Vocab, build_id_map, project_to_target


def toy_model(vocab: int, salt: str, sparsity: float = 0.0, onehot: bool = False):
    """A deterministic 'model': context tuple -> float64 distribution over ``vocab`` ids."""

    def f(ctx: tuple[int, ...]) -> list[float]:
        h = int.from_bytes(hashlib.sha256(f"{salt}|{ctx}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(h)
        logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5
        if onehot:
            return process_logits(logits, SamplingParams()).tolist()
        if sparsity:
            drop = torch.rand(vocab, generator=g, dtype=torch.float64) < sparsity
            drop[int(torch.argmax(logits))] = False
            logits = logits.masked_fill(drop, float("-inf"))
        return torch.softmax(logits, dim=0).tolist()

    return f


def fast_accept(p, q, t):
    return accept_probability(torch.tensor(p, dtype=torch.float64),
                              torch.tensor(q, dtype=torch.float64), t)


def fast_residual(p, q):
    return residual(torch.tensor(p, dtype=torch.float64),
                    torch.tensor(q, dtype=torch.float64)).tolist()


def assert_same_dist(got: dict, want: dict, tol: float = 1e-9) -> None:
    keys = set(got) | set(want)
    worst = max(abs(got.get(k, 0.0) - want.get(k, 0.0)) for k in keys)
    assert worst < tol, f"max abs difference {worst:.3g}"


@pytest.mark.parametrize("vocab,k", [(3, 1), (4, 2), (5, 3), (8, 2)])
@pytest.mark.parametrize("kind", ["dense", "sparse", "greedy"])
def test_sd_round_chain_equals_target_exactly(vocab, k, kind):
    target = toy_model(vocab, f"t{vocab}{k}{kind}", sparsity=0.4 if kind == "sparse" else 0.0,
                       onehot=kind == "greedy")
    drafter = toy_model(vocab, f"d{vocab}{k}", sparsity=0.3 if kind == "sparse" else 0.0)

    def round_fn(ctx):
        return ref.ref_speculative_round(target, drafter, ctx, k, fast_accept, fast_residual)

    got = ref.ref_generate_dist(round_fn, (0,), 3)
    want = ref.ref_target_joint(target, (0,), 3)
    assert_same_dist(got, want)


def _tli_proposal(drafter_fn, id_map: torch.Tensor, v_target: int):
    def proposal(ctx):
        q = torch.tensor(drafter_fn(ctx), dtype=torch.float64)
        q_prime, mass = project_to_target(q, id_map, v_target)
        assert float(mass) > 0
        return q_prime.tolist()

    return proposal


def _toy_vocab(strings):
    return Vocab(token_bytes=tuple(s.encode() for s in strings), special_ids=frozenset(),
                 scheme="plain")


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", ["dense", "greedy"])
def test_tli_overlapping_vocabularies_exact(k, kind):
    target_vocab = _toy_vocab(["a", "b", "ab", "ba", "c", "abc"])
    drafter_vocab = _toy_vocab(["b", "x", "a", "ab", "y", "c", "a"])  # 'a' twice: many-to-one
    id_map = build_id_map(drafter_vocab, target_vocab)
    assert id_map.tolist() == [1, -1, 0, 2, -1, 4, 0]
    target = toy_model(6, f"tli-t{k}{kind}", onehot=kind == "greedy")
    drafter = toy_model(7, f"tli-d{k}")
    proposal = _tli_proposal(drafter, id_map, 6)

    def round_fn(ctx):
        return ref.ref_speculative_round(target, proposal, ctx, k, fast_accept, fast_residual)

    assert_same_dist(ref.ref_generate_dist(round_fn, (5,), 3), ref.ref_target_joint(target, (5,), 3))


def test_tli_disjoint_vocabularies_fall_back_to_target():
    id_map = build_id_map(_toy_vocab(["x", "y"]), _toy_vocab(["a", "b", "c"]))
    assert id_map.tolist() == [-1, -1]
    q_prime, mass = project_to_target(torch.tensor([0.3, 0.7], dtype=torch.float64), id_map, 3)
    assert float(mass) == 0.0 and float(q_prime.sum()) == 0.0


def test_negative_control_wrong_proposal_is_detected():
    """Verifying with a different q than the one drafts were sampled from must break exactness."""
    target = toy_model(4, "neg-t")
    drafter = toy_model(4, "neg-d")
    other = toy_model(4, "neg-other")

    def round_fn(ctx):
        # drafts sampled from `drafter`, verifier told they came from `other`
        out = {}
        for draft in range(4):
            w = drafter(ctx)[draft]
            p, q = target(ctx), other(ctx)
            a = fast_accept(p, q, draft)
            out[(draft,)] = out.get((draft,), 0.0) + w * a
            for x, rx in enumerate(fast_residual(p, q)):
                out[(x,)] = out.get((x,), 0.0) + w * (1 - a) * rx
        return out

    got = ref.ref_generate_dist(round_fn, (0,), 1)
    want = ref.ref_target_joint(target, (0,), 1)
    assert max(abs(got.get(k, 0) - want[k]) for k in want) > 1e-3


def test_fast_rule_matches_reference_rule():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), 0)
        q = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), 0)
        for t in range(8):
            assert accept_probability(p, q, t) == pytest.approx(ref.ref_accept(p.tolist(), q.tolist(), t), abs=1e-15)
        assert residual(p, q).tolist() == pytest.approx(ref.ref_residual(p.tolist(), q.tolist()), abs=1e-15)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_slem_emits_the_targets_own_choices(temperature):
    params = SamplingParams(temperature=temperature, seed=7)
    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        m = trial % 4
        rows = process_logits(torch.randn(m + 1, 6, generator=g, dtype=torch.float64), params)
        choices = [target_choice(rows[j], params, 10 + j) for j in range(m + 1)]
        # candidates that agree with the target for a random-length prefix
        agree = int(torch.randint(0, m + 1, (1,), generator=g))
        cands = choices[:agree] + [int(x) for x in torch.randint(0, 6, (m - agree,), generator=g)]
        res = verify_exact_match(cands, rows, params, start=10)
        assert res.tokens == ref.ref_exact_match(cands, choices)
        assert res.tokens == choices[:len(res.tokens)]
        assert res.accepted == len(res.tokens) - 1


def test_slem_chain_equals_ar_for_any_candidates():
    """Chaining SLEM rounds with arbitrary candidates reproduces the AR sample path."""
    target = toy_model(5, "slem-chain")
    params = SamplingParams(temperature=1.0, seed=3)
    ctx: tuple[int, ...] = (0,)
    ar = []
    for n in range(12):
        ar.append(target_choice(torch.tensor(target(ctx + tuple(ar))), params, n))
    out: list[int] = []
    g = torch.Generator().manual_seed(5)
    while len(out) < 12:
        cands = [int(x) for x in torch.randint(0, 5, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)]
        rows = torch.tensor([target(ctx + tuple(out) + tuple(cands[:j])) for j in range(len(cands) + 1)],
                            dtype=torch.float64)
        out += verify_exact_match(cands, rows, params, start=len(out)).tokens
    assert out[:12] == ar


def test_verify_speculative_sampled_goodness_of_fit():
    """First emitted token of a sampled round, over many seeds, follows p exactly (chi-square)."""
    g = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(2, 6, generator=g, dtype=torch.float64) * 2, -1)
    counts = torch.zeros(6)
    n = 4000
    for seed in range(n):
        params = SamplingParams(temperature=1.0, seed=seed)
        d0 = gumbel_sample(q[0], seed, 0, stream=1)
        d1 = gumbel_sample(q[1], seed, 1, stream=1)
        res = verify_speculative([d0, d1], q, p, params, start=0)
        counts[res.tokens[0]] += 1
    chi = stats.chisquare(counts.numpy(), (p[0] * n).numpy())
    assert chi.pvalue > 1e-3, chi


def _gumbel_max_by_definition(probs: torch.Tensor, seed: int, position: int, stream: int) -> int:
    """The slow reference: argmax over the whole row of log p - log(-log u), u keyed by index."""
    u = uniforms(seed, position, stream, probs.shape[-1])
    return int(torch.argmax(torch.log(probs.to(torch.float64)) - torch.log(-torch.log(u))))


@pytest.mark.parametrize("support", [1, 3, 40, 200])
def test_gumbel_sample_is_gumbel_max_on_dense_and_sparse_rows(support):
    """The fast sampler (exponential race, support-only on sparse rows) draws the very token the
    definition draws for each key, so which path ran cannot change an output."""
    g = torch.Generator().manual_seed(support)
    for trial in range(300):
        row = torch.softmax(torch.randn(200, generator=g, dtype=torch.float64) * 2, -1)
        drop = torch.randperm(200, generator=g)[support:]
        row[drop] = 0.0
        row32 = row.float()
        for probs in (row, row32):
            got = gumbel_sample(probs, trial, 7, stream=1)
            assert got == _gumbel_max_by_definition(probs, trial, 7, 1)
            assert float(probs[got]) > 0


def test_gumbel_sample_on_a_sparse_row_follows_it():
    """Goodness-of-fit of the support-only path (the row has 4 of 64 ids)."""
    p = torch.zeros(64, dtype=torch.float64)
    p[[3, 17, 40, 63]] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    n = 4000
    counts = torch.bincount(torch.tensor([gumbel_sample(p, s, 0, stream=1) for s in range(n)]),
                            minlength=64)
    assert int(counts.sum() - counts[[3, 17, 40, 63]].sum()) == 0
    chi = stats.chisquare(counts[[3, 17, 40, 63]].numpy(), (p[[3, 17, 40, 63]] * n).numpy())
    assert chi.pvalue > 1e-3, chi


def test_greedy_speculative_accepts_while_argmax():
    p = torch.eye(4, dtype=torch.float64)[[2, 1, 3]]
    q = torch.full((2, 4), 0.25, dtype=torch.float64)
    assert verify_speculative([2, 1], q, p, SamplingParams(), 0).tokens == [2, 1, 3]
    assert verify_speculative([2, 0], q, p, SamplingParams(), 0).tokens == [2, 1]
    assert verify_speculative([0, 1], q, p, SamplingParams(), 0).tokens == [2]


def test_process_logits_matches_slow_definition():
    g = torch.Generator().manual_seed(2)
    for top_k, top_p, temp in itertools.product([0, 1, 3], [1.0, 0.5, 0.9], [0.5, 1.0, 2.0]):
        logits = torch.randn(7, generator=g, dtype=torch.float64)
        got = process_logits(logits, SamplingParams(temperature=temp, top_k=top_k, top_p=top_p))
        probs = torch.softmax(logits / temp, 0).tolist()
        order = sorted(range(7), key=lambda i: -logits[i])
        keep = order[:top_k] if top_k else order
        mass = sum(probs[i] for i in keep)
        kept, acc = [], 0.0
        for i in keep:
            if acc >= top_p:
                break
            kept.append(i)
            acc += probs[i] / mass
        want = [probs[i] if i in kept else 0.0 for i in range(7)]
        s = sum(want)
        assert got.tolist() == pytest.approx([w / s for w in want], abs=1e-12)


def test_keyed_randomness_depends_only_on_key():
    a = uniforms(5, 17, 2, 4)
    assert torch.equal(a, uniforms(5, 17, 2, 4))
    assert not torch.equal(a, uniforms(5, 18, 2, 4))
    assert not torch.equal(a, uniforms(5, 17, 3, 4))
    assert not torch.equal(a, uniforms(6, 17, 2, 4))


def test_sampling_params_reject_bad_values():
    for bad in [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=-2), dict(seed=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_common_prefix_len_against_a_slow_reference():
    """``core.prefix.common_prefix_len`` (caches, drafted-ahead chains, drafter text) equals the
    plain definition on random lists and bytes, with ``start`` and ``limit``."""
    import random

    from hsd_serve.core.prefix import common_prefix_len

    def slow(a, b, start=0, limit=None):
        n = min(len(a), len(b), limit if limit is not None else 10**9)
        i = 0
        while i < n and (i < start or a[i] == b[i]):
            i += 1
        return i

    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.randrange(3) for _ in range(rng.randrange(8))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(5))]
        start = rng.randrange(0, 4)
        limit = rng.choice([None, rng.randrange(0, 9)])
        shared = slow(a, b, 0, limit)
        start = min(start, shared)  # the caller's promise: the first `start` items are equal
        assert common_prefix_len(a, b, start, limit) == slow(a, b, start, limit) == shared
        assert common_prefix_len(bytes(a), bytearray(b), start, limit) == shared
