"""``DrafterText`` (the drafter's ids for the committed text) when the text goes back or
elsewhere: the vLLM executor's overlapped drafting syncs the drafter to drafted-ahead text that the
target may not take, then to what it took.  After any sequence of updates the ids spell exactly a
prefix of the current text (no stale id survives), and drafting ahead again reuses the common part.
Real tokenizers of several families (byte-level BPE, SentencePiece with byte fallback)."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsd_serve.core.detok import valid_utf8_prefix_len  # noqa: E402
from hsd_serve.engine.sync import DrafterText  # noqa: E402
from hsd_serve.models.tokenizer import TokenizerAdapter, load_tokenizer  # noqa: E402
from tests.unit.test_tokenizer_adapter import TOK  # noqa: E402

PROMPT = "def f(x):\n"
PIECES = ["    return", " x", " + 1", "\n", "  ", "é", "東京", "🚀", " if", " else", "_y", "\t",
          "))", "\n\n", "'''", "0x1f"]


def _tokenizers():
    from hsd_serve.zoo import bundled_model_dir

    out = [("bundled-drafter", str(bundled_model_dir("drafter")))]
    for name in ("llama2", "gpt2"):
        if (TOK / name).is_dir():
            out.append((name, str(TOK / name)))
    return out


@pytest.fixture(scope="module", params=_tokenizers(), ids=lambda p: p[0])
def tok(request):
    hf = load_tokenizer(request.param[1])
    return TokenizerAdapter(hf)


def _check(text: DrafterText, tok, generated: bytes):
    """The ids after the prompt spell ``generated[:synced]`` (where a chunk went in lossily —
    invalid bytes reach the drafter as U+FFFD — their bytes are counted, not spelled), and only
    a trailing incomplete character is left pending."""
    synced = text.synced
    ids = text.ids[text.base:]
    assert len(ids) == len(text.consumed) and sum(text.consumed) == synced
    assert synced <= len(generated)
    assert valid_utf8_prefix_len(generated[synced:]) == 0 or synced == len(generated)
    spelled = [tok.vocab.token_bytes[t] for t in ids]
    if all(len(b) == c for b, c in zip(spelled, text.consumed)):  # no lossy chunk
        assert generated[:synced] == b"".join(spelled)


@pytest.mark.parametrize("seed", range(6))
def test_rewinds_to_any_new_text(tok, seed):
    """Random walks over texts that grow, shrink and branch (cut mid-character too): after each
    update the ids spell the longest complete-character prefix of that text."""
    rng = random.Random(seed)
    text = DrafterText(tok, PROMPT)
    base_ids = list(text.ids)
    cur = b""
    for _ in range(40):
        move = rng.random()
        if move < 0.5 or not cur:
            cur += "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3))).encode()
        elif move < 0.8:
            cur = cur[:rng.randint(0, len(cur))]  # back (possibly mid-character)
        else:  # elsewhere: a shared start, then another continuation
            cur = cur[:rng.randint(0, len(cur))] + rng.choice(PIECES).encode()
        drafted = tok.hf.encode(rng.choice(PIECES), add_special_tokens=False)[:2]
        text.update(cur, drafted if rng.random() < 0.5 else [])
        assert text.ids[:text.base] == base_ids
        _check(text, tok, cur)


def test_going_ahead_and_back_keeps_the_common_ids(tok):
    """Drafted-ahead text the target did not take: ids up to the divergence stay (their KV cache
    stays valid), the rest are dropped."""
    text = DrafterText(tok, PROMPT)
    text.update(b"    return x + 1\n")
    kept = list(text.ids)
    text.update(b"    return x + 1\n    if y:\n        pass\n")  # drafted ahead
    assert len(text.ids) > len(kept)
    text.update(b"    return x + 1\n    else")  # the target took another path
    _check(text, tok, b"    return x + 1\n    else")
    common = 0
    while common < min(len(kept), len(text.ids)) and kept[common] == text.ids[common]:
        common += 1
    assert common >= len(kept) - 1  # at most the junction token re-merged (backoff)
