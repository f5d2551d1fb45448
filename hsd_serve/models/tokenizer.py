"""Hugging Face tokenizers seen as byte vocabularies: loading, encoding, re-encoding continuations.

What it does
------------
``load_tokenizer`` loads any Hugging Face tokenizer (hub id or local directory; a directory holding
only ``tokenizer.json`` - or ``tokenizer.json.gz`` - also works).  ``TokenizerAdapter`` wraps it
with what the engine needs:

* ``vocab``: a :class:`hsd_serve.core.vocab.Vocab` - the exact bytes of every id, padded to the
  model's logit size - built from the tokenizer's own token strings with the scheme read from the
  tokenizer's decoder / pre-tokenizer configuration (ByteLevel -> ``byte_level``; Metaspace, a
  ``▁`` Replace or ByteFallback -> ``sentencepiece``), falling back to a heuristic on the strings;
* ``encode_prompt`` (the ids the model sees for a prompt, its own BOS included),
  ``encode_text`` (ids of a piece of text; special-token look-alikes such as ``"<s>"`` in the text
  are encoded as text, never as control tokens),
* ``encode_continuation(prev_text, text)``: the ids of ``text`` exactly as the tokenizer tokenizes it
  when it follows ``prev_text`` - what SLEM needs to turn drafted text into candidate target tokens.

Why ``encode_continuation`` is correct
--------------------------------------
It encodes ``prev_text + text`` in one piece (so merges across the join and SentencePiece's
"prepend ``▁`` to the whole input" happen exactly as they would for the whole document), and cuts
the id sequence at the token boundary that lies exactly at the end of ``prev_text``.  The boundary
is found in *bytes*: the token byte strings of the encoding are summed until they reach
``len(prev_text.encode())`` (plus one when the tokenizer prepended a space).  This is only done when
the encoding reproduces the input bytes exactly (or with exactly one prepended space), so the
returned ids' bytes are, by construction, exactly ``text.encode()``; when no token boundary falls
there (a token straddles the join), the answer is ``None``.  When the encoding does not reproduce
the input (a normaliser changed the text), the boundary is taken from the character offsets instead
(a boundary = every earlier token ends at or before it and the next token starts at or after it, so
the bytes of one character split into several byte-fallback tokens, which share offsets, are never
cut), and the result is returned only if its bytes equal ``text.encode()`` (``exact=True``, the
default).  Tokenizers without offsets fall back to comparing the id prefix of ``prev_text`` alone.
SentencePiece's dummy prefix is conditional in transformers 5's Llama-family tokenizers (a ``▁`` is
prepended only when the text does not already start with a space) and unconditional in raw
``tokenizer.json`` pipelines with a ``Prepend`` normalizer; the byte alignment accepts either.
With an empty ``prev_text`` the tokens are those of a text *continuation*: an anchor string
(``"\\n"``, then others) is put in front and stripped again, which removes SentencePiece's
prepended ``▁`` artifact.

Special-token look-alikes: ``encode_text`` runs the backend with ``encode_special_tokens=True`` so
``"<|endoftext|>"`` typed in text becomes ordinary text tokens (their bytes are the text).  Added
*non-special* tokens (Phi-2's whitespace runs, Phi-3's ``</s>``, OLMo-2's ``|||EMAIL_ADDRESS|||``)
are still matched, and their bytes are their literal content.  The toggle is done under a lock on
the shared backend and restored afterwards (transformers toggles the same flag on every call).

Hugging Face types stop here: the rest of the code sees ids, bytes and ``Vocab``.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

from hsd_serve.core.vocab import Scheme, Vocab, detect_scheme

__all__ = ["load_tokenizer", "TokenizerAdapter", "scheme_from_backend"]

log = logging.getLogger(__name__)

# Anchors put in front of a text to tokenize it "as a continuation" (see encode_continuation).
_ANCHORS: tuple[str, ...] = ("\n", ".", "a", " ", "0", "\n\n", "\u3002")

# Names that mark end-of-text in tokenizers that do not declare an eos_token.
_EOS_NAMES = frozenset(
    {
        "</s>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<eos>",
        "<|eos|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|end|>",
        "<end_of_turn>",
    }
)


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False) -> Any:
    """Load a Hugging Face tokenizer from a hub id or a local path.

    Tries ``AutoTokenizer.from_pretrained`` first.  A directory (or file) with a bare
    ``tokenizer.json`` / ``tokenizer.json.gz`` and no usable config falls back to
    ``PreTrainedTokenizerFast`` over that file.  Raises ``OSError`` naming the path otherwise.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    errors: list[str] = []
    p = Path(path_or_id)
    if not (p.is_file() and p.name.endswith((".json", ".json.gz"))):
        try:
            return AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"AutoTokenizer: {type(e).__name__}: {e}")
    candidates: list[Path] = []
    if p.is_dir():
        candidates = [p / "tokenizer.json", p / "tokenizer.json.gz"]
    elif p.is_file():
        candidates = [p]
    for c in candidates:
        if not c.is_file():
            continue
        try:
            if c.name.endswith(".gz"):
                from tokenizers import Tokenizer

                with gzip.open(c, "rt", encoding="utf-8") as f:
                    backend = Tokenizer.from_str(f.read())
                return PreTrainedTokenizerFast(tokenizer_object=backend)
            return PreTrainedTokenizerFast(tokenizer_file=str(c))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{c.name}: {type(e).__name__}: {e}")
    detail = "; ".join(errors) if errors else "no tokenizer files found"
    raise OSError(f"could not load a tokenizer from {str(path_or_id)!r}: {detail}")


