"""Incremental detokenization: token ids in, complete characters out.

What it does
------------
Tokens stand for bytes, not characters: a byte-level or byte-fallback token can end in the middle
of a UTF-8 character (an emoji is often four ``<0xNN>`` tokens).  ``IncrementalDetokenizer`` turns a
stream of ids into text as it arrives, emitting only characters that can no longer change, so that a
streamed response never shows half a character or a replacement character that later tokens would
have completed.

Why it is correct
-----------------
The invariant is: concatenating every ``push`` and the final ``flush`` gives exactly
``b"".join(bytes).decode("utf-8", "replace")`` of the whole stream, for any split of the ids into
pushes.  Python's decoder replaces each *maximal subpart* of an ill-formed sequence by one U+FFFD
(Unicode §3.9): at a lead byte it consumes continuation bytes while they can still complete a valid
character and stops at the first byte that cannot.  Its output for a prefix ``b[:n]`` is therefore a
prefix of its output for ``b`` whenever position ``n`` is a *boundary*: the bytes after the last
character start are not a proper prefix of some valid character (they are empty, complete, or
already invalid).  ``valid_utf8_prefix_len`` finds the longest such boundary; only the (at most
three) bytes after it are held back, and they are decoded together with the next bytes, so the
decoder sees them in the same context as in the one-shot decode.  ``flush`` decodes whatever is
held back on its own, exactly as the one-shot decode treats a truncated final character (one
U+FFFD per maximal subpart).

Pure: stdlib only.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["IncrementalDetokenizer", "valid_utf8_prefix_len"]


def _seq_len(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte starts, or 0 when it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # continuation byte, C0, C1, F5..FF


def _second_ok(lead: int, b: int) -> bool:
    """Whether ``b`` may follow ``lead`` as the second byte (excludes overlongs, surrogates, >U+10FFFF)."""
    if lead == 0xE0:
        return 0xA0 <= b <= 0xBF
    if lead == 0xED:
        return 0x80 <= b <= 0x9F
    if lead == 0xF0:
        return 0x90 <= b <= 0xBF
    if lead == 0xF4:
        return 0x80 <= b <= 0x8F
    return 0x80 <= b <= 0xBF


def valid_utf8_prefix_len(b: bytes) -> int:
    """Length of the longest prefix of ``b`` that ends on a character boundary.

    Only a trailing *incomplete but so far valid* multi-byte sequence is excluded (it may still be
    completed by later bytes).  Invalid bytes anywhere, including at the end, count as complete
    one-byte "characters": no later byte can change how they decode.
    """
    n = len(b)
    # A pending sequence is at most 3 bytes long, so its lead is among the last 3 bytes.
    for start in range(n - 1, max(n - 4, -1), -1):
        lead = b[start]
        if 0x80 <= lead <= 0xBF:
            continue  # continuation byte: keep looking for the lead
        need = _seq_len(lead)
        have = n - start
        if need <= 1 or have >= need:
            return n  # ASCII, invalid lead, or a lead whose sequence is complete (or overlong-invalid)
        # Incomplete: is what we have a valid prefix of some character?
        if have >= 2 and not _second_ok(lead, b[start + 1]):
            return n
        for k in range(start + 2, n):
            if not (0x80 <= b[k] <= 0xBF):
                return n
        return start
    return n


class IncrementalDetokenizer:
    """Streams text for a sequence of token ids; see the module docstring for the invariant.

    ``token_bytes[i]`` is the byte string of id ``i`` (``Vocab.token_bytes``).
    """

    __slots__ = ("_tb", "_pending", "_parts", "_emitted_bytes", "_byte_len", "_n_ids")

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._tb = token_bytes
        self._pending = b""
        self._parts: list[str] = []
        self._emitted_bytes = 0
        self._byte_len = 0
        self._n_ids = 0

    def _bytes(self, ids: Iterable[int]) -> bytes:
        tb = self._tb
        n = len(tb)
        chunks = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (size {n})")
            chunks.append(tb[i])
            self._n_ids += 1
        return b"".join(chunks)

    def push(self, ids: Iterable[int]) -> str:
        """Add tokens; return the characters that became complete (possibly ``""``)."""
        new = self._bytes(ids)
        if not new:
            return ""
        self._byte_len += len(new)
        buf = self._pending + new
        cut = valid_utf8_prefix_len(buf)
        self._pending = buf[cut:]
        if cut == 0:
            return ""
        text = buf[:cut].decode("utf-8", "replace")
        self._emitted_bytes += cut
        self._parts.append(text)
        return text

    def flush(self) -> str:
        """Emit whatever is held back (a dangling partial character becomes U+FFFD)."""
        if not self._pending:
            return ""
        text = self._pending.decode("utf-8", "replace")
        self._emitted_bytes += len(self._pending)
        self._pending = b""
        self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """All text emitted so far (by ``push`` and ``flush``)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def byte_len(self) -> int:
        """Total bytes of all ids pushed so far (emitted and held back)."""
        return self._byte_len

    @property
    def emitted_byte_len(self) -> int:
        """Bytes already turned into ``text``."""
        return self._emitted_bytes

    @property
    def pending(self) -> bytes:
        """Bytes held back because they may be the start of a character."""
        return self._pending

    @property
    def num_ids(self) -> int:
        """Number of ids pushed so far."""
        return self._n_ids
