"""The plain-torch drafter forward (``models.plain``) against transformers' own forward.

The same weights run both ways in sessions that see the same calls: a prefill, decode steps, a
crop, candidates after the context, and ``forward_batch`` over sessions of different lengths
(left-padded caches, right-padded inputs).  Architectures: Llama with grouped-query attention,
Qwen2 (biases on q/k/v), Mistral; a model it does not cover keeps transformers' forward.  And the
engine end to end: speculative drafts from a plain drafter leave greedy output identical to AR.
"""

from __future__ import annotations

import pytest
import torch

from hsd_serve.models.hf import LoadedModel, ModelSpec, forward_batch
from tests.support.numerics import assert_logits_close


def _save(tmp_path, name, cfg_cls, model_cls, **extra):
    from hsd_serve.zoo.toks import build_byte_tokenizer

    tok = build_byte_tokenizer()
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.5, bos_token_id=tok.eos_token_id,
                  eos_token_id=tok.eos_token_id, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = model_cls(cfg)
    out = tmp_path / name
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def _llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save(tmp_path, "llama", LlamaConfig, LlamaForCausalLM, tie_word_embeddings=True)


def _qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save(tmp_path, "qwen2", Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=False)


def _mistral(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    return _save(tmp_path, "mistral", MistralConfig, MistralForCausalLM, sliding_window=None)


def _pair(path, **kw):
    ref = LoadedModel(ModelSpec(path, **kw))
    plain = LoadedModel(ModelSpec(path, plain_forward=True, **kw))
    assert ref.plain is None
    assert plain.plain is not None, "the plain decoder should take this architecture"
    return ref, plain


@pytest.mark.parametrize("build", [_llama, _qwen2, _mistral])
def test_sessions_match_transformers(tmp_path, build):
    ref, plain = _pair(build(tmp_path))
    ids = [int(i) for i in torch.randint(0, 250, (60,), generator=torch.Generator().manual_seed(1))]
    a, b = ref.new_session(), plain.new_session()
    assert_logits_close(b.forward_from(ids[:20]), a.forward_from(ids[:20]))  # prefill
    for n in range(20, 30):  # decode
        assert_logits_close(b.forward_from(ids[:n], [ids[n]]), a.forward_from(ids[:n], [ids[n]]))
    a.crop(24), b.crop(24)
    # candidates after a context that shares only part of the cache
    assert_logits_close(b.forward_from(ids[:26], ids[40:44]), a.forward_from(ids[:26], ids[40:44]))
    assert b.ids == a.ids


@pytest.mark.parametrize("build", [_llama, _qwen2])
def test_batched_forward_matches_transformers(tmp_path, build):
    ref, plain = _pair(build(tmp_path))
    g = torch.Generator().manual_seed(2)
    ids = [int(i) for i in torch.randint(0, 250, (80,), generator=g)]
    starts = [ids[:9], ids[10:40], ids[3:6]]
    nexts = [(ids[:12], [ids[50]]), (ids[10:41], []), (ids[3:6] + ids[60:63], ids[70:72])]
    out = {}
    for m in (ref, plain):
        sessions = [m.new_session() for _ in starts]
        for s, c in zip(sessions, starts):
            s.forward_from(c)
        rows = forward_batch(sessions, [c for c, _ in nexts], [e for _, e in nexts])
        # each cache holds exactly its own keys/values: the next single step agrees too
        follow = [s.forward_from(c + e, [1]) for s, (c, e) in zip(sessions, nexts)]
        out[m is plain] = rows + follow
    for got, want in zip(out[True], out[False]):
        assert_logits_close(got, want)


def test_pruned_head_and_what_it_does_not_cover(tmp_path, tiny_model_dir, families):
    ref, plain = _pair(_llama(tmp_path), head_ids=100)
    ids = list(range(40, 70))
    assert_logits_close(plain.new_session().forward_from(ids, [5, 6]),
                        ref.new_session().forward_from(ids, [5, 6]))
    from transformers import GPT2Config, GPT2LMHeadModel

    from hsd_serve.models.plain import PlainDecoder

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert not PlainDecoder.supports(gpt2)  # another architecture: transformers' forward


def test_plain_drafter_keeps_greedy_output_identical_to_ar(tiny_model_dir, families):
    from hsd_serve.core.sampling import SamplingParams
    from hsd_serve.engine.local import Engine
    from hsd_serve.engine.types import GenerationRequest

    target = LoadedModel(ModelSpec(str(tiny_model_dir(families[0], 0))))
    drafter = LoadedModel(ModelSpec(str(tiny_model_dir(families[1], 1)), plain_forward=True))
    assert drafter.plain is not None
    engine = Engine(target, drafter)
    prompt = "def add(a, b):\n    return"
    ar = engine.generate(GenerationRequest(prompt, params=SamplingParams(), method="ar",
                                           max_new_tokens=24))
    for method in ("slem", "tli"):
        out = engine.generate(GenerationRequest(prompt, params=SamplingParams(), method=method,
                                                lookahead=3, max_new_tokens=24))
        assert out.token_ids == ar.token_ids, method
        assert out.stats.drafted > 0, f"{method} drafted nothing"


def test_serve_config_turns_it_on_for_drafters_only():
    from hsd_serve.serve.config import AppConfig, ModelConfig

    cfg = AppConfig()
    assert cfg.drafter.spec(drafter=True).plain_forward
    assert not cfg.target.spec().plain_forward
    assert not ModelConfig(path="x", plain_forward=False).spec(drafter=True).plain_forward
    with pytest.raises(ValueError, match="target.plain_forward"):
        AppConfig(target=ModelConfig(path="x", plain_forward=True))
