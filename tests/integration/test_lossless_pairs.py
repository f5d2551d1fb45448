"""Greedy SLEM and TLI are token-identical to AR for every ordered pair of tokenizer families.

Tiny randomly initialised Llama models with real tokenizers emit odd bytes, byte-fallback pieces
and special tokens: exactly the cases where text-level bridging can go wrong.
"""

from __future__ import annotations

import itertools

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest

PROMPTS = [
    "def fib(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. Élan, naïve café — 東京 🚀",
    "a  b   c\n\n\n\tx = [1,  2]\u00a0  ",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def ar_outputs(loaded_model, families):
    out = {}
    for fam in families:
        engine = Engine(loaded_model(fam))
        for i, prompt in enumerate(PROMPTS):
            res = engine.generate(GenerationRequest(prompt, max_new_tokens=MAX_NEW, method="ar"))
            assert res.stats.rounds == len(res.token_ids) + (res.finish_reason == "stop")
            out[fam, i] = res
    return out


def test_ar_matches_transformers_generate(loaded_model, families):
    """Our AR loop is the target alone: same tokens as Hugging Face's own greedy generate."""
    import torch

    for fam in families[:4]:
        model = loaded_model(fam)
        ids = model.tokenizer.encode_prompt(PROMPTS[0])
        ref = model.model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                   eos_token_id=sorted(model.eos_ids), pad_token_id=0)
        ref_new = ref[0, len(ids):].tolist()
        ref_new = [t for t in ref_new if t not in model.eos_ids][:MAX_NEW]
        res = Engine(model).generate(GenerationRequest(PROMPTS[0], max_new_tokens=MAX_NEW,
                                                       method="ar"))
        assert res.token_ids == ref_new[:len(res.token_ids)]


def test_every_ordered_pair_is_token_identical(loaded_model, families, ar_outputs):
    failures = []
    checked = 0
    for drafter_fam, target_fam in itertools.permutations(families, 2):
        engine = Engine(loaded_model(target_fam), loaded_model(drafter_fam, seed=1))
        for i, prompt in enumerate(PROMPTS):
            want = ar_outputs[target_fam, i]
            for method in ("slem", "tli"):
                got = engine.generate(GenerationRequest(prompt, max_new_tokens=MAX_NEW,
                                                        method=method, lookahead=3))
                checked += 1
                if got.token_ids != want.token_ids or got.text != want.text or \
                        got.finish_reason != want.finish_reason:
                    failures.append((drafter_fam, target_fam, i, method, got.token_ids,
                                     want.token_ids))
                assert got.stats.emitted == len(got.token_ids)
    assert not failures, f"{len(failures)} of {checked} differ from AR, first: {failures[0]}"


def test_identical_drafter_accepts_every_greedy_draft(loaded_model, families):
    fam = families[0]
    model = loaded_model(fam)
    engine = Engine(model, model)
    ar = engine.generate(GenerationRequest(PROMPTS[0], max_new_tokens=24, method="ar"))
    for method in ("sd", "slem"):
        res = engine.generate(GenerationRequest(PROMPTS[0], max_new_tokens=24, method=method,
                                                lookahead=4))
        assert res.token_ids == ar.token_ids
        assert res.stats.drafted > 0
        assert res.stats.accepted == res.stats.drafted, (method, res.stats)
    assert engine.resolve_method("auto", SamplingParams()) == "sd"


def test_drafting_ahead_is_token_identical(loaded_model, families, ar_outputs):
    """Overlap (the next draft made while the target verifies): greedy SLEM and TLI stay AR's on
    ordered pairs of four families (SLEM's drafts made ahead with branches: text forked at byte
    offsets of odd tokenizations); with an identical drafter every round after the first takes
    the draft made ahead (all accepted, the bonus guessed) and SD/SLEM are still AR's."""
    failures = []
    for drafter_fam, target_fam in itertools.permutations(families[:4], 2):
        engine = Engine(loaded_model(target_fam), loaded_model(drafter_fam, seed=1), overlap=True,
                        overlap_branches=4)
        for i, prompt in enumerate(PROMPTS):
            for method in ("slem", "tli"):
                got = engine.generate(GenerationRequest(prompt, max_new_tokens=MAX_NEW,
                                                        method=method, lookahead=3))
                if got.token_ids != ar_outputs[target_fam, i].token_ids:
                    failures.append((drafter_fam, target_fam, i, method))
    assert not failures, failures
    model = loaded_model(families[0])
    for miss in ("plain", "wait"):
        engine = Engine(model, model, overlap=True, overlap_miss=miss)
        for method in ("sd", "slem"):
            res = engine.generate(GenerationRequest(PROMPTS[0], max_new_tokens=24, method=method,
                                                    lookahead=4))
            assert res.token_ids == Engine(model).generate(GenerationRequest(
                PROMPTS[0], max_new_tokens=24, method="ar")).token_ids
            # plain: the first round is a plain step (its draft made ahead under it)
            assert res.stats.ahead_plain == (miss == "plain"), (method, miss, res.stats)
            assert res.stats.ahead_ready >= res.stats.rounds - 2 > 0, (method, res.stats)
            assert res.stats.ahead_stale <= 4 * 5  # at most the last rounds' drafts


def test_sampled_slem_equals_sampled_ar_for_the_same_seed(loaded_model, families):
    """Seeding by (seed, position): SLEM emits exactly the AR sample path."""
    target, drafter = loaded_model(families[1]), loaded_model(families[0], seed=1)
    engine = Engine(target, drafter)
    for seed in range(6):
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
        ar = engine.generate(GenerationRequest(PROMPTS[1], max_new_tokens=12, params=params,
                                               method="ar"))
        slem = engine.generate(GenerationRequest(PROMPTS[1], max_new_tokens=12, params=params,
                                                 method="slem"))
        assert slem.token_ids == ar.token_ids
