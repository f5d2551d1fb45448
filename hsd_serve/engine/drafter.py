"""The drafter worker: per-request drafter state and the drafting half of every method.

A session holds the drafter's KV cache and what it knows of the committed text: the committed
target ids themselves for SD (shared vocabulary), or a ``DrafterText`` (its own tokenization of
the committed bytes) for SLEM/TLI/SLRS.  Each ``draft`` call first re-synchronises with what the
coordinator says is committed, keeping the previous round's drafted tokens that agree with it.

What a method drafts is its proposer's business (``engine.methods``: one module per method, the
draft protocol in ``methods.base``); this worker keeps sessions, syncs them and runs the forwards.

Bounds: ``max_sessions`` sessions and ``max_cached_tokens`` cached tokens (``engine.sessions``);
an evicted request's next ``draft`` answers ``SessionMissing`` and the coordinator opens it again
(a prefill; drafts only ever change speed, never the output).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.core.vocab import Vocab, build_id_map, same_vocabulary
from hsd_serve.engine.methods import METHODS, Method
from hsd_serve.engine.protocol import Draft, SessionMissing, SLRSOutcome
from hsd_serve.engine.sessions import SessionBounds, SessionTable
from hsd_serve.engine.sync import DrafterText
from hsd_serve.models.hf import LoadedModel, Session, forward_batch


@dataclass
class DraftCall:
    """One request's drafting step on this replica."""

    rid: str
    k: int
    position: int
    committed: Optional[Sequence[int]] = None
    generated: Optional[bytes] = None
    attempt: int = 0  # the coordinator's draft-call counter: salts the draft randomness


@dataclass
class DrafterState:
    method: str
    params: SamplingParams
    session: Session
    text: Optional[DrafterText] = None  # heterogeneous methods
    committed: list[int] = field(default_factory=list)  # SD: committed target ids
    last_drafted: list[int] = field(default_factory=list)
    forwards: int = 0
    draft_s: float = 0.0

    def context(self) -> list[int]:
        return self.committed if self.text is None else self.text.ids


