"""Sampling stays exact over many rounds, with rejections that force positions to be drafted again.

The toy pair of ``tests.support.toy``: the target emits i.i.d. tokens with law ``TARGET_P``, so
under every lossless method each generated token, given all earlier ones, follows ``TARGET_P``.
The drafter is a bigram model whose row depends on which tokenization of the committed text it
holds, and its first draft (``"a"``, 93%) is usually rejected with the target emitting ``"ab"``:
exactly the situation in which a discarded draft decides the drafter's next context (DESIGN.md §3
"Independence").  The statistic is Pearson's chi-square over the first token and, for every later
position, the transitions (previous token → token); under the null those are the counts of a
Markov chain with known transition law, so the statistic is chi-square with ``3 + 5·4·3`` degrees
of freedom.

A negative control re-runs TLI with every draft keyed as before the fix (by position only,
``attempt=0``) and requires the same statistic to reject it: the test can fail, and fails on the
bug it guards against.
"""

from __future__ import annotations

import collections

import pytest
from scipy import stats

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.local import Engine, LocalDrafter
from hsd_serve.engine.types import GenerationRequest
from tests.support.toy import TARGET_P, build_toy_pair

PROMPT = "c"  # its last drafter token selects the drafter's "other" row
NEW_TOKENS = 6
LOOKAHEAD = 3
PARAMS = dict(temperature=1.0)


class RecordingDrafter(LocalDrafter):
    """The in-process drafter port, noting every draft call (request, position, attempt)."""

    def __init__(self, worker, force_attempt=None):
        super().__init__(worker)
        self.calls: list[tuple[str, int, int, int]] = []
        self.force_attempt = force_attempt

    async def draft(self, rid, k, position, *, committed=None, generated=None, attempt=0):
        if self.force_attempt is not None:  # the keying before the fix: by position only
            attempt = self.force_attempt
        d = await super().draft(rid, k, position, committed=committed, generated=generated,
                                attempt=attempt)
        self.calls.append((rid, position, len(d.target_ids or d.drafter_ids), attempt))
        return d


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    dirs = build_toy_pair(tmp_path_factory.mktemp("toy-pair"))
    return {name: LoadedModel(ModelSpec(str(path))) for name, path in dirs.items()}


def _engine(toy, method, force_attempt=None, overlap=False, overlap_miss="plain"):
    drafter = toy["drafter_same_vocab"] if method == "sd" else toy["drafter"]
    engine = Engine(toy["target"], None if method == "ar" else drafter, overlap=overlap,
                    overlap_miss=overlap_miss)
    port = None
    if method != "ar":
        port = RecordingDrafter(engine.drafter_worker, force_attempt)
        engine.coordinator.drafter = port
    return engine, port


def _run(engine, method, seeds):
    strings = engine.target.vocab.token_bytes
    out, drafted, accepted = [], 0, 0
    engine.ready = engine.plain = 0  # rounds that used a draft made ahead / a plain step (overlap)
    for seed in range(seeds):
        res = engine.generate(GenerationRequest(PROMPT, max_new_tokens=NEW_TOKENS, method=method,
                                                lookahead=LOOKAHEAD,
                                                params=SamplingParams(seed=seed, **PARAMS)))
        assert len(res.token_ids) == NEW_TOKENS and res.finish_reason == "length"
        out.append([strings[t].decode() for t in res.token_ids])
        drafted += res.stats.drafted
        accepted += res.stats.accepted
        engine.ready += res.stats.ahead_ready
        engine.plain += res.stats.ahead_plain
    return out, drafted, accepted


def chi_square(samples: list[list[str]]) -> tuple[float, dict]:
    """(p-value, the worst cell) of the first-token law and every position's transitions."""
    cells = collections.Counter()
    for s in samples:
        cells[0, "", s[0]] += 1
        for i in range(1, len(s)):
            cells[i, s[i - 1], s[i]] += 1
    rows = collections.Counter()
    for (i, prev, _), c in cells.items():
        rows[i, prev] += c
    assert set(t for *_, t in cells) <= set(TARGET_P), "a token the target never emits"
    obs, exp, worst = [], [], None
    for (i, prev), n in rows.items():
        for t, p in TARGET_P.items():
            o, e = cells[i, prev, t], n * p
            obs.append(o)
            exp.append(e)
            z = (o - e) / (e * (1 - p)) ** 0.5
            if worst is None or abs(z) > abs(worst["z"]):
                worst = {"position": i, "after": prev, "token": t, "observed": o / n,
                         "expected": p, "n": n, "z": round(z, 2)}
    assert min(exp) >= 5, "too few samples per cell for the chi-square approximation"
    dof = len(obs) - len(rows)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(stats.chi2.sf(stat, dof)), worst


