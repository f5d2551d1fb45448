"""The target worker: per-request KV caches and the verification rules, next to the weights.

``verify`` makes the request's cache hold ``committed + candidates`` (only uncached tokens are
computed), turns the logits into the processed distribution ``p`` and applies the rule.  The full
``committed`` list is sent every round, so a missing or stale cache is rebuilt, never trusted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from hsd_serve.core.exact_match import verify_exact_match
from hsd_serve.core.sampling import SamplingParams, process_logits
from hsd_serve.core.speculative import verify_speculative
from hsd_serve.engine.protocol import EXACT, ROW, SPECULATIVE, Verdict
from hsd_serve.models.hf import LoadedModel, Session


class TargetWorker:
    def __init__(self, model: LoadedModel, *, max_sessions: int = 256):
        self.model = model
        self.max_sessions = max_sessions
        self.sessions: "OrderedDict[str, Session]" = OrderedDict()
        self.evictions = 0

    def _session(self, rid: str) -> Session:
        s = self.sessions.get(rid)
        if s is None:
            while len(self.sessions) >= self.max_sessions:  # least recently used goes first
                _, old = self.sessions.popitem(last=False)
                old.free()
                self.evictions += 1
            s = self.sessions[rid] = self.model.new_session()
        else:
            self.sessions.move_to_end(rid)
        return s

    def verify(self, rid: str, committed: Sequence[int], candidates: Sequence[int], rule: str,
               params: SamplingParams, position: int,
               proposals: Optional[torch.Tensor] = None) -> Verdict:
        t0 = time.perf_counter()
        candidates = list(candidates)
        logits = self._session(rid).forward_from(list(committed), candidates)
        p = process_logits(logits, params)  # [m+1, V_target]
        if rule == EXACT:
            res = verify_exact_match(candidates, p, params, position)
            out = Verdict(res.accepted, res.tokens)
        elif rule == SPECULATIVE:
            if proposals is None or proposals.shape[0] != len(candidates):
                raise ValueError("speculative verification needs one proposal row per candidate")
            res = verify_speculative(candidates, proposals, p, params, position)
            out = Verdict(res.accepted, res.tokens)
        elif rule == ROW:
            out = Verdict(row=p[0])
        else:
            raise ValueError(f"unknown verification rule {rule!r}")
        out.verify_s = time.perf_counter() - t0
        return out

    def free(self, rid: str) -> bool:
        s = self.sessions.pop(rid, None)
        if s is not None:
            s.free()
        return s is not None
