"""SLRS: string-level rejection sampling, one target token per round (``core.slrs``).

The target sends its processed row ``p`` (``ROW`` rule); the drafter's byte stream proposes one
target token (the longest target string it starts with) with its exact proposal probability,
computed from drafter forwards over tokenization paths, and rejection sampling against ``p``
decides.  This module supplies those forwards (``path_dists``) from the request's drafter cache.
"""

import time

import torch

from hsd_serve.core.sampling import process_logits
from hsd_serve.engine.protocol import SLRSOutcome


class _DrafterPaths:
    """``core.slrs.DrafterOracle``: processed drafter rows after ``context + path[:j]``."""

    def __init__(self, st, top_k=None):
        self.st = st
        self.top_k = top_k
        self.context = list(st.text.ids)

    def path_dists(self, path: tuple[int, ...]) -> torch.Tensor:
        st = self.st
        t0 = time.perf_counter()
        logits = st.session.forward_from(self.context, list(path))
        st.draft_s += time.perf_counter() - t0
        st.forwards += 1
        q = process_logits(logits.double(), st.params)
        top_k = self.top_k
        if top_k and top_k < q.shape[-1]:  # the pair-level cap the cost estimate assumed
            kth = torch.topk(q, top_k, dim=-1).values[..., -1:]
            q = torch.where(q >= kth, q, torch.zeros_like(q))
            keep = torch.cumsum((q > 0).to(torch.int64), dim=-1) <= top_k  # ties: first k only
            q = q * keep
            q = q / q.sum(dim=-1, keepdim=True)
        return q


def slrs_step(worker, st, row: torch.Tensor, position: int) -> SLRSOutcome:
    res = worker.slrs().step(_DrafterPaths(st, worker.slrs_drafter_top_k), row.double(), seed=st.params.seed,
                             position=position)
    return SLRSOutcome(token=int(res.token), accepted=bool(res.accepted),
                       proposed=res.proposed is not None, drafter_ids=list(res.drafted_path))