def _component_json(component: Any) -> Any:
    """JSON of a tokenizers component (decoder, normalizer, pre-tokenizer), or None."""
    if component is None:
        return None
    try:
        state = component.__getstate__()
        if isinstance(state, (bytes, bytearray)):
            state = state.decode("utf-8")
        if isinstance(state, str):
            return json.loads(state)
    except Exception:  # noqa: BLE001 - best effort, the caller falls back to the heuristic
        return None
    return None


def _walk(obj: Any) -> Iterable[dict]:
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _scheme_of(obj: Any) -> Scheme | None:
    for node in _walk(obj):
        t = node.get("type")
        if t == "ByteLevel":
            return "byte_level"
        if t in ("Metaspace", "ByteFallback"):
            return "sentencepiece"
        if t == "Replace":
            pat = node.get("pattern", {})
            s = pat.get("String") if isinstance(pat, dict) else None
            if "\u2581" in (s or "") or "\u2581" in (node.get("content") or ""):
                return "sentencepiece"
    return None


def scheme_from_backend(backend: Any) -> Scheme | None:
    """Scheme from a ``tokenizers.Tokenizer``'s decoder, then pre-tokenizer, then normalizer."""
    if backend is None:
        return None
    for name in ("decoder", "pre_tokenizer", "normalizer"):
        s = _scheme_of(_component_json(getattr(backend, name, None)))
        if s is not None:
            return s
    return None


# Per-tokenizer cache of the (unpadded) vocabulary and related facts.
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


