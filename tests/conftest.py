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
