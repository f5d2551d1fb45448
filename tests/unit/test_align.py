"""`hsd_serve.zoo.align`: the position alignment between two tokenizations of one text."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_serve.models.tokenizer import TokenizerAdapter
from hsd_serve.zoo.align import hard_example, shared_boundaries, soft_example

TEXTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "    x = {'a': 1, \"b\": [2, 3]}  # naïve café — 東京 🙂\n\tassert x\n",
    "class Foo(Bar):\n    '''Doc.'''\n\n    def __init__(self, *args, **kw) -> None:\n",
]


def slow_shared_boundaries(a_lens, b_lens):
    """Reference: the byte offsets both prefix-sum sets contain, each with its token counts."""
    def prefix(lens):
        out, off = {0: 0}, 0
        for n, x in enumerate(lens, 1):
            off += x
            out[off] = n
        return out

    pa, pb = prefix(a_lens), prefix(b_lens)
    return [(pa[o], pb[o]) for o in sorted(set(pa) & set(pb))]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 5), max_size=30), st.lists(st.integers(1, 5), max_size=30))
def test_shared_boundaries_matches_reference_on_any_lengths(a, b):
    assert shared_boundaries(a, b) == slow_shared_boundaries(a, b)


def test_shared_boundaries_rejects_empty_tokens():
    with pytest.raises(ValueError, match="positive"):
        shared_boundaries([1, 0, 2], [3])


def _adapter(family):
    from tests.support.models import load_family_tokenizer

    return TokenizerAdapter(load_family_tokenizer(family))


@pytest.mark.parametrize("fam_a,fam_b", [("gpt2", "mistral-v0.1"), ("gpt2", "phi-3"),
                                         ("llama2", "gpt-neox")])
def test_shared_boundaries_on_real_tokenizer_pairs(assets, fam_a, fam_b):
    a, b = _adapter(fam_a), _adapter(fam_b)
    for text in TEXTS:
        ids_a, ids_b = a.encode_text(text), b.encode_text(text)
        la = [len(a.vocab.token_bytes[i]) for i in ids_a]
        lb = [len(b.vocab.token_bytes[i]) for i in ids_b]
        # SentencePiece's dummy prefix: one leading space byte more on that side
        extra_a, extra_b = sum(la) - len(text.encode()), sum(lb) - len(text.encode())
        assert {extra_a, extra_b} <= {0, 1}
        la, lb = [1] * extra_b + la, [1] * extra_a + lb
        pairs = shared_boundaries(la, lb)
        assert pairs == slow_shared_boundaries(la, lb)
        assert pairs[-1] == (len(la), len(lb))  # both spell the whole text
        for i, j in pairs:  # each pair: the same bytes before it
            assert sum(la[:i]) == sum(lb[:j])


@pytest.mark.parametrize("target_family,drafter_family", [("mistral-v0.1", "gpt2"),
                                                          ("gpt2", "llama2")])
def test_soft_positions_condition_the_drafter_on_the_targets_text(assets, target_family,
                                                                  drafter_family):
    """At every soft position the drafter's context spells exactly the prompt plus the target
    tokens before that position, and labels carry p restricted to the intersection."""
    from hsd_serve.core.vocab import build_id_map

    t, d = _adapter(target_family), _adapter(drafter_family)
    id_map = build_id_map(d.vocab, t.vocab)
    in_inter = torch.zeros(t.vocab.size, dtype=torch.bool)
    in_inter[id_map[id_map >= 0]] = True
    for text in TEXTS:
        prompt, cont = text[:17], text[17:]
        ids = t.encode_text(cont)
        new_bytes = [t.vocab.token_bytes[i] for i in ids]
        if t.prepends_space and new_bytes[0].startswith(b" ") and not cont.startswith(" "):
            new_bytes[0] = new_bytes[0][1:]  # a continuation has no dummy prefix
        assert b"".join(new_bytes) == cont.encode()
        gen = torch.Generator().manual_seed(0)
        p = torch.softmax(torch.randn(len(ids), t.vocab.size, generator=gen), -1)
        ex = soft_example(d, prompt, new_bytes, p, in_inter, temperature=1.0, label_top_k=8)
        assert ex is not None and ex.soft_pos
        full_ids = d.encode_text(prompt + cont)
        start = next(s for s in range(len(full_ids)) if full_ids[s:s + len(ex.ids)] == ex.ids)
        lead = d.vocab.bytes_of(full_ids)[:-len((prompt + cont).encode())]  # b"" or b" "
        before = [lead + prompt.encode() + b"".join(new_bytes[:c]) for c in range(len(new_bytes))]
        seen = set()
        for n, pos in enumerate(ex.soft_pos):
            spelled = d.vocab.bytes_of(full_ids[:start + pos + 1])  # the drafter's context
            c = before.index(spelled)  # ... is the text before some target token c
            assert c not in seen
            seen.add(c)
            row = p[c] * in_inter
            assert torch.allclose(ex.soft_p[n], torch.topk(row, 8).values)
            assert all(in_inter[ex.soft_ids[n].long()])
        # hard labels (for --sampled-ce-weight): the drafter tokens wholly inside the continuation
        labelled = d.vocab.bytes_of([ex.ids[q + 1] for q in ex.hard_pos])
        assert cont.encode().endswith(labelled) and len(labelled) >= len(cont.encode()) - 16
        # complete: every target boundary the drafter's tokenization shares is a soft position
        d_prefixes = {len(d.vocab.bytes_of(full_ids[:j])) for j in range(1, len(full_ids))}
        assert seen == {c for c in range(len(new_bytes)) if len(before[c]) in d_prefixes}
        token = soft_example(d, prompt, new_bytes, p, in_inter, temperature=1.0, label_top_k=8,
                             match="token")
        assert token is None or len(token.soft_pos) <= len(ex.soft_pos)


def test_hard_example_labels_only_the_continuation(assets):
    d = _adapter("gpt2")
    prompt, cont = "def f(x):\n", "    return x + 1\n"
    ex = hard_example(d, prompt, cont)
    labels = [ex.ids[p + 1] for p in ex.hard_pos]
    assert d.vocab.bytes_of(labels) == cont.encode()
