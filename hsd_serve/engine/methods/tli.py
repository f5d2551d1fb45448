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
from hsd_serve.core.vocab import project_to_target
from hsd_serve.engine.protocol import Draft


def _tables(worker):
    """(mask of drafter ids in I, one drafter id per target id) for this pair, cached."""
    if getattr(worker, "_tli_tables", None) is None:
        id_map = worker.id_map
        in_i = torch.zeros(worker.model.logit_size, dtype=torch.bool)
        in_i[:id_map.numel()] = id_map >= 0
        back = torch.full((worker.target_vocab.size,), -1, dtype=torch.long)
        mapped = torch.nonzero(id_map >= 0).flatten()
        back[id_map[mapped].flip(0)] = mapped.flip(0)  # lowest drafter id wins
        worker._tli_tables = (in_i, back)
    return worker._tli_tables


def draft_tli(worker, st, k: int, position: int, attempt: int = 0):
    """Generator: yields each context it needs the drafter's logits after; returns the Draft."""
    in_i, back = _tables(worker)
    id_map, v_target = worker.id_map, worker.target_vocab.size
    drafter_ids: list[int] = []
    targets: list[int] = []
    rows = []
    for i in range(k):
        logits = yield st.text.ids + drafter_ids
        if st.params.greedy:
            d = int(torch.argmax(logits.masked_fill(~in_i, float("-inf"))))
            t = int(id_map[d])
            q = torch.zeros(v_target)
            q[t] = 1.0
        else:
            q, mass = project_to_target(process_logits(logits, st.params)[:id_map.numel()],
                                        id_map, v_target)
            if float(mass) <= 0.0:
                break
            q = truncate_proposal(q, worker.proposal_top_m)
            t = gumbel_sample(q, st.params.seed, position + i, DRAFT, salt=attempt)
            d = int(back[t])
        drafter_ids.append(d)
        targets.append(t)
        rows.append(q)
    return Draft(drafter_ids=drafter_ids, target_ids=targets,
                 proposals=torch.stack(rows) if rows else None)
