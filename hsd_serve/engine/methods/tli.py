"""TLI: token-level intersection.

Drafter ids map to target ids when their byte strings are equal (``core.vocab.build_id_map``).
The proposal over target ids is the drafter's distribution restricted to the intersection ``I``,
pushed onto target ids and renormalised, ``q'(x) = q(x)·1[x∈I] / q(I)``
(``core.vocab.project_to_target``), cut to its top-m entries and renormalised again.  The draft is
sampled from exactly that row and the row is what the verifier gets, so speculative sampling stays
lossless (``core.speculative``).  Greedy: the drafter's argmax inside ``I``, a one-hot row.  When
``q(I) = 0`` drafting stops early (a round with no draft is a plain target step).
"""

import torch

from hsd_serve.core.sampling import DRAFT, gumbel_sample, process_logits
from hsd_serve.core.speculative import truncate_proposal
from hsd_serve.core.vocab import Projection
from hsd_serve.engine.methods.base import Method
from hsd_serve.engine.protocol import Draft


class TLI(Method):
    name = "tli"

    def proposer(self, worker) -> "TLIProposer":
        return TLIProposer(worker.id_map, worker.model.logit_size, worker.target_vocab.size,
                           worker.proposal_top_m)

    def drafts_argmax(self, params) -> bool:
        return params.greedy  # sampled drafts come with their proposal rows


class TLIProposer:
    def __init__(self, id_map: torch.Tensor, v_draft: int, v_target: int, top_m: int):
        self.id_map = id_map  # [V_draft'] drafter id -> target id with the same bytes, or -1
        self.v_target = v_target
        self.top_m = top_m
        self.project = Projection(id_map, v_target)
        self.in_i = torch.zeros(v_draft, dtype=torch.bool)  # [V_draft] drafter ids in I
        self.in_i[:id_map.numel()] = id_map >= 0
        self.back = torch.full((v_target,), -1, dtype=torch.long)  # [V_target] -> drafter id
        mapped = torch.nonzero(id_map >= 0).flatten()
        self.back[id_map[mapped].flip(0)] = mapped.flip(0)  # lowest drafter id wins

    def draft(self, st, k: int, position: int, attempt: int = 0):
        id_map, v_target = self.id_map, self.v_target
        drafter_ids: list[int] = []
        targets: list[int] = []
        rows = []
        for i in range(k):
            logits = yield st.text.ids + drafter_ids
            if st.params.greedy:
                d = int(torch.argmax(logits.masked_fill(~self.in_i, float("-inf"))))
                t = int(id_map[d])
                q = torch.zeros(v_target)
                q[t] = 1.0
            else:
                q, mass = self.project(process_logits(logits, st.params)[:id_map.numel()])
                if float(mass) <= 0.0:
                    break
                q = truncate_proposal(q, self.top_m)
                t = gumbel_sample(q, st.params.seed, position + i, DRAFT, salt=attempt)
                d = int(self.back[t])
            drafter_ids.append(d)
            targets.append(t)
            rows.append(q)
        return Draft(drafter_ids=drafter_ids, target_ids=targets,
                     proposals=torch.stack(rows) if rows else None)
