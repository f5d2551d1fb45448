"""A toy model pair with a known law, for exactness tests over many rounds.

Both tokenizers are byte-level BPE over all 256 bytes plus end-of-text (id 256, as in
``hsd_serve.zoo.toks.build_byte_tokenizer``) with a few merges: the drafter adds ``"ab"``; the
target adds ``"ab"`` and ``"ba"`` (so the vocabularies differ and TLI/SLEM/SLRS apply; SD uses a
drafter with the target's tokenizer).

* The **target** emits i.i.d. tokens: every token embedding is the same vector and the decoder
  layer adds nothing, so its logits are the same at every position whatever the context. Its law
  is ``TARGET_P`` on ``a``, ``b``, ``ab``, ``ba`` (everything else, end-of-text included, has
  probability 0), so the exact law of any generated sequence is a product of ``TARGET_P``.
* The **drafter** is a bigram model: its next-token row depends only on its last token (one-hot
  embeddings, a layer that adds nothing, an output head holding the table), and the rows differ a
  lot, so which tokenization of the committed text the drafter holds changes its proposals.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

EOS = "<|endoftext|>"
TARGET_P = {"a": 0.3, "b": 0.3, "ab": 0.2, "ba": 0.2}
# drafter rows by its last token; "" = any other token (the prompt's)
DRAFTER_ROWS = {
    "a": {"a": 0.43, "b": 0.36, "ab": 0.21},
    "b": {"a": 0.01, "b": 0.94, "ab": 0.05},
    "ab": {"a": 0.55, "b": 0.33, "ab": 0.12},
    "": {"a": 0.93, "b": 0.04, "ab": 0.03},
}
_NEG = -1.0e3  # logit for tokens outside the table (exp underflows to exactly 0)


def build_tokenizer(merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hsd_serve.core.vocab import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=None, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"eos_token": EOS, "bos_token": EOS})
    return fast


def _save(out: Path, tok, head_rows: dict[str, dict[str, float]], embed_of) -> Path:
    """A 1-layer Llama whose logits after last token ``t`` are log(head_rows[embed_of(t)])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tok)
    hidden = 8
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      rms_norm_eps=1e-12)
    model = LlamaForCausalLM(cfg)
    keys = list(head_rows)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        for t in range(vocab):  # one-hot embedding of the row this token selects
            model.model.embed_tokens.weight[t, keys.index(embed_of(tok, t))] = 1.0
        head = torch.full((vocab, hidden), _NEG / math.sqrt(hidden))
        for j, row in enumerate(head_rows.values()):
            for s, prob in row.items():
                tid = tok.convert_tokens_to_ids(s)
                if prob > 0 and tid is not None and tid != tok.unk_token_id:
                    head[tid, j] = math.log(prob) / math.sqrt(hidden)  # RMSNorm scales by √H
        model.lm_head.weight.copy_(head)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def build_toy_pair(root: Path) -> dict[str, Path]:
    """{"target", "drafter", "drafter_same_vocab"} model directories under ``root``."""
    target_tok = build_tokenizer([("a", "b"), ("b", "a")])
    drafter_tok = build_tokenizer([("a", "b")])

    def last(tok, t):
        s = tok.convert_ids_to_tokens(t)
        return s if s in DRAFTER_ROWS else ""

    return {
        "target": _save(root / "target", target_tok, {"": TARGET_P}, lambda tok, t: ""),
        "drafter": _save(root / "drafter", drafter_tok, DRAFTER_ROWS, last),
        "drafter_same_vocab": _save(root / "drafter-sv", target_tok, DRAFTER_ROWS, last),
    }
