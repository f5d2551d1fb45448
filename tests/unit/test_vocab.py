"""Pure tests of hsd_serve.core.vocab and hsd_serve.core.detok (no tokenizer files needed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_serve.core.detok import IncrementalDetokenizer, valid_utf8_prefix_len
from hsd_serve.core.vocab import (
    Vocab,
    build_id_map,
    bytes_to_unicode,
    detect_scheme,
    project_to_target,
    same_vocabulary,
    token_to_bytes,
    unicode_to_bytes,
)

# ----------------------------------------------------------------------------- byte alphabet


def test_byte_alphabet_is_a_bijection_on_256_bytes():
    b2u = bytes_to_unicode()
    assert sorted(b2u) == list(range(256))
    assert len(set(b2u.values())) == 256
    assert all(len(c) == 1 for c in b2u.values())
    u2b = unicode_to_bytes()
    assert all(u2b[c] == b for b, c in b2u.items())
    # printable, non-space bytes stand for themselves; the others are shifted above U+00FF
    for b, c in b2u.items():
        ch = chr(b)
        if ch.isprintable() and not ch.isspace():
            assert c == ch
        else:
            assert ord(c) >= 256
    assert b2u[ord(" ")] == "\u0120"  # Ġ
    assert b2u[ord("\n")] == "\u010a"  # Ċ
    assert b2u[ord("\t")] == "\u0109"  # ĉ


def test_byte_level_tokens():
    b2u = bytes_to_unicode()
    for b in range(256):
        assert token_to_bytes(b2u[b], "byte_level") == bytes([b])
    assert token_to_bytes("Ġhello", "byte_level") == b" hello"
    assert token_to_bytes("ĊĊ", "byte_level") == b"\n\n"
    # U+2581 is stored as its 3 UTF-8 bytes in the alphabet
    assert token_to_bytes("âĸģ", "byte_level") == "\u2581".encode()
    # a byte-level token can be half of a character
    assert token_to_bytes("ðŁ", "byte_level") == "😀".encode()[:2]
    # characters outside the alphabet (literal added tokens) stand for their UTF-8
    assert token_to_bytes("    ", "byte_level") == b"    "
    assert token_to_bytes("\t\t", "byte_level") == b"\t\t"
    assert token_to_bytes("日本", "byte_level") == "日本".encode()
    assert token_to_bytes("Ġ日", "byte_level") == " 日".encode()
    assert token_to_bytes("\u00a0", "byte_level") == "\u00a0".encode()  # NBSP is not in the alphabet
    assert token_to_bytes("", "byte_level") == b""


def test_sentencepiece_tokens():
    for b in range(256):
        assert token_to_bytes(f"<0x{b:02X}>", "sentencepiece") == bytes([b])
    assert token_to_bytes("<0x0a>", "sentencepiece") == b"\n"
    assert token_to_bytes("▁the", "sentencepiece") == b" the"
    assert token_to_bytes("▁▁▁", "sentencepiece") == b"   "
    assert token_to_bytes("日本", "sentencepiece") == "日本".encode()
    # not exactly a byte token: literal text
    assert token_to_bytes("<0x0A>x", "sentencepiece") == b"<0x0A>x"
    assert token_to_bytes("<0x0G>", "sentencepiece") == b"<0x0G>"
    assert token_to_bytes("<0x100>", "sentencepiece") == b"<0x100>"


def test_plain_tokens_and_unknown_scheme():
    assert token_to_bytes("▁Ġx", "plain") == "▁Ġx".encode()
    with pytest.raises(ValueError):
        token_to_bytes("x", "bogus")  # type: ignore[arg-type]


def test_detect_scheme():
    assert detect_scheme(["a", "b", "Ġthe", "Ġa", "ĊĊ", "ing"]) == "byte_level"
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    assert detect_scheme(["<unk>", "<s>", "</s>"] + byte_tokens + ["▁the", "ing"]) == "sentencepiece"
    assert detect_scheme(["▁the", "▁a", "s"]) == "sentencepiece"
    assert detect_scheme(["the", "a", "s", None]) == "plain"
    assert detect_scheme([]) == "plain"


# ----------------------------------------------------------------------------- Vocab


def test_vocab_from_tokens_specials_added_holes():
    tokens = ["<unk>", "<s>", "</s>", "<0x0A>", "▁the", "▁", None, "ing"]
    v = Vocab.from_tokens(tokens, "sentencepiece", special_ids={0, 1, 2}, added={8: "    "})
    assert v.size == 9
    assert v.token_bytes[:3] == (b"", b"", b"")
    assert v.token_bytes[3] == b"\n"
    assert v.token_bytes[4] == b" the"
    assert v.token_bytes[6] == b""  # hole
    assert v.token_bytes[8] == b"    "  # added: literal content
    assert v.special_ids == frozenset({0, 1, 2})
    assert v.bytes_of([1, 4, 5, 7, 3, 2]) == b" the ing\n"
    assert v.bytes_of([]) == b""
    assert v.is_text(4) and not v.is_text(1) and not v.is_text(6)


def test_vocab_added_literal_even_when_it_looks_encoded():
    # Phi-2-like: an added non-special token whose content uses alphabet characters is literal text
    v = Vocab.from_tokens(["a", "Ġb"], "byte_level", added={2: "Ġc"})
    assert v.token_bytes == (b"a", b" b", "Ġc".encode())


def test_vocab_padded_and_truncated():
    v = Vocab.from_tokens(["a", "b", "<eos>"], "plain", special_ids={2})
    p = v.padded(8)
    assert p.size == 8 and p.token_bytes[3:] == (b"",) * 5 and p.special_ids == v.special_ids
    assert v.padded(3) is v
    with pytest.raises(ValueError):
        v.padded(2)
    t = v.truncated(2)
    assert t.token_bytes == (b"a", b"b") and t.special_ids == frozenset()


def test_same_vocabulary():
    a = Vocab.from_tokens(["a", "Ġb", "<eos>"], "byte_level", special_ids={2})
    same_other_markers = Vocab.from_tokens(["a", "▁b", "<eos>"], "sentencepiece", special_ids={2})
    assert same_vocabulary(a, same_other_markers)  # bytes, not strings, decide
    assert same_vocabulary(a, a.padded(64)) and same_vocabulary(a.padded(64), a)
    assert not same_vocabulary(a, Vocab.from_tokens(["a", "Ġb", "<eos>"], "byte_level", special_ids=()))
    assert not same_vocabulary(a, Vocab.from_tokens(["a", "Ġc", "<eos>"], "byte_level", special_ids={2}))
    # same size, permuted ids: not the same
    assert not same_vocabulary(a, Vocab.from_tokens(["Ġb", "a", "<eos>"], "byte_level", special_ids={2}))
    # an extra real token: not the same
    assert not same_vocabulary(a, Vocab.from_tokens(["a", "Ġb", "<eos>", "x"], "byte_level", special_ids={2}))


# ----------------------------------------------------------------------------- id map


def _toy_pair():
    drafter = Vocab.from_tokens(
        # 0     1      2       3        4      5         6       7    8      9
        ["<s>", "</s>", "<0x20>", "▁", "▁the", "<0x41>", "A", "xyz", "▁the", None],
        "sentencepiece",
        special_ids={0, 1},
    )
    target = Vocab.from_tokens(
        # 0                1     2       3    4     5       6
        ["<|endoftext|>", "A", "Ġthe", "Ġ", "Ġthe", "</s>", "B"],
        "byte_level",
        special_ids={0},
    )
    return drafter, target


def test_build_id_map_toy():
    drafter, target = _toy_pair()
    m = build_id_map(drafter, target)
    assert m.dtype == torch.long and m.shape == (drafter.size,)
    assert m.tolist() == [
        -1,  # special <s>
        -1,  # special </s> (even though the target has a *text* token "</s>")
        3,  # byte 0x20 -> "Ġ"  (many-to-one with id 3)
        3,  # "▁" -> "Ġ"
        2,  # " the" -> lowest target id with that byte string
        1,  # byte 0x41 -> "A" (many-to-one with id 6)
        1,
        -1,  # no such string in the target
        2,  # duplicate drafter string maps too
        -1,  # hole (empty)
    ]
    back = build_id_map(target, drafter)
    assert back.tolist() == [-1, 5, 4, 2, 4, -1, -1]  # "A" -> lowest id 5 (<0x41>), " " -> 2 (<0x20>)


def test_project_to_target_exact_float64():
    drafter, target = _toy_pair()
    m = build_id_map(drafter, target)
    g = torch.Generator().manual_seed(0)
    q = torch.rand(4, 3, drafter.size, generator=g, dtype=torch.float64)
    q = q / q.sum(-1, keepdim=True)
    qp, mass = project_to_target(q, m, target.size)
    assert qp.shape == (4, 3, target.size) and mass.shape == (4, 3) and qp.dtype == torch.float64
    for idx in [(a, b) for a in range(4) for b in range(3)]:
        row = q[idx].tolist()
        expect_mass = sum(row[i] for i in range(drafter.size) if int(m[i]) >= 0)
        assert float(mass[idx]) == pytest.approx(expect_mass, rel=0, abs=1e-15)
        for t in range(target.size):
            num = sum(row[i] for i in range(drafter.size) if int(m[i]) == t)
            assert float(qp[idx][t]) == pytest.approx(num / expect_mass, rel=1e-14, abs=1e-15)
        assert float(qp[idx].sum()) == pytest.approx(1.0, abs=1e-14)
    # unmapped targets get nothing
    assert torch.all(qp[..., 0] == 0) and torch.all(qp[..., 5] == 0) and torch.all(qp[..., 6] == 0)


def test_project_to_target_zero_mass_dtype_and_padding_columns():
    drafter, target = _toy_pair()
    m = build_id_map(drafter, target)
    q = torch.zeros(2, drafter.size + 3, dtype=torch.float32)  # 3 padding columns of drafter logits
    q[0, 0] = 0.5
    q[0, 7] = 0.5  # all mass outside the intersection
    q[1, 5] = 0.25
    q[1, 6] = 0.25
    q[1, drafter.size + 1] = 0.5  # padding column: unmapped
    qp, mass = project_to_target(q, m, target.size)
    assert qp.dtype == torch.float32 and mass.dtype == torch.float32
    assert torch.all(qp[0] == 0) and float(mass[0]) == 0.0
    assert float(mass[1]) == pytest.approx(0.5)
    assert qp[1].tolist() == pytest.approx([0, 1.0, 0, 0, 0, 0, 0])
    # 1-D input
    qp1, mass1 = project_to_target(q[1], m, target.size)
    assert qp1.shape == (target.size,) and mass1.shape == ()
    assert torch.equal(qp1, qp[1])
    with pytest.raises(ValueError):
        project_to_target(q[:, :4], m, target.size)
    with pytest.raises(ValueError):
        project_to_target(q, m, 2)


# ----------------------------------------------------------------------------- detokenizer


def _is_incomplete_character(tail: bytes) -> bool:
    """tail is not a character yet, but some continuation bytes make it exactly one valid one."""
    try:
        tail.decode("utf-8")
        return False
    except UnicodeDecodeError:
        pass
    for first in range(0x80, 0xC0):
        for extra in range(0, 3):
            try:
                if len((tail + bytes([first]) + b"\x80" * extra).decode("utf-8")) == 1:
                    return True
            except UnicodeDecodeError:
                pass
    return False


def _oracle_prefix_len(b: bytes) -> int:
    # (CPython's incremental decoder is not usable as the oracle: it holds back e.g. b"\xed\xa9",
    # a surrogate prefix that can never complete, which the one-shot decode already replaces.)
    for k in range(1, min(3, len(b)) + 1):
        if _is_incomplete_character(b[-k:]):
            return len(b) - k
    return len(b)


_interesting = st.sampled_from(
    [b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac", b"\xf0", b"\x9f", b"\x98", b"\x80", b"\xed",
     b"\xa0", b"\xe0", b"\xf4", b"\x90", b"\xc0", b"\xff", b"\xbf", b"A", b" "]
)  # fmt: skip
_bytes_strategy = st.lists(st.one_of(_interesting, st.binary(max_size=3)), max_size=12).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(_bytes_strategy)
def test_valid_utf8_prefix_len_matches_the_incremental_decoder(b):
    assert valid_utf8_prefix_len(b) == _oracle_prefix_len(b)


def test_valid_utf8_prefix_len_examples():
    e = "€".encode()  # e2 82 ac
    assert valid_utf8_prefix_len(b"") == 0
    assert valid_utf8_prefix_len(b"ab") == 2
    assert valid_utf8_prefix_len(b"a" + e[:1]) == 1
    assert valid_utf8_prefix_len(b"a" + e[:2]) == 1
    assert valid_utf8_prefix_len(b"a" + e) == 4
    assert valid_utf8_prefix_len(b"a\x80") == 2  # lone continuation: complete (invalid) character
    assert valid_utf8_prefix_len(b"\xe2A") == 2  # broken sequence: complete
    assert valid_utf8_prefix_len(b"\xe0\x80") == 2  # overlong prefix can never complete
    assert valid_utf8_prefix_len(b"\xed\xa0") == 2  # surrogate prefix can never complete
    assert valid_utf8_prefix_len("😀".encode()[:3]) == 0
    assert valid_utf8_prefix_len(b"\xff") == 1


_token_strategy = st.one_of(
    _interesting,
    st.binary(min_size=0, max_size=4),
    st.text(max_size=3).map(lambda s: s.encode()),
    st.sampled_from(["😀".encode()[:1], "😀".encode()[1:], "é".encode()[:1], "€".encode()[1:]]),
)


@settings(max_examples=300, deadline=None)
@given(
    vocab=st.lists(_token_strategy, min_size=1, max_size=12),
    data=st.data(),
)
def test_incremental_detokenizer_matches_one_shot_decode(vocab, data):
    ids = data.draw(st.lists(st.integers(0, len(vocab) - 1), max_size=30))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    det = IncrementalDetokenizer(vocab)
    pieces = []
    prev = 0
    for c in cuts + [len(ids)]:
        out = det.push(ids[prev:c])
        pieces.append(out)
        prev = c
        assert det.text == "".join(pieces)
    whole = b"".join(vocab[i] for i in ids)
    assert det.byte_len == len(whole)
    pieces.append(det.flush())
    assert "".join(pieces) == whole.decode("utf-8", "replace")
    assert det.text == whole.decode("utf-8", "replace")
    assert det.emitted_byte_len == len(whole) and det.pending == b""
    assert det.flush() == ""


def test_incremental_detokenizer_holds_partial_characters():
    vocab = [b"a", "😀".encode()[:2], "😀".encode()[2:], b"\xe2\x82", b"!"]
    det = IncrementalDetokenizer(vocab)
    assert det.push([0, 1]) == "a"
    assert det.pending == "😀".encode()[:2]
    assert det.push([2]) == "😀"
    assert det.push([3]) == ""
    assert det.push([4]) == "\ufffd!"  # the truncated € became one U+FFFD, then "!"
    assert det.push([3]) == ""
    assert det.flush() == "\ufffd"
    assert det.text == "a😀\ufffd!\ufffd"
    with pytest.raises(ValueError):
        det.push([5])
