"""SLRS: string-level rejection sampling, one target token per round (``core.slrs``).

The target sends its processed row ``p`` first (``ROW`` rule); the drafter's byte stream proposes
one target token (the longest target string it starts with) with its exact proposal probability,
computed from drafter forwards over tokenization paths, and rejection sampling against ``p``
decides, on the drafter.  ``SLRSProposer`` supplies those forwards (``path_dists``) from the
request's drafter cache; it owns the pair's ``core.slrs.SLRS`` (building it refuses a pair over
the cost budget).
"""

import time

import torch

from hsd_serve.core.sampling import process_logits
from hsd_serve.engine.methods.base import Method, Round
from hsd_serve.engine.protocol import ROW, SLRSOutcome


class SLRS(Method):
    name = "slrs"
    rule = ROW

    def proposer(self, worker) -> "SLRSProposer":
        from hsd_serve.core.slrs import SLRS as Builder

        return SLRSProposer(Builder(worker.model.vocab, worker.target_vocab,
                                    drafter_eos_ids=worker.model.eos_ids,
                                    max_forwards=worker.slrs_max_forwards,
                                    max_target_bytes=worker.slrs_max_target_bytes,
                                    drafter_top_k=worker.slrs_drafter_top_k),
                            worker.slrs_drafter_top_k)

    async def speculate(self, run, k, position):
        await run.ensure_drafter()  # before the target's forward: a dead drafter costs none
        v = await run.verify(position, [], ROW)
        out = await run.slrs_step(position, v.row)
        if out.token is None:  # drafter mid-character: a plain target step instead
            return None
        return Round([out.token], int(out.proposed), int(out.accepted), fallback=not out.proposed)


class SLRSProposer:
    def __init__(self, slrs, drafter_top_k=None):
        self.slrs = slrs
        self.drafter_top_k = drafter_top_k

    def step(self, st, row: torch.Tensor, position: int) -> SLRSOutcome:
        res = self.slrs.step(_DrafterPaths(st, self.drafter_top_k), row.double(),
                             seed=st.params.seed, position=position)
        return SLRSOutcome(token=int(res.token), accepted=bool(res.accepted),
                           proposed=res.proposed is not None, drafter_ids=list(res.drafted_path))


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
