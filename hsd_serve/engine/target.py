"""The target worker: per-request KV caches and the verification rules, next to the weights.

``verify`` makes the request's cache hold ``committed + candidates`` (only uncached tokens are
computed), turns the logits into the processed distribution ``p`` and applies the rule;
``verify_batch`` does the same for the pending rounds of many requests in one forward pass.  The full
``committed`` list is sent every round, so a missing or stale cache is rebuilt, never trusted.

Bounds: ``max_sessions`` sessions and ``max_cached_tokens`` cached tokens (``engine.sessions``);
an evicted request rebuilds its cache on its next call (a prefill, same tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from hsd_serve.core.exact_match import verify_exact_match
from hsd_serve.core.sampling import SamplingParams, process_logits
from hsd_serve.core.speculative import verify_speculative
from hsd_serve.engine.protocol import EXACT, ROW, SPECULATIVE, Verdict
from hsd_serve.engine.sessions import SessionBounds, SessionTable
from hsd_serve.models.hf import LoadedModel, Session, forward_batch


@dataclass
class VerifyCall:
    """One request's pending round on this replica."""

    rid: str
    committed: list[int]
    candidates: list[int]
    rule: str
    params: SamplingParams
    position: int
    proposals: Optional[torch.Tensor] = None


class TargetWorker(SessionBounds):
    def __init__(self, model: LoadedModel, *, max_sessions: int = 256,
                 max_cached_tokens: Optional[int] = None):
        self.model = model
        self.sessions: SessionTable[Session] = SessionTable(
            len, Session.free, max_sessions=max_sessions, max_cached_tokens=max_cached_tokens)
        self.verifies = 0  # verify calls served

    def _session(self, rid: str) -> Session:
        s = self.sessions.touch(rid)
        return s if s is not None else self.sessions.add(rid, self.model.new_session())

    def verify(self, rid: str, committed: Sequence[int], candidates: Sequence[int], rule: str,
               params: SamplingParams, position: int,
               proposals: Optional[torch.Tensor] = None) -> Verdict:
        out = self.verify_batch([VerifyCall(rid, list(committed), list(candidates), rule, params,
                                            position, proposals)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def verify_batch(self, calls: list["VerifyCall"]) -> list[Union[Verdict, Exception]]:
        """Verify the pending rounds of several requests with one batched forward.

        Each request's cache and decision depend only on its own call: ``forward_batch`` keeps
        per-request caches exactly as if run alone, and every rule draws its randomness from the
        request's own (seed, position).  A call that is invalid gets its exception back without
        affecting the others; a request id appearing twice runs its later call on its own.
        """
        t0 = time.perf_counter()
        results: list[Union[Verdict, Exception, None]] = [None] * len(calls)
        batch, later, seen = [], [], set()
        for i, c in enumerate(calls):
            try:
                self._check(c)
            except ValueError as exc:
                results[i] = exc
                continue
            (later if c.rid in seen else batch).append(i)
            seen.add(c.rid)
        self.verifies += len(batch)
        if batch:
            sessions = [self._session(calls[i].rid) for i in batch]
            self.sessions.make_room({calls[i].rid: len(calls[i].committed)
                                     + len(calls[i].candidates) for i in batch})
            try:
                logits = forward_batch(sessions, [calls[i].committed for i in batch],
                                       [calls[i].candidates for i in batch])
            except ValueError as exc:
                logits = [exc] * len(batch)
            for i, lg in zip(batch, logits):
                results[i] = lg if isinstance(lg, Exception) else self._apply(calls[i], lg)
                if isinstance(results[i], Verdict):
                    results[i].batch_size = len(batch)
        for i in later:
            results[i] = self.verify_batch([calls[i]])[0]
        elapsed = time.perf_counter() - t0
        for r in results:
            if isinstance(r, Verdict):
                r.verify_s = elapsed
        return results

    def _check(self, c: "VerifyCall") -> None:
        if c.rule not in (EXACT, SPECULATIVE, ROW):
            raise ValueError(f"unknown verification rule {c.rule!r}")
        if not c.committed:
            raise ValueError("verify needs the committed context")
        if c.rule == SPECULATIVE and (c.proposals is None
                                      or c.proposals.shape[0] != len(c.candidates)):
            raise ValueError("speculative verification needs one proposal row per candidate")
        total = len(c.committed) + len(c.candidates)
        if total > self.model.max_context:
            raise ValueError(f"sequence of {total} tokens exceeds the model context of "
                             f"{self.model.max_context}")

    @staticmethod
    def _apply(c: "VerifyCall", logits: torch.Tensor) -> Verdict:
        p = process_logits(logits, c.params)  # [m+1, V_target]
        if c.rule == EXACT:
            res = verify_exact_match(c.candidates, p, c.params, c.position)
            return Verdict(res.accepted, res.tokens)
        if c.rule == SPECULATIVE:
            res = verify_speculative(c.candidates, c.proposals, p, c.params, c.position)
            return Verdict(res.accepted, res.tokens)
        return Verdict(row=p[0])

    def free(self, rid: str) -> bool:
        return self.sessions.pop(rid)
