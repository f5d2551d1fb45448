"""A drafter's pruned output head (``ModelSpec.head_ids``): the kept logits are the full head's,
every other id is -inf (probability 0), special and end-of-sequence ids are always kept, targets
refuse it, and greedy output through every drafting method stays the target's own."""

from __future__ import annotations

import pytest
import torch

from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.models.hf import LoadedModel, ModelSpec
from tests.support.numerics import assert_logits_close


def test_kept_logits_equal_the_full_head_and_the_rest_are_minus_inf(tiny_model_dir, families):
    path = str(tiny_model_dir(families[0], 1))
    full = LoadedModel(ModelSpec(path))
    pruned = LoadedModel(ModelSpec(path, head_ids=300))
    assert pruned.logit_size == full.logit_size and pruned.head_ids == 300
    ids = full.tokenizer.encode_prompt("def fib(n):\n    return")
    a = full.new_session().forward_from(ids, [5, 6])
    b = pruned.new_session().forward_from(ids, [5, 6])
    keep = torch.isfinite(b[0])
    kept_ids = set(torch.nonzero(keep).flatten().tolist())
    assert set(range(300)) <= kept_ids
    assert set(pruned.eos_ids) <= kept_ids and set(pruned.vocab.special_ids) <= kept_ids
    assert len(kept_ids) < full.logit_size
    # the two heads are GEMMs of different shapes (kernel-dependent rounding): scaled to max|logits|
    assert_logits_close(b[:, keep], a[:, keep])
    assert torch.isneginf(b[:, ~keep]).all()
    big = LoadedModel(ModelSpec(path, head_ids=10**9))  # more than the vocabulary: nothing pruned
    assert big.head_ids == 0


def test_bad_head_ids_are_refused():
    with pytest.raises(ValueError, match="head_ids"):
        ModelSpec("x", head_ids=-1)
    from pydantic import ValidationError

    from hsd_serve.serve.config import AppConfig

    with pytest.raises(ValidationError, match="target.head_ids must be 0"):
        AppConfig.model_validate({"target": {"path": "t", "head_ids": 100}})
    cfg = AppConfig.model_validate({"drafter": {"path": "d", "head_ids": 100}})
    assert cfg.drafter.spec().head_ids == 100


@pytest.mark.parametrize("method", ["slem", "tli"])
def test_greedy_with_a_pruned_drafter_is_the_target_alone(method, tiny_model_dir, loaded_model,
                                                           families):
    target = loaded_model(families[1])
    drafter = LoadedModel(ModelSpec(str(tiny_model_dir(families[0], 1)), head_ids=500))
    prompts = ["def fib(n):\n    ", "The quick brown fox", "import os\nfor x in"]
    ar = Engine(target)
    spec = Engine(target, drafter)
    drafted = 0
    for p in prompts:
        want = ar.generate(GenerationRequest(p, max_new_tokens=24, method="ar")).token_ids
        got = spec.generate(GenerationRequest(p, max_new_tokens=24, method=method, lookahead=3))
        assert got.token_ids == want
        drafted += got.stats.drafted
    assert drafted > 0
