"""Vocabularies as byte strings, and the token-level bridge between two of them.

What it does
------------
Every token id of a model is reduced to the exact bytes it stands for in the text (``Vocab``).
Two vocabularies are then compared byte string by byte string:

* ``same_vocabulary`` decides whether drafter ids *are* target ids (standard SD applies);
* ``build_id_map`` maps each drafter id to the target id with the same byte string (TLI);
* ``project_to_target`` turns a drafter distribution ``q`` over ``V_draft`` into the proposal
  ``q'(x) = q(x)·1[x∈I] / q(I)`` over ``V_target`` that TLI samples from and verifies against.

How token strings become bytes (``token_to_bytes``)
---------------------------------------------------
Tokenizers store tokens as *strings* in one of three conventions:

* ``byte_level`` (GPT-2, Qwen, Llama-3, OLMo, Falcon, NeoX, Phi-2): every byte 0..255 is written as
  one printable character of the GPT-2 byte alphabet (``bytes_to_unicode``), e.g. the space is
  ``Ġ`` and newline ``Ċ``.  The alphabet is a bijection, so a token's bytes are recovered by mapping
  each character back.  A character outside the alphabet can only come from text stored literally
  (added tokens); it stands for its own UTF-8, which is also what the tokenizers library's ByteLevel
  decoder does.
* ``sentencepiece`` (Llama-2, Mistral, Phi-3, T5, llama2.c): a space is written ``▁`` (U+2581), and
  with byte fallback a single byte is written ``<0xNN>``.  ``<0xNN>`` therefore maps to exactly one
  byte (which may be half of a UTF-8 character); anything else is its UTF-8 after ``▁``→space.
* ``plain``: the string is the text.

Special and control tokens (BOS, EOS, chat markers, ``<unk>``, padding rows beyond the tokenizer)
stand for no text: their byte string is ``b""``.  *Added* non-special tokens (e.g. Phi-2's runs of
spaces) are matched by the tokenizer against the raw text, so their bytes are their literal content
(``Vocab.from_tokens(added=...)``).

Why the bridge is correct
-------------------------
Verification in TLI is standard speculative sampling on target ids, which is lossless for *any*
proposal distribution provided that the verifier uses exactly the distribution the draft was drawn
from.  ``project_to_target`` builds that distribution deterministically: mass of drafter ids whose
bytes equal a target token's bytes is added onto that target id (several drafter ids may land on one
target id - their masses add, which is what "the drafter proposes this target token" means), the rest
is dropped, and the row is renormalised by the kept mass ``q(I)``.  Equality of byte strings (not of
token strings) is the right notion of "same token" because two tokenizers write the same text with
different markers (``Ġ`` vs ``▁``, ``<0x0A>`` vs ``Ċ``).  Specials and empty strings never map: they
are not text, and mapping e.g. one model's EOS onto another's is a decision for the engine, not a
string identity.  ``same_vocabulary`` never looks at ``vocab_size``: two vocabularies are the same
exactly when every id has the same byte string and the same special status.

This module is pure: stdlib and torch only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Literal, Mapping, Sequence

import torch

__all__ = [
    "Scheme",
    "bytes_to_unicode",
    "unicode_to_bytes",
    "token_to_bytes",
    "detect_scheme",
    "Vocab",
    "same_vocabulary",
    "build_id_map",
    "project_to_target",
]

Scheme = Literal["byte_level", "sentencepiece", "plain"]
SCHEMES: tuple[str, ...] = ("byte_level", "sentencepiece", "plain")

SPIECE_UNDERLINE = "\u2581"  # ▁
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte alphabet: byte value -> one printable character.

    Bytes that are already printable and not whitespace (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    stand for themselves; the remaining 68 bytes (controls, space, DEL, NBSP, soft hyphen, ...) are
    given the characters U+0100, U+0101, ... in increasing byte order.  Space (0x20) thus becomes
    U+0120 ``Ġ`` and newline (0x0A) U+010A ``Ċ``.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    keep = set(printable)
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_B2U: dict[int, str] = bytes_to_unicode()
_U2B: dict[str, int] = {c: b for b, c in _B2U.items()}
# str.translate table for the fast path of byte_level decoding: alphabet characters go to the
# latin-1 character of their byte; raw characters 0..255 that are NOT in the alphabet go to a
# character that latin-1 cannot encode, which sends the token to the exact (slow) path.
_FAST_TABLE: dict[int, int] = {ord(c): b for b, c in _B2U.items()}
for _b in range(256):
    if chr(_b) not in _U2B:
        _FAST_TABLE[_b] = 0xFFFF


def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`: alphabet character -> byte value."""
    return dict(_U2B)


