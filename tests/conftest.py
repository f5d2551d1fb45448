"""Shared fixtures: tiny models built once per session from real tokenizers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# One thread: tiny models are dominated by per-op overhead, and this machine has two shared cores.
torch.set_num_threads(1)

from tests.support.models import available_families, find_assets, tiny_model_cache  # noqa: E402


@pytest.fixture(scope="session")
def assets():
    path = find_assets()
    if path is None:
        pytest.skip("shared assets not available")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family, seed=0) -> Path`` of a seeded random Llama with that tokenizer."""
    if find_assets() is None:
        pytest.skip("shared assets not available")
    return tiny_model_cache(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def loaded_model(tiny_model_dir):
    """``loaded_model(family, seed=0) -> LoadedModel``, memoised."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    cache = {}

    def get(family: str, seed: int = 0):
        key = (family, seed)
        if key not in cache:
            cache[key] = LoadedModel(ModelSpec(str(tiny_model_dir(family, seed))))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def families():
    fams = available_families()
    if len(fams) < 2:
        pytest.skip("need at least two tokenizer families in the shared assets")
    return fams


@pytest.fixture(scope="session")
def stories_model(tmp_path_factory):
    """The real pretrained llama2.c stories260K converted to Hugging Face format (LoadedModel)."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from tests.support.models import convert_stories260k

    if find_assets() is None:
        pytest.skip("shared assets not available")
    out = convert_stories260k(tmp_path_factory.mktemp("stories260k"))
    return LoadedModel(ModelSpec(str(out)))


@pytest.fixture(scope="session")
def byte_drafter_model(tmp_path_factory):
    """A tiny random Llama over the byte-level tokenizer (256 bytes + <|endoftext|>)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo.toks import build_byte_tokenizer

    out = tmp_path_factory.mktemp("byte-drafter")
    tok = build_byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      initializer_range=1.0, bos_token_id=tok.eos_token_id,
                      eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return LoadedModel(ModelSpec(str(out)))
