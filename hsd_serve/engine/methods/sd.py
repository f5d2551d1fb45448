"""SD: standard speculative sampling when drafter and target share one vocabulary.

The drafter runs on the committed target ids directly.  Each draft token is sampled from the
drafter's processed distribution cut to the target's logit size and to its top-m entries and
renormalised (argmax when greedy); that exact row is sent as the proposal, so the target's
speculative rule (``core.speculative``) is lossless.  "One vocabulary" is decided on the token
strings, not on the heads: a drafter whose head has fewer padding rows than the target's
(Qwen2.5-0.5B: 151,936 rows; Qwen2.5-7B: 152,064) gives the missing ids probability 0.
"""

import torch

from hsd_serve.core.sampling import DRAFT, gumbel_sample, process_logits
from hsd_serve.core.speculative import truncate_proposal
from hsd_serve.engine.methods.base import Method
from hsd_serve.engine.protocol import Draft


class SD(Method):
    name = "sd"

    def uses_ids(self, same_vocab: bool) -> bool:
        return True

    def check_pair(self, same_vocab: bool) -> None:
        if not same_vocab:
            raise ValueError("sd needs drafter and target to share one vocabulary")

    def proposer(self, worker) -> "SDProposer":
        return SDProposer(worker.target_vocab.size, worker.proposal_top_m)

    def drafts_argmax(self, params) -> bool:
        return params.greedy  # sampled drafts come with their proposal rows


class SDProposer:
    def __init__(self, v_target: int, top_m: int):
        self.v_target = v_target  # width of the proposal rows (the target's logit size)
        self.top_m = top_m

    def draft(self, st, k: int, position: int, attempt: int = 0):
        v_target = self.v_target
        drafts: list[int] = []
        rows = []
        for i in range(k):
            logits = (yield st.committed + drafts)[:v_target]
            if logits.shape[-1] < v_target:  # a narrower (less padded) head: those ids get q = 0
                logits = torch.nn.functional.pad(logits, (0, v_target - logits.shape[-1]),
                                                 value=float("-inf"))
            if st.params.greedy:
                t = int(torch.argmax(logits))
                q = torch.zeros(v_target)
                q[t] = 1.0
            else:
                q = truncate_proposal(process_logits(logits, st.params), self.top_m)
                t = gumbel_sample(q, st.params.seed, position + i, DRAFT, salt=attempt)
            drafts.append(t)
            rows.append(q)
        return Draft(drafter_ids=drafts, target_ids=list(drafts),
                     proposals=torch.stack(rows) if rows else None)
