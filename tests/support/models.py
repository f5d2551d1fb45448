"""Test fixtures: real tokenizers from the shared assets, tiny random Llama models built on them,
and the real pretrained llama2.c ``stories260K`` checkpoint converted to Hugging Face format.

Everything here is for tests only; the package itself never depends on the shared assets.

* :func:`find_assets` / :func:`tokenizer_dir` locate the offline assets (``MANIFEST.md`` there).
* :func:`build_tiny_model` writes a seeded, randomly initialised ``LlamaForCausalLM`` plus the
  family's tokenizer into a folder that ``AutoTokenizer`` / ``AutoModelForCausalLM`` load offline.
* :func:`tiny_model_cache` memoises those builds (wrap it in a session-scoped fixture).
* :func:`convert_stories260k` converts ``stories260K.bin`` (llama2.c legacy v0 format).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "TOKENIZER_FAMILIES",
    "TINY_INITIALIZER_RANGE",
    "STORIES260K_BOS",
    "STORIES260K_EOS",
    "STORIES260K_TEXT_PREFIX",
    "find_assets",
    "tokenizer_dir",
    "available_families",
    "load_family_tokenizer",
    "build_tiny_model",
    "tiny_model_cache",
    "read_llama2c_checkpoint",
    "convert_stories260k",
]

TOKENIZER_FAMILIES = [
    "gpt2",
    "llama2",
    "mistral-v0.1",
    "mistral-v0.3",
    "gpt-neox",
    "phi-2",
    "phi-3",
    "stories260K",
]

# Special tokens for asset folders that ship only a tokenizer.json (no tokenizer_config.json).
# Folders with a tokenizer_config.json keep the specials it declares (e.g. phi-3's eos is
# "<|endoftext|>" = 32000, as in the real Phi-3 tokenizer_config).
_FAMILY_SPECIALS: dict[str, dict[str, str]] = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "gpt-neox": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "phi-2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "mistral-v0.1": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "mistral-v0.3": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "phi-3": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
    "stories260K": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}

# Standard deviation of every Linear / Embedding weight of the tiny random models.  With
# hidden=32 and tied embeddings, 1.0 (the largest value transformers' config validator accepts)
# gives peaked, varied next-token distributions: over 1,440 greedy steps (vocab 32000, 4 seeds,
# 6 prompts) the top-1 probability had quartiles ~0.26 / 0.41 / 0.66, only 0.4% of steps had a
# top-1/top-2 logit gap under 1e-2, and no greedy continuation collapsed to one repeated token.
# With the HF default 0.02 the distributions are uniform to 4 decimals and greedy decoding
# repeats the last token forever (the tied embedding dominates the residual stream).
TINY_INITIALIZER_RANGE = 1.0

STORIES260K_BOS = 1
STORIES260K_EOS = 2
STORIES260K_UNK = 0
STORIES260K_TEXT_PREFIX = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)

_REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------------------------


def find_assets() -> Path | None:
    """The shared assets folder: ``$HSD_SHARED_ASSETS``, ``<repo>/../shared/assets``, then
    ``/work/shared/assets``; ``None`` when none of them is an existing directory."""
    candidates: list[Path] = []
    env = os.environ.get("HSD_SHARED_ASSETS")
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(_REPO_ROOT.parent / "shared" / "assets")
    candidates.append(Path("/work/shared/assets"))
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def _require_assets() -> Path:
    assets = find_assets()
    if assets is None:
        raise FileNotFoundError(
            "shared assets not found (set HSD_SHARED_ASSETS or provide ../shared/assets)"
        )
    return assets


def tokenizer_dir(family: str) -> Path:
    """Folder holding the family's ``tokenizer.json`` (raises if unknown or assets missing)."""
    if family not in TOKENIZER_FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {TOKENIZER_FAMILIES}")
    assets = _require_assets()
    if family == "stories260K":
        return assets / "models" / "stories260K"
    return assets / "tokenizers" / family


def available_families() -> list[str]:
    """The families of :data:`TOKENIZER_FAMILIES` whose tokenizer.json is present."""
    if find_assets() is None:
        return []
    return [f for f in TOKENIZER_FAMILIES if (tokenizer_dir(f) / "tokenizer.json").is_file()]