class DrafterWorker(SessionBounds):
    returns_rows = True  # its drafts carry the drafter's rows where a method sends them

    def __init__(self, model: LoadedModel, target_vocab: Vocab, *, proposal_top_m: int = 64,
                 slrs_max_forwards: int = 64, slrs_max_target_bytes: Optional[int] = 8,
                 slrs_drafter_top_k: Optional[int] = None, max_sessions: int = 256,
                 max_cached_tokens: Optional[int] = None):
        self.model = model
        self.target_vocab = target_vocab
        self.proposal_top_m = proposal_top_m
        self.slrs_max_forwards = slrs_max_forwards
        self.slrs_max_target_bytes = slrs_max_target_bytes
        self.slrs_drafter_top_k = slrs_drafter_top_k
        self.same_vocab = same_vocabulary(model.vocab, target_vocab)
        self.sessions: SessionTable[DrafterState] = SessionTable(
            lambda st: len(st.session), lambda st: st.session.free(),
            max_sessions=max_sessions, max_cached_tokens=max_cached_tokens)
        self.drafts = 0  # draft / SLRS calls served
        self._id_map: Optional[torch.Tensor] = None
        self._proposers: dict[str, object] = {}

    # ---- pair-level tables, built on first use ------------------------------------------------
    @property
    def id_map(self) -> torch.Tensor:
        if self._id_map is None:
            self._id_map = build_id_map(self.model.vocab, self.target_vocab)
        return self._id_map

    def proposer(self, method: Method):
        """``method``'s drafter side for this pair, built once (it owns the pair's tables)."""
        p = self._proposers.get(method.name)
        if p is None:
            p = self._proposers[method.name] = method.proposer(self)
        return p

    def slrs(self):
        """The SLRS proposal builder for this pair (raises SLRSBudgetError when too costly)."""
        return self.proposer(METHODS["slrs"]).slrs

    # ---- sessions ------------------------------------------------------------------------------
    def open(self, rid: str, method: str, prompt: str, params: SamplingParams,
             prompt_ids: Sequence[int] = ()) -> None:
        m = METHODS.get(method)
        if m is None or not m.needs_drafter:
            raise ValueError(f"method {method!r} does not use a drafter")
        m.check_pair(self.same_vocab)
        self.proposer(m)  # refuse early when the pair cannot run it (e.g. over SLRS's budget)
        self.sessions.pop(rid)
        st = DrafterState(method=method, params=params, session=self.model.new_session())
        if m.uses_ids(self.same_vocab):
            st.committed = list(prompt_ids)
        else:
            st.text = DrafterText(self.model.tokenizer, prompt)
        self.sessions.add(rid, st)

    def _make_room(self, keep: set[str]) -> None:
        """Fit ``max_cached_tokens``, keeping the sessions ``keep`` (just served) as they are."""
        self.sessions.make_room({rid: len(self.sessions[rid].session) for rid in keep
                                 if rid in self.sessions})

    def _state(self, rid: str) -> DrafterState:
        st = self.sessions.touch(rid)
        if st is None:
            raise SessionMissing(rid)
        return st

    def _sync(self, st: DrafterState, committed: Optional[Sequence[int]],
              generated: Optional[bytes]) -> None:
        if st.text is None:
            st.committed = list(committed)
        else:
            st.text.update(generated, st.last_drafted)
        st.last_drafted = []

    def draft(self, rid: str, k: int, position: int, *, committed: Optional[Sequence[int]] = None,
              generated: Optional[bytes] = None, attempt: int = 0) -> Draft:
        """Propose up to ``k`` tokens after the committed text (SD: ``committed`` ids; others:
        the ``generated`` bytes after the prompt).  ``attempt`` must differ between calls of one
        request: sampled drafts are keyed by ``(seed, position, attempt)`` (``core.sampling``)."""
        out = self.draft_batch([DraftCall(rid, k, position, committed, generated, attempt)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def draft_batch(self, calls: list["DraftCall"]) -> list[Union[Draft, Exception]]:
        """Draft for several requests in lockstep: one batched drafter forward per step.

        Each request's draft depends only on its own state (``forward_batch`` keeps every cache as
        if it ran alone; randomness is keyed by the request's seed and positions).  A call that
        fails gets its exception back; a request id appearing twice drafts its later call alone.
        """
        results: list = [None] * len(calls)
        active: dict[int, list] = {}  # index -> [generator, state, context, forwards0, time0, k]
        seen: set[str] = set()
        later = []

        def finish(i: int, st: DrafterState, draft: Draft, f0: int, t0: float) -> None:
            st.last_drafted = list(draft.drafter_ids)
            draft.forwards, draft.draft_s = st.forwards - f0, st.draft_s - t0
            results[i] = draft

        for i, c in enumerate(calls):
            if c.rid in seen:
                later.append(i)
                continue
            seen.add(c.rid)
            try:
                st = self._state(c.rid)
                self.drafts += 1
                f0, t0 = st.forwards, st.draft_s
                self._sync(st, c.committed, c.generated)
                if st.text is not None and st.text.pending(c.generated):  # mid-character
                    results[i] = Draft()
                    continue
                gen = self.proposer(METHODS[st.method]).draft(st, c.k, c.position, c.attempt)
                active[i] = [gen, st, next(gen), f0, t0, c.k]
            except StopIteration as stop:
                finish(i, st, stop.value, f0, t0)
            except Exception as exc:  # noqa: BLE001 - reported to that caller only
                results[i] = exc
        self._drive(active, finish, results)
        self._make_room({c.rid for c in calls})  # not while the batch still uses its caches
        for i in later:
            results[i] = self.draft_batch([calls[i]])[0]
        return results

    def _drive(self, active: dict, finish, results: list) -> None:
        """Run the proposers in ``active`` (index -> [generator, state, context, ...]) to their
        end, one batched forward per step: send each the row after the context it asked for;
        ``finish(i, st, draft, ...)`` takes a finished draft, ``results[i]`` a failure."""
        while active:
            items = list(active.items())
            t_step = time.perf_counter()
            rows = forward_batch([a[1].session for _, a in items], [a[2] for _, a in items],
                                 [[] for _ in items])
            dt = time.perf_counter() - t_step
            for (i, a), logits in zip(items, rows):
                self._advance(active, i, logits[-1], dt, finish, results)

    @staticmethod
    def _advance(active: dict, i: int, row: torch.Tensor, dt: float, finish,
                 results: list) -> None:
        """Send request ``i``'s proposer the row after its context (one forward of ``dt``
        seconds); a proposer that finishes or fails leaves ``active``."""
        a = active[i]
        gen, st = a[0], a[1]
        st.forwards += 1
        st.draft_s += dt
        try:
            a[2] = gen.send(row)
        except StopIteration as stop:
            del active[i]
            finish(i, st, stop.value, a[3], a[4])
        except Exception as exc:  # noqa: BLE001
            del active[i]
            results[i] = exc

    def slrs_step(self, rid: str, generated: bytes, row: torch.Tensor,
                  position: int) -> SLRSOutcome:
        st = self._state(rid)
        self.drafts += 1
        self._sync(st, None, generated)
        f0, t0 = st.forwards, st.draft_s
        if st.text.pending(generated):
            return SLRSOutcome(token=None, accepted=False, proposed=False)
        out = self.proposer(METHODS["slrs"]).step(st, row, position)
        st.last_drafted = list(out.drafter_ids)
        out.forwards, out.draft_s = st.forwards - f0, st.draft_s - t0
        self._make_room({rid})
        return out

    def free(self, rid: str) -> bool:
        return self.sessions.pop(rid)
