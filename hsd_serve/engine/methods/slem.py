"""SLEM: string-level exact match.

Drafter side (``SLEMProposer``): continue the committed text greedily for ``k`` drafter tokens and
send their bytes (on a shared vocabulary, the drafted ids themselves).  Coordinator side
(``SLEM.bridge``): re-encode those bytes with the target tokenizer after a window of the committed
text (``engine.sync.encode_after``).  Target side: the ``EXACT`` rule (``core.exact_match``): every
emitted token is the target's own choice, so the output is the target's whatever the candidates
are.
"""

import time

import torch

from hsd_serve.core.detok import valid_utf8_prefix_len
from hsd_serve.engine.methods.base import Method
from hsd_serve.engine.protocol import EXACT, Draft
from hsd_serve.engine.sync import encode_after

CANDIDATES_PER_DRAFT = 3  # cap on target candidates per unit of k (long drafter tokens)
MAX_DRAFT_PER_K = 4  # cap on drafter tokens per unit of k (whitespace runs)


class SLEM(Method):
    name = "slem"
    rule = EXACT
    branches_ahead = True

    def uses_ids(self, same_vocab: bool) -> bool:
        return same_vocab  # a shared vocabulary needs no re-encoding

    def drafts_argmax(self, params) -> bool:
        return True  # greedy drafts at any temperature: verification keeps the target's choices

    def proposer(self, worker) -> "SLEMProposer":
        return SLEMProposer(worker.model.vocab.token_bytes)

    def bridge(self, draft, run, k):
        if draft.target_ids:  # shared vocabulary: the drafted ids are target ids already
            return EXACT, list(draft.target_ids), None
        t0 = time.perf_counter()
        cands = candidates(run.tokenizer, run.committed_bytes(), draft.text, k)
        run.stats.bridge_s += time.perf_counter() - t0
        return EXACT, cands, None


class SLEMProposer:
    def __init__(self, token_bytes: list[bytes]):
        self.token_bytes = token_bytes

    def draft(self, st, k: int, position: int, attempt: int = 0):
        """``k`` counts drafted tokens the way most target tokenizers would: a run of
        whitespace-only drafter tokens (GPT-2 spells an 8-space indent as 8 tokens) counts once,
        so a round reaches past indentation; at most ``MAX_DRAFT_PER_K * k`` drafter tokens."""
        token_bytes = self.token_bytes
        drafted: list[int] = []
        counted = 0
        prev_space = False
        while counted < k and len(drafted) < MAX_DRAFT_PER_K * k:
            d = int(torch.argmax((yield st.context() + drafted)))
            if not token_bytes[d]:  # EOS or another special: the drafter's text ends here
                break
            drafted.append(d)
            space = not token_bytes[d].strip()
            counted += not (space and prev_space)
            prev_space = space
        return Draft(drafter_ids=drafted, text=b"".join(token_bytes[d] for d in drafted),
                     target_ids=list(drafted) if st.text is None else [])


def candidates(target_tokenizer, committed_bytes: bytes, text: bytes, k: int) -> list[int]:
    """Candidate target ids for drafted ``text`` following ``committed_bytes`` (prompt + output)."""
    text = text[:valid_utf8_prefix_len(text)]
    if not text:
        return []
    ids = encode_after(target_tokenizer, committed_bytes, text.decode("utf-8", errors="replace"))
    return ids[:CANDIDATES_PER_DRAFT * k]
