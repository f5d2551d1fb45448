"""Shared test fixtures (tiny models on real tokenizers, converted stories260K)."""

from tests.support.models import (
    STORIES260K_BOS,
    STORIES260K_EOS,
    STORIES260K_TEXT_PREFIX,
    TINY_INITIALIZER_RANGE,
    TOKENIZER_FAMILIES,
    available_families,
    build_tiny_model,
    convert_stories260k,
    find_assets,
    load_family_tokenizer,
    read_llama2c_checkpoint,
    tiny_model_cache,
    tokenizer_dir,
)

__all__ = [
    "STORIES260K_BOS",
    "STORIES260K_EOS",
    "STORIES260K_TEXT_PREFIX",
    "TINY_INITIALIZER_RANGE",
    "TOKENIZER_FAMILIES",
    "available_families",
    "build_tiny_model",
    "convert_stories260k",
    "find_assets",
    "load_family_tokenizer",
    "read_llama2c_checkpoint",
    "tiny_model_cache",
    "tokenizer_dir",
]
