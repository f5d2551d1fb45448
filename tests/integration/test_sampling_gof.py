"""Sampling is exact: the first two emitted tokens over many seeds follow the target's own
processed distribution (chi-square), for SD, TLI, SLEM and SLRS through the full engine.

Target: the real pretrained llama2.c stories260K (512-token SentencePiece vocabulary).
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from hsd_serve.core.sampling import SamplingParams, process_logits
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest

PROMPT = "Once upon a time, there was a"
SEEDS = 1200
PARAMS = dict(temperature=1.3, top_p=0.98)


def exact_joint(model, prompt_ids, params):
    """{(t1, t2): p} of the target alone, from direct forwards (no cache, float64)."""
    with torch.inference_mode():
        logits = model.model(torch.tensor([prompt_ids])).logits[0, -1].double()
        p1 = process_logits(logits, params)
        joint = {}
        for t1 in torch.nonzero(p1 > 1e-6).flatten().tolist():
            lg = model.model(torch.tensor([prompt_ids + [t1]])).logits[0, -1].double()
            p2 = process_logits(lg, params)
            for t2 in torch.nonzero(p2 > 0).flatten().tolist():
                joint[t1, t2] = float(p1[t1] * p2[t2])
    return joint


def chi_square_pvalue(counts: dict, expected: dict, n: int) -> float:
    keys = sorted(expected, key=lambda k: -expected[k])
    obs, exp = [], []
    rest_o, rest_e = 0, 0.0
    for key in keys:
        e = expected[key] * n
        if e >= 5:
            obs.append(counts.get(key, 0))
            exp.append(e)
        else:
            rest_o += counts.get(key, 0)
            rest_e += e
    rest_o += sum(c for k, c in counts.items() if k not in expected)
    obs.append(rest_o)
    exp.append(max(rest_e, 1e-9))
    exp = [e * sum(obs) / sum(exp) for e in exp]
    assert len(obs) >= 8, "test has too few bins to mean anything"
    return stats.chisquare(obs, exp).pvalue


@pytest.fixture(scope="module")
def target_joint(stories_model):
    params = SamplingParams(**PARAMS)
    ids = stories_model.tokenizer.encode_prompt(PROMPT)
    return exact_joint(stories_model, ids, params)


@pytest.mark.parametrize("method,drafter", [("sd", "same-vocab"), ("tli", "gpt2"),
                                            ("slem", "self"), ("slrs", "bytes"),
                                            ("sd", "same-vocab-pruned"), ("tli", "gpt2-pruned")])
def test_first_two_tokens_follow_the_target(method, drafter, stories_model, loaded_model,
                                            byte_drafter_model, target_joint, tiny_model_dir):
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    if drafter.endswith("-pruned"):  # drafter head over its first ids only: zeros elsewhere in q
        family, n = ("stories260K", 320) if drafter.startswith("same") else ("gpt2", 3000)
        d = LoadedModel(ModelSpec(str(tiny_model_dir(family, 1)), head_ids=n))
        assert d.head_ids == n
    elif drafter == "same-vocab":
        d = loaded_model("stories260K", seed=1)
    elif drafter == "self":  # SLEM with the target as its own drafter: many acceptances
        d = stories_model
    elif drafter == "bytes":
        d = byte_drafter_model
    else:
        d = loaded_model(drafter, seed=1)
    engine = Engine(stories_model, d)
    counts: dict = {}
    drafted = accepted = 0
    for seed in range(SEEDS):
        res = engine.generate(GenerationRequest(PROMPT, max_new_tokens=2, method=method,
                                                lookahead=2,
                                                params=SamplingParams(seed=seed, **PARAMS)))
        key = tuple(res.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
        drafted += res.stats.drafted
        accepted += res.stats.accepted
    assert drafted > 0, "the drafter never proposed anything: the test would not test the rule"
    assert accepted < drafted, "no rejection ever happened: the residual path was not tested"
    if method != "slrs":  # a random byte drafter's proposals are (rightly) never accepted
        assert accepted > 0, "no draft was ever accepted: the accept path was not tested"
    pvalue = chi_square_pvalue(counts, target_joint, SEEDS)
    assert pvalue > 1e-3, (method, pvalue, accepted / drafted)


def test_negative_control_biased_sampler_is_detected(stories_model, target_joint):
    """The same statistic rejects a sampler that is slightly off (temperature 1.1x)."""
    engine = Engine(stories_model)
    counts: dict = {}
    off = dict(PARAMS, temperature=PARAMS["temperature"] * 1.25)
    for seed in range(SEEDS):
        res = engine.generate(GenerationRequest(PROMPT, max_new_tokens=2, method="ar",
                                                params=SamplingParams(seed=seed, **off)))
        key = tuple(res.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
    assert chi_square_pvalue(counts, target_joint, SEEDS) < 1e-3