class TokenizerAdapter:
    """A Hugging Face tokenizer seen through :class:`Vocab` (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        model_vocab_size: int | None = None,
        *,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self.hf = tokenizer
        is_fast = getattr(tokenizer, "is_fast", True)
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if is_fast else None
        self._lock = threading.Lock()
        info = self._base_info()
        base: Vocab = info["vocab"]
        self.tokenizer_size: int = base.size
        self.model_vocab_size = model_vocab_size
        if model_vocab_size is None:
            self.vocab = base
        elif model_vocab_size >= base.size:
            self.vocab = base.padded(model_vocab_size)
        else:
            log.warning(
                "model logit size %d is smaller than the tokenizer's %d ids; ids >= %d are dropped",
                model_vocab_size,
                base.size,
                model_vocab_size,
            )
            self.vocab = base.truncated(model_vocab_size)
        self.scheme: Scheme = base.scheme
        self.scheme_source: str = info["scheme_source"]
        self.special_ids: frozenset[int] = self.vocab.special_ids
        self._added_specials: dict[int, str] = info["added_specials"]
        self.eos_ids: frozenset[int] = self._find_eos(extra_eos_ids)
        self.bos_id, self._template_prefix, self._template_suffix = self._find_template()
        # Can plain encoding prepend a space (SentencePiece's dummy prefix)?  transformers'
        # Llama-family tokenizers do it only when the text does not already start with a space;
        # raw tokenizer.json pipelines (Prepend normalizer) always do.  Either way the byte
        # alignment in encode_continuation / verify_roundtrip accepts exactly one extra space.
        probe = self.encode_text("a")
        self.prepends_space: bool = self.vocab.bytes_of(probe) == b" a"

    # ------------------------------------------------------------------ construction helpers

    def _base_info(self) -> dict:
        tok = self.hf
        try:
            with _CACHE_LOCK:
                hit = _CACHE.get(tok)
            if hit is not None and hit["n_tokens"] == len(tok):  # tokens added since: rebuild
                return hit
        except TypeError:
            hit = None
        info = self._build_base_info()
        try:
            with _CACHE_LOCK:
                _CACHE[tok] = info
        except TypeError:
            pass
        return info

    def _build_base_info(self) -> dict:
        tok = self.hf
        backend = self._backend
        added_dec: dict[int, Any] = {}
        try:
            added_dec = dict(getattr(tok, "added_tokens_decoder", {}) or {})
        except Exception:  # noqa: BLE001
            added_dec = {}
        n = len(tok)
        if backend is not None:
            n = max(n, backend.get_vocab_size(with_added_tokens=True))
        if added_dec:
            n = max(n, max(int(i) for i in added_dec) + 1)
        if backend is not None:
            id_to_token = backend.id_to_token
            tokens: list[Any] = [id_to_token(i) for i in range(n)]
        else:
            tokens = list(tok.convert_ids_to_tokens(list(range(n))))

        added_special = {int(i): str(a) for i, a in added_dec.items() if getattr(a, "special", False)}
        added_plain = {
            int(i): getattr(a, "content", str(a))
            for i, a in added_dec.items()
            if not getattr(a, "special", False)
        }
        specials = set(added_special)
        try:
            declared = [int(i) for i in tok.all_special_ids if i is not None]
        except Exception:  # noqa: BLE001
            declared = []
        # A declared special that the tokenizer itself matches as plain added text (e.g. Mistral
        # v0.3's [REFERENCE_DOC_n]) keeps its literal bytes: that is what encoding produces.
        specials.update(i for i in declared if i not in added_plain and 0 <= i < n)
        for i in declared:
            if i not in added_special and 0 <= i < n and i in specials:
                t = tokens[i]
                added_special.setdefault(i, t if isinstance(t, str) else "")

        scheme = scheme_from_backend(backend)
        source = "backend"
        if scheme is None:
            scheme = detect_scheme([t if isinstance(t, str) else None for t in tokens])
            source = "heuristic"
        # An added token flagged normalized=True in a SentencePiece pipeline whose normalizer
        # rewrites spaces to ▁ is matched after that rewrite: its ▁ stands for a space.
        added_text: dict[int, str] = {}
        for i, content in added_plain.items():
            a = added_dec.get(i)
            if scheme == "sentencepiece" and getattr(a, "normalized", False):
                content = content.replace("\u2581", " ")
            added_text[i] = content
        vocab = Vocab.from_tokens(tokens, scheme, specials, added_text)
        return {
            "n_tokens": len(tok),
            "vocab": vocab,
            "scheme_source": source,
            "added_specials": added_special,
        }

    def _find_eos(self, extra: Iterable[int]) -> frozenset[int]:
        tok = self.hf
        ids: set[int] = {int(i) for i in extra}
        eos = getattr(tok, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
        if eos is None:
            ids.update(i for i, c in self._added_specials.items() if c in _EOS_NAMES)
        return frozenset(i for i in ids if 0 <= i < self.vocab.size)

    def _find_template(self) -> tuple[int | None, list[int], list[int]]:
        """(bos_id, ids the template puts before the text, ids it puts after)."""
        tok = self.hf
        try:
            with_sp = list(tok.encode("a", add_special_tokens=True))
            without = list(tok.encode("a", add_special_tokens=False))
        except Exception:  # noqa: BLE001
            with_sp, without = [], []
        prefix: list[int] = []
        suffix: list[int] = []
        if without:
            for k in range(len(with_sp) - len(without) + 1):
                if with_sp[k : k + len(without)] == without:
                    prefix, suffix = with_sp[:k], with_sp[k + len(without) :]
                    break
        bos = getattr(tok, "bos_token_id", None)
        if not isinstance(bos, int):
            bos = prefix[0] if prefix and prefix[0] in self.special_ids else None
        return bos, prefix, suffix

    # ------------------------------------------------------------------ encoding

    def encode_prompt(self, text: str) -> list[int]:
        """Ids the model should see for a prompt: the tokenizer's own template (BOS) applied.

        End-of-sequence ids that the template *appends* (T5-style ``</s>``) are removed: a prompt
        is to be continued, not terminated.
        """
        ids = list(self.hf.encode(text, add_special_tokens=True))
        suf = self._template_suffix
        if suf and len(ids) >= len(suf) and ids[-len(suf) :] == suf and all(
            i in self.eos_ids or i in self.special_ids for i in suf
        ):
            ids = ids[: -len(suf)]
        return ids

    def _backend_encode(self, text: str) -> Any:
        b = self._backend
        with self._lock:
            prev = getattr(b, "encode_special_tokens", False)
            try:
                b.encode_special_tokens = True
                return b.encode(text, add_special_tokens=False)
            finally:
                b.encode_special_tokens = prev

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added and none recognised inside the text."""
        if self._backend is not None:
            return list(self._backend_encode(text).ids)
        try:
            return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))
        except TypeError:
            return list(self.hf.encode(text, add_special_tokens=False))

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        if self._backend is not None:
            enc = self._backend_encode(text)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        return self.encode_text(text), None

    def _cut_by_bytes(self, ids: list[int], full: bytes, cut: int) -> list[int] | None | bool:
        """Suffix of ``ids`` starting at byte ``cut`` of ``full``; None: no boundary there;
        False: the ids do not reproduce ``full`` (the caller must use another method)."""
        tb = self.vocab.token_bytes
        got = b"".join([tb[i] for i in ids])
        if got == full:
            target = cut
        elif self.prepends_space and got == b" " + full:
            target = cut + 1
        else:
            return False
        pos = 0
        for k, i in enumerate(ids):
            if pos == target:
                return ids[k:]
            pos += len(tb[i])
            if pos > target:
                return None
        return [] if pos == target else None

    @staticmethod
    def _cut_by_offsets(ids: list[int], offsets: list[tuple[int, int]], cut: int) -> list[int] | None:
        """Suffix of ``ids`` from the first token k with every earlier token ending at or before
        character ``cut`` and token k starting at or after it; None when a token spans ``cut``."""
        max_end = 0
        for k, (s, e) in enumerate(offsets):
            if max_end <= cut <= s:
                return ids[k:]
            max_end = max(max_end, e)
            if max_end > cut:
                return None
        return []

    def _continuation(self, prev_text: str, text: str, exact: bool) -> list[int] | None:
        whole = prev_text + text
        want = text.encode("utf-8", "surrogatepass")
        ids, offsets = self._encode_with_offsets(whole)
        r = self._cut_by_bytes(ids, whole.encode("utf-8", "surrogatepass"), len(prev_text.encode("utf-8", "surrogatepass")))
        if r is not False:
            return r  # type: ignore[return-value]
        if offsets is not None:
            suffix = self._cut_by_offsets(ids, offsets, len(prev_text))
        else:
            head = self.encode_text(prev_text)
            suffix = ids[len(head) :] if ids[: len(head)] == head else None
        if suffix is None:
            return None
        if exact and self.vocab.bytes_of(suffix) != want:
            return None
        return suffix

    def encode_continuation(self, prev_text: str, text: str, *, exact: bool = True) -> list[int] | None:
        """Ids of ``text`` as tokenized right after ``prev_text``, or None when no token boundary
        falls exactly at the end of ``prev_text`` (see the module docstring).

        With ``exact=True`` (default) a non-None result always satisfies
        ``vocab.bytes_of(result) == text.encode()``.  ``exact=False`` also accepts results whose
        bytes differ from ``text`` because the tokenizer normalised it (NFC, T5's whitespace rules).
        """
        if not text:
            return []
        if prev_text:
            return self._continuation(prev_text, text, exact)
        ids = self.encode_text(text)
        if self.vocab.bytes_of(ids) == text.encode("utf-8", "surrogatepass"):
            return ids
        for anchor in _ANCHORS:
            r = self._continuation(anchor, text, exact)
            if r is not None:
                return r
        if not exact:
            return ids
        return None

    # ------------------------------------------------------------------ bytes

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one id (``b""`` for specials and padding ids)."""
        return self.vocab.token_bytes[int(token_id)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of ``ids``."""
        return self.vocab.bytes_of(ids)

    def decode_text(self, ids: Iterable[int]) -> str:
        """``decode_bytes(ids)`` as text (U+FFFD for invalid or partial UTF-8)."""
        return self.vocab.bytes_of(ids).decode("utf-8", "replace")

    def verify_roundtrip(self, texts: Sequence[str]) -> list[str]:
        """Texts whose encoding does not reproduce them byte for byte.

        One extra leading space is allowed when the tokenizer prepends one (SentencePiece).
        """
        bad = []
        for t in texts:
            got = self.vocab.bytes_of(self.encode_text(t))
            want = t.encode("utf-8", "surrogatepass")
            if got == want or (self.prepends_space and got == b" " + want):
                continue
            bad.append(t)
        return bad

    def __repr__(self) -> str:
        name = getattr(self.hf, "name_or_path", "") or type(self.hf).__name__
        return (
            f"TokenizerAdapter({name!r}, scheme={self.scheme}, size={self.vocab.size}, "
            f"tokenizer_size={self.tokenizer_size}, eos={sorted(self.eos_ids)}, bos={self.bos_id})"
        )
