"""Requests that AR answers must not fail under a speculative method: a target near its context
limit, a shared vocabulary whose heads are padded to different widths."""

from __future__ import annotations

import shutil

import pytest
import torch

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest

PROMPT = "def fib(n):\n    if n < 2:\n        return n\n"
FAMILY = "mistral-v0.1"


def _rewrite(src, out, edit):
    """A copy of the model directory ``src`` with ``edit(model)`` applied to the weights/config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(str(out))
    for f in src.iterdir():
        if "token" in f.name or f.name.endswith((".model", ".txt")) or f.name == "vocab.json":
            shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def short_target(tiny_model_dir, tmp_path_factory, loaded_model):
    """The tiny target with a context of its prompt + 20 tokens."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    n = len(loaded_model(FAMILY).tokenizer.encode_prompt(PROMPT))

    def shorten(model):
        model.config.max_position_embeddings = n + 20

    out = _rewrite(tiny_model_dir(FAMILY), tmp_path_factory.mktemp("short-target"), shorten)
    model = LoadedModel(ModelSpec(str(out)))
    assert model.max_context == n + 20
    return model


@pytest.mark.parametrize("drafter", ["itself", "gpt2"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_target_at_its_context_limit_ends_with_length_as_ar_does(short_target, loaded_model,
                                                                    drafter, temperature):
    """The drafter's context is at least the target's: the round near the end must not send more
    candidates than fit (SLEM bridges up to 3k target tokens from k drafter tokens)."""
    d = short_target if drafter == "itself" else loaded_model("gpt2", seed=1)
    engine = Engine(short_target, d)
    methods = ["slem", "sd"] if drafter == "itself" else ["slem", "tli"]
    for seed in range(3):
        params = SamplingParams(temperature=temperature, seed=seed)
        ar = engine.generate(GenerationRequest(PROMPT, max_new_tokens=200, params=params,
                                               method="ar"))
        assert ar.finish_reason == "length"
        for method in methods:
            for k in (2, 5):
                got = engine.generate(GenerationRequest(PROMPT, max_new_tokens=200, params=params,
                                                        method=method, lookahead=k))
                assert got.finish_reason == "length", (method, k)
                if method == "slem" or temperature == 0.0:  # sampled SD/TLI: same law, not path
                    assert got.token_ids == ar.token_ids, (method, k, seed)
                assert len(got.token_ids) == len(ar.token_ids)
                if drafter == "itself":
                    assert got.stats.accepted > 0, (method, got.stats)


@pytest.fixture(scope="module")
def padded_target(tiny_model_dir, tmp_path_factory):
    """The tiny target with 64 more (padding) rows in its embedding and head than the tokenizer
    has ids, like Qwen2.5-7B (152,064 rows) against Qwen2.5-0.5B (151,936)."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    def pad(model):
        n = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(n + 64, mean_resizing=False)
        model.get_input_embeddings().weight[n:] = 0.0

    out = _rewrite(tiny_model_dir(FAMILY), tmp_path_factory.mktemp("padded-target"), pad)
    return LoadedModel(ModelSpec(str(out)))


def test_sd_sampling_with_a_narrower_drafter_head(padded_target, loaded_model):
    drafter = loaded_model(FAMILY, seed=1)
    assert drafter.logit_size + 64 == padded_target.logit_size
    engine = Engine(padded_target, drafter)
    assert engine.resolve_method("auto", SamplingParams(temperature=1.0)) == "sd"
    drafted = accepted = 0
    for seed in range(20):
        params = SamplingParams(temperature=1.0, seed=seed)
        res = engine.generate(GenerationRequest(PROMPT, max_new_tokens=12, params=params,
                                                method="sd", lookahead=3))
        assert res.finish_reason in ("length", "stop") and res.token_ids
        drafted += res.stats.drafted
        accepted += res.stats.accepted
        assert res.stats.fallback_rounds == 0
    assert 0 < drafted and accepted < drafted, "no rejection: the residual p - q never ran"
    greedy = GenerationRequest(PROMPT, max_new_tokens=12, method="sd", lookahead=3)
    assert engine.generate(greedy).token_ids == \
        engine.generate(GenerationRequest(PROMPT, max_new_tokens=12, method="ar")).token_ids