def _byte_level_to_bytes(token: str) -> bytes:
    try:
        return token.translate(_FAST_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        out = bytearray()
        for ch in token:
            b = _U2B.get(ch)
            if b is None:
                out += ch.encode("utf-8", "surrogatepass")
            else:
                out.append(b)
        return bytes(out)


def token_to_bytes(token: str, scheme: Scheme) -> bytes:
    """The bytes a token string stands for under ``scheme`` (see the module docstring)."""
    if scheme == "byte_level":
        return _byte_level_to_bytes(token)
    if scheme == "sentencepiece":
        m = _BYTE_TOKEN.fullmatch(token)
        if m is not None:
            return bytes([int(m.group(1), 16)])
        return token.replace(SPIECE_UNDERLINE, " ").encode("utf-8", "surrogatepass")
    if scheme == "plain":
        return token.encode("utf-8", "surrogatepass")
    raise ValueError(f"unknown token scheme {scheme!r}; expected one of {SCHEMES}")


def detect_scheme(tokens: Sequence[str | None]) -> Scheme:
    """Guess the scheme from token strings alone.

    Byte-level vocabularies contain the whole byte alphabet and many ``Ġ``-prefixed words and never a
    literal ``▁`` (U+2581 would be written ``âĸģ``); SentencePiece vocabularies contain many
    ``▁``-prefixed pieces and, with byte fallback, ``<0xNN>`` tokens.  The scheme with clearly more
    evidence wins; no evidence means ``plain``.
    """
    n_g = n_sp = 0
    for t in tokens:
        if not t or not isinstance(t, str):
            continue
        if t[0] == "\u0120" or t[0] == "\u010a":  # Ġ, Ċ
            n_g += 1
        elif t[0] == SPIECE_UNDERLINE or (len(t) == 6 and _BYTE_TOKEN.fullmatch(t)):
            n_sp += 1
    if n_g == 0 and n_sp == 0:
        return "plain"
    return "byte_level" if n_g > n_sp else "sentencepiece"


@dataclass(frozen=True)
class Vocab:
    """The byte string of every token id of one model.

    ``token_bytes[i]`` is the text token ``i`` stands for, as bytes; ``b""`` for specials/control
    tokens and for ids without a token (padding rows of a larger embedding).  ``special_ids`` are
    the ids that are not text.
    """

    token_bytes: tuple[bytes, ...]
    special_ids: frozenset[int] = field(default_factory=frozenset)
    scheme: Scheme = "plain"

    def __post_init__(self) -> None:
        if not isinstance(self.token_bytes, tuple):
            object.__setattr__(self, "token_bytes", tuple(self.token_bytes))
        if not isinstance(self.special_ids, frozenset):
            object.__setattr__(self, "special_ids", frozenset(int(i) for i in self.special_ids))
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown token scheme {self.scheme!r}; expected one of {SCHEMES}")

    @property
    def size(self) -> int:
        """Number of ids (rows of the logits this vocabulary describes)."""
        return len(self.token_bytes)

    def __len__(self) -> int:
        return len(self.token_bytes)

    def bytes_of(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of ``ids`` (specials contribute nothing)."""
        tb = self.token_bytes
        return b"".join([tb[int(i)] for i in ids])

    def text_of(self, ids: Iterable[int]) -> str:
        """``bytes_of(ids)`` decoded as UTF-8 with U+FFFD for invalid/partial bytes."""
        return self.bytes_of(ids).decode("utf-8", "replace")

    def padded(self, n: int) -> "Vocab":
        """The same vocabulary extended with empty entries to ``n`` ids (the model's logit size)."""
        if n < self.size:
            raise ValueError(
                f"cannot pad a vocabulary of {self.size} ids down to {n}; use truncated() explicitly"
            )
        if n == self.size:
            return self
        return Vocab(self.token_bytes + (b"",) * (n - self.size), self.special_ids, self.scheme)

    def truncated(self, n: int) -> "Vocab":
        """The first ``n`` ids only (a model whose embedding is smaller than its tokenizer)."""
        if n >= self.size:
            return self.padded(n)
        return Vocab(
            self.token_bytes[:n], frozenset(i for i in self.special_ids if i < n), self.scheme
        )

    def is_text(self, i: int) -> bool:
        """True for ids that stand for a non-empty, non-special piece of text."""
        return i not in self.special_ids and 0 <= i < self.size and bool(self.token_bytes[i])

    @cached_property
    def bytes_to_id(self) -> dict[bytes, int]:
        """Byte string -> lowest non-special id with that byte string (empty strings excluded)."""
        out: dict[bytes, int] = {}
        specials = self.special_ids
        for i, b in enumerate(self.token_bytes):
            if b and i not in specials and b not in out:
                out[b] = i
        return out

    @classmethod
    def from_tokens(
        cls,
        tokens: Sequence[str | bytes | None],
        scheme: Scheme,
        special_ids: Iterable[int] = (),
        added: Mapping[int, str] | None = None,
    ) -> "Vocab":
        """Build from token strings indexed by id.

        ``tokens[i]`` is the tokenizer's string for id ``i`` (``None`` for a hole; a ``bytes``
        entry is taken as the token's bytes directly, as tiktoken-style tokenizers report them).
        ``special_ids`` get ``b""``.  ``added`` maps ids of added *non-special* tokens to their
        literal content, whose bytes are ``content.encode()`` whatever the scheme.
        """
        added = dict(added or {})
        specials = frozenset(int(i) for i in special_ids)
        n = len(tokens)
        if added:
            n = max(n, max(added) + 1)
        if specials:
            n = max(n, max(specials) + 1)
        out: list[bytes] = [b""] * n
        for i, t in enumerate(tokens):
            if t is None:
                continue
            if isinstance(t, (bytes, bytearray)):
                out[i] = bytes(t)
            else:
                out[i] = token_to_bytes(t, scheme)
        for i, content in added.items():
            out[int(i)] = content.encode("utf-8", "surrogatepass")
        for i in specials:
            if i >= 0:
                out[i] = b""
        return cls(tuple(out), specials, scheme)


def same_vocabulary(a: Vocab, b: Vocab) -> bool:
    """True when drafter ids can be used as target ids directly.

    Every id below ``max(a.size, b.size)`` must have the same byte string (a missing id counts as
    ``b""``, so a padded and an unpadded copy of one vocabulary are the same) and the special sets
    must be equal.  Never decided by size.
    """
    if a.special_ids != b.special_ids:
        return False
    ta, tb = a.token_bytes, b.token_bytes
    n = min(len(ta), len(tb))
    if ta[:n] != tb[:n]:
        return False
    rest = ta[n:] if len(ta) > n else tb[n:]
    return not any(rest)


def build_id_map(drafter: Vocab, target: Vocab) -> torch.Tensor:
    """``[drafter.size]`` LongTensor: the target id with the drafter token's byte string, or -1.

    Specials and empty byte strings never map; when several target ids share a byte string the
    lowest one is used; many drafter ids may map onto one target id.
    """
    lookup = target.bytes_to_id
    specials = drafter.special_ids
    out = [-1] * drafter.size
    for i, b in enumerate(drafter.token_bytes):
        if b and i not in specials:
            j = lookup.get(b)
            if j is not None:
                out[i] = j
    return torch.tensor(out, dtype=torch.long)


class Projection:
    """``project_to_target`` for one ``(id_map, target_size)``, with the intersection's columns
    and their target ids computed once (a proposer projects one row per drafted token)."""

    def __init__(self, id_map: torch.Tensor, target_size: int):
        if id_map.dim() != 1:
            raise ValueError(f"id_map must be 1-D, got shape {tuple(id_map.shape)}")
        id_map = id_map.to(dtype=torch.long)
        if id_map.numel() and int(id_map.max()) >= target_size:
            raise ValueError(f"id_map points at target id {int(id_map.max())} >= target_size "
                             f"{target_size}")
        self.v_draft, self.target_size = id_map.numel(), target_size
        self.cols = torch.nonzero(id_map >= 0, as_tuple=False).flatten()  # drafter ids in I
        self.dest = id_map[self.cols]  # their target ids

    def __call__(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.shape[-1] < self.v_draft:
            raise ValueError(f"q has {q.shape[-1]} drafter columns but id_map covers "
                             f"{self.v_draft} drafter ids")
        cols, dest = self.cols.to(q.device), self.dest.to(q.device)
        kept = q.index_select(-1, cols)  # [..., |I|]
        out = torch.zeros(*q.shape[:-1], self.target_size, dtype=q.dtype, device=q.device)
        out.index_add_(out.dim() - 1, dest, kept)  # [..., V_target]
        mass = kept.sum(-1)  # [...]
        positive = mass > 0
        denom = torch.where(positive, mass, torch.ones_like(mass))
        q_prime = out / denom.unsqueeze(-1)
        q_prime = torch.where(positive.unsqueeze(-1), q_prime, torch.zeros_like(q_prime))
        return q_prime, mass


def project_to_target(
    q: torch.Tensor, id_map: torch.Tensor, target_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict drafter probabilities to the intersection and move them onto target ids.

    ``q``: ``[..., V_draft]`` probabilities.  Returns ``(q_prime, mass)`` where ``q_prime`` is
    ``[..., V_target]``: the mass of each mapped drafter id added onto its target id, divided by
    ``mass = q(I)`` (``[...]``, the total mapped mass).  Rows with zero mapped mass come back as all
    zeros with mass 0 (the caller decides what to do).  Drafter columns beyond ``id_map`` (padding
    rows of the drafter's logits) are unmapped.  The dtype of ``q`` is kept.
    """
    return Projection(id_map, target_size)(q)
