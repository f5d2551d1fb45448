"""SLEM: string-level exact match.

Drafter side (``draft_slem``): continue the committed text greedily for ``k`` drafter tokens and
send their bytes (on a shared vocabulary, the drafted ids themselves).  Coordinator side (``candidates``): re-encode those bytes with the target
tokenizer after a window of the committed text (``engine.sync.encode_after``).  Target side: the
``EXACT`` rule (``core.exact_match``): every emitted token is the target's own choice, so the output
is the target's whatever the candidates are.
"""

import torch

from hsd_serve.core.detok import valid_utf8_prefix_len
from hsd_serve.engine.protocol import Draft
from hsd_serve.engine.sync import encode_after

CANDIDATES_PER_DRAFT = 3  # cap on target candidates per unit of k (long drafter tokens)
MAX_DRAFT_PER_K = 4  # cap on drafter tokens per unit of k (whitespace runs)


def draft_slem(worker, st, k: int, position: int, attempt: int = 0):
    """Generator: yields each context it needs the drafter's logits after; returns the Draft.

    ``k`` counts drafted tokens the way most target tokenizers would: a run of whitespace-only
    drafter tokens (GPT-2 spells an 8-space indent as 8 tokens) counts once, so a round reaches
    past indentation; at most ``MAX_DRAFT_PER_K * k`` drafter tokens per round.
    """
    token_bytes = worker.model.vocab.token_bytes
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
    # shared vocabulary: the drafted ids are target ids already, no re-encoding needed
    return Draft(drafter_ids=drafted, text=b"".join(token_bytes[d] for d in drafted),
                 target_ids=list(drafted) if st.text is None else [])


def candidates(target_tokenizer, committed_bytes: bytes, text: bytes, k: int) -> list[int]:
    """Candidate target ids for drafted ``text`` following ``committed_bytes`` (prompt + output)."""
    text = text[:valid_utf8_prefix_len(text)]
    if not text:
        return []
    ids = encode_after(target_tokenizer, committed_bytes, text.decode("utf-8", errors="replace"))
    return ids[:CANDIDATES_PER_DRAFT * k]