def _redrafted(calls) -> int:
    """Positions drafted again after an earlier draft of the same request covered them."""
    covered: dict[str, set] = collections.defaultdict(set)
    again = 0
    for rid, position, n, _ in calls:
        span = set(range(position, position + n))
        again += len(span & covered[rid])
        covered[rid] |= span
    return again


@pytest.mark.parametrize("method,seeds", [("tli", 3000), ("sd", 1500), ("slrs", 1500),
                                          ("ar", 1500)])
def test_every_later_token_follows_the_target_given_the_earlier_ones(toy, method, seeds):
    engine, port = _engine(toy, method)
    samples, drafted, accepted = _run(engine, method, seeds)
    if port is not None:
        assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)
        attempts = collections.defaultdict(list)
        for rid, _, _, attempt in port.calls:
            attempts[rid].append(attempt)
        assert all(len(set(a)) == len(a) for a in attempts.values()), "an attempt key reused"
        if method != "slrs":  # SLRS drafts one target token per round: nothing to re-draft
            assert _redrafted(port.calls) > seeds // 2, "no position was ever drafted twice"
    pvalue, worst = chi_square(samples)
    assert pvalue > 1e-3, (method, pvalue, worst)


@pytest.mark.parametrize("method,miss,seeds", [("tli", "plain", 3000), ("tli", "wait", 3000),
                                               ("sd", "plain", 1500)])
def test_drafting_ahead_keeps_every_later_token_the_targets(toy, method, miss, seeds):
    """With overlap the drafter continues each draft (guessing the bonus token) while the target
    verifies it, and a round uses that draft when the committed tokens went its way: a choice
    made from the committed tokens and the drafter's own draws only, so the law is unchanged —
    and rounds did use drafts made ahead.  ``overlap_miss="plain"``: a round with no usable
    draft is the target's plain step (its own draw) while the drafter drafts ahead from the
    committed tokens, guessing that step's token; the next round uses the draft when the guess
    was the target's draw — again a choice from committed tokens and the drafter's draws."""
    engine, port = _engine(toy, method, overlap=True, overlap_miss=miss)
    samples, drafted, accepted = _run(engine, method, seeds)
    assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)
    assert engine.ready >= seeds // 100, engine.ready  # the overlap path ran
    if miss == "plain":  # every request's first round at least
        assert engine.plain >= seeds, engine.plain
    else:
        assert engine.plain == 0
    attempts = collections.defaultdict(list)
    for rid, _, _, attempt in port.calls:
        attempts[rid].append(attempt)
    assert all(len(set(a)) == len(a) for a in attempts.values()), "an attempt key reused"
    pvalue, worst = chi_square(samples)
    assert pvalue > 1e-3, (method, pvalue, worst)


def test_slem_sampling_emits_exactly_what_ar_emits(toy):
    """SLEM emits only the target's own position-keyed samples: equal to AR seed by seed."""
    slem, port = _engine(toy, "slem")
    ar, _ = _engine(toy, "ar")
    for seed in range(150):
        req = dict(max_new_tokens=NEW_TOKENS, lookahead=LOOKAHEAD,
                   params=SamplingParams(seed=seed, **PARAMS))
        a = ar.generate(GenerationRequest(PROMPT, method="ar", **req))
        s = slem.generate(GenerationRequest(PROMPT, method="slem", **req))
        assert s.token_ids == a.token_ids, seed
    assert _redrafted(port.calls) > 0


def test_negative_control_position_keyed_drafts_are_detected(toy):
    """Before the fix a re-drafted position reused its key; the statistic must reject that."""
    engine, port = _engine(toy, "tli", force_attempt=0)
    samples, _, _ = _run(engine, "tli", 3000)
    assert _redrafted(port.calls) > 1500
    pvalue, worst = chi_square(samples)
    assert pvalue < 1e-3, (pvalue, worst)