def load_family_tokenizer(family: str):
    """The family's tokenizer straight from the assets, with bos/eos/unk set.

    Folders with a ``tokenizer_config.json`` load through ``AutoTokenizer``; bare
    ``tokenizer.json`` folders through ``PreTrainedTokenizerFast`` with the family's specials.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = tokenizer_dir(family)
    if (d / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    vocab = tok.get_vocab()
    for attr, content in _FAMILY_SPECIALS[family].items():
        if getattr(tok, attr) is None:
            if content not in vocab:
                raise ValueError(f"{family}: special token {content!r} not in vocabulary")
            setattr(tok, attr, content)
    return tok


def _save_tokenizer(tok, out_dir: Path) -> None:
    tok.save_pretrained(str(out_dir))


def _generation_config(bos: int | None, eos: int | None, pad: int | None):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
    )


# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------


def build_tiny_model(
    family: str,
    out_dir: Path,
    seed: int = 0,
    *,
    hidden: int = 32,
    layers: int = 2,
) -> Path:
    """Write a seeded random ``LlamaForCausalLM`` (fp32 safetensors) with the family's tokenizer.

    Vocabulary size is ``len(tokenizer)`` (added tokens included). 4 heads, 2 KV heads,
    intermediate ``2*hidden``, 512 positions, tied embeddings, initializer range
    :data:`TINY_INITIALIZER_RANGE`. The same ``(family, seed, hidden, layers)`` always gives
    bit-identical weights; the global torch RNG state is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_family_tokenizer(family)
    vocab_size = len(tok)
    max_id = max(tok.get_vocab().values())
    if max_id >= vocab_size:  # never seen with the shipped assets; guard against id holes
        vocab_size = max_id + 1

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=TINY_INITIALIZER_RANGE,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        # No pad id in the model config: LlamaModel would make it the embedding's padding_idx
        # and zero that row (for gpt2/phi-2/phi-3 the pad token is the eos token).
        pad_token_id=None,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    model.generation_config = _generation_config(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(str(out_dir))
    _save_tokenizer(tok, out_dir)
    return out_dir


def tiny_model_cache(tmp_root: Path) -> Callable[..., Path]:
    """``get(family, seed=0, *, hidden=32, layers=2) -> Path``, building each model once.

    Models go to ``tmp_root/<family>-s<seed>-h<hidden>-l<layers>``. Meant to be wrapped in a
    session-scoped pytest fixture (``tmp_path_factory.mktemp("tiny-models")`` as ``tmp_root``).
    """
    tmp_root = Path(tmp_root)
    built: dict[tuple[str, int, int, int], Path] = {}

    def get(family: str, seed: int = 0, *, hidden: int = 32, layers: int = 2) -> Path:
        key = (family, int(seed), int(hidden), int(layers))
        if key not in built:
            out = tmp_root / f"{family}-s{seed}-h{hidden}-l{layers}"
            built[key] = build_tiny_model(family, out, seed, hidden=hidden, layers=layers)
        return built[key]

    get.built = built  # type: ignore[attr-defined]
    return get


# --------------------------------------------------------------------------------------------
# llama2.c stories260K
# --------------------------------------------------------------------------------------------


def read_llama2c_checkpoint(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Parse a llama2.c legacy (v0) checkpoint into its header and float32 tensors.

    Header: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len); a
    negative vocab_size means an unshared classifier follows the RoPE tables. Weight matrices are
    stored ``[out_features, in_features]``.
    """
    data = Path(path).read_bytes()
    hsize = 7 * 4
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", data[:hsize])
    shared = vocab > 0
    vocab = abs(vocab)
    head_size = dim // n_heads
    kv_dim = head_size * n_kv_heads
    flat = torch.frombuffer(bytearray(data[hsize:]), dtype=torch.float32)

    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_size // 2)),
        ("freq_cis_imag", (seq_len, head_size // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    tensors: dict[str, torch.Tensor] = {}
    off = 0
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        if off + n > flat.numel():
            raise ValueError(f"{path}: truncated checkpoint while reading {name}")
        tensors[name] = flat[off : off + n].view(shape).clone()
        off += n
    if off != flat.numel():
        raise ValueError(f"{path}: {flat.numel() - off} trailing floats; not a legacy v0 checkpoint?")
    header = dict(
        dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=vocab, seq_len=seq_len, shared_classifier=int(shared),
    )
    return header, tensors


def _interleaved_to_half_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from llama2.c's interleaved RoPE pairs (x0,x1),(x2,x3),... to
    HF's rotate-half layout (pair i = (x_i, x_{i+hd/2})): per head, rows [0,2,4,...,1,3,5,...]."""
    out_features, in_features = w.shape
    hd = out_features // n_heads
    return (
        w.view(n_heads, hd // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
        .contiguous()
    )


def convert_stories260k(out_dir: Path, checkpoint: Path | None = None) -> Path:
    """Convert llama2.c ``stories260K.bin`` (plus its tokenizer.json) into an HF Llama folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src_dir = tokenizer_dir("stories260K")
    checkpoint = Path(checkpoint) if checkpoint is not None else src_dir / "stories260K.bin"
    h, t = read_llama2c_checkpoint(checkpoint)
    dim, n_layers, n_heads, n_kv = h["dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]
    head_size = dim // n_heads

    # Sanity-check the stored RoPE table against the frequencies HF will use (theta 10000).
    theta = 10000.0
    inv = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    ang = torch.arange(h["seq_len"], dtype=torch.float64)[:, None] * inv[None, :]
    if not (
        torch.allclose(t["freq_cis_real"].double(), ang.cos(), atol=1e-4)
        and torch.allclose(t["freq_cis_imag"].double(), ang.sin(), atol=1e-4)
    ):
        raise ValueError("stories260K RoPE table does not match theta=10000")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = bool(h["shared_classifier"])
    config = LlamaConfig(
        vocab_size=h["vocab_size"],
        hidden_size=dim,
        intermediate_size=h["hidden_dim"],
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=shared,
        bos_token_id=STORIES260K_BOS,
        eos_token_id=STORIES260K_EOS,
        pad_token_id=None,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": t["token_embedding"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = _interleaved_to_half_rotary(t["wq"][i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = _interleaved_to_half_rotary(t["wk"][i], n_kv)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd["model.norm.weight"] = t["rms_final"]
    sd["lm_head.weight"] = t["token_embedding"] if shared else t["wcls"]
    own = model.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise RuntimeError(f"{k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
            own[k].copy_(v)
    if shared and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        model.tie_weights()
    model = model.to(torch.float32).eval()
    model.generation_config = _generation_config(STORIES260K_BOS, STORIES260K_EOS, None)
    model.save_pretrained(str(out_dir))
    _save_tokenizer(load_family_tokenizer("stories260K"), out_dir)
    return out_dir
