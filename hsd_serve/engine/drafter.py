"""The drafter worker: per-request drafter state and the drafting half of every method.

A session holds the drafter's KV cache and what it knows of the committed text: the committed
target ids themselves for SD (shared vocabulary), or a ``DrafterText`` (its own tokenization of
the committed bytes) for SLEM/TLI/SLRS.  Each ``draft`` call first re-synchronises with what the
coordinator says is committed, keeping the previous round's drafted tokens that agree with it.

Bounds: at most ``max_sessions`` sessions and (when set) ``max_cached_tokens`` tokens in all the
sessions' KV caches together.  Over either bound the least recently used *other* sessions are
evicted; their next ``draft`` answers ``SessionMissing`` and the coordinator opens them again
(a prefill; drafts only ever change speed, never the output).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.core.vocab import Vocab, build_id_map, same_vocabulary
from hsd_serve.engine.protocol import Draft, SessionMissing, SLRSOutcome
from hsd_serve.engine.sync import DrafterText
from hsd_serve.models.hf import LoadedModel, Session, forward_batch

DRAFTING_METHODS = ("sd", "slem", "tli", "slrs")


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


class DrafterWorker:
    def __init__(self, model: LoadedModel, target_vocab: Vocab, *, proposal_top_m: int = 64,
                 slrs_max_forwards: int = 64, slrs_max_target_bytes: Optional[int] = 8,
                 slrs_drafter_top_k: Optional[int] = None, max_sessions: int = 256,
                 max_cached_tokens: Optional[int] = None):
        if max_cached_tokens is not None and max_cached_tokens < 1:
            raise ValueError("max_cached_tokens must be >= 1 (or None for no cap)")
        self.model = model
        self.target_vocab = target_vocab
        self.proposal_top_m = proposal_top_m
        self.slrs_max_forwards = slrs_max_forwards
        self.slrs_max_target_bytes = slrs_max_target_bytes
        self.slrs_drafter_top_k = slrs_drafter_top_k
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.same_vocab = same_vocabulary(model.vocab, target_vocab)
        self.sessions: "OrderedDict[str, DrafterState]" = OrderedDict()
        self.evictions = 0  # sessions evicted (session cap or token cap)
        self.drafts = 0  # draft / SLRS calls served
        self._id_map: Optional[torch.Tensor] = None
        self._slrs = None

    # ---- pair-level tables, built on first use ------------------------------------------------
    @property
    def id_map(self) -> torch.Tensor:
        if self._id_map is None:
            self._id_map = build_id_map(self.model.vocab, self.target_vocab)
        return self._id_map

    def slrs(self):
        """The SLRS proposal builder for this pair (raises SLRSBudgetError when too costly)."""
        if self._slrs is None:
            from hsd_serve.core.slrs import SLRS

            self._slrs = SLRS(self.model.vocab, self.target_vocab,
                              drafter_eos_ids=self.model.eos_ids,
                              max_forwards=self.slrs_max_forwards,
                              max_target_bytes=self.slrs_max_target_bytes,
                              drafter_top_k=self.slrs_drafter_top_k)
        return self._slrs

    def uses_ids(self, method: str) -> bool:
        """SD, and SLEM on a shared vocabulary, run on the committed target ids themselves."""
        return method == "sd" or (method == "slem" and self.same_vocab)

    # ---- sessions ------------------------------------------------------------------------------
    def open(self, rid: str, method: str, prompt: str, params: SamplingParams,
             prompt_ids: Sequence[int] = ()) -> None:
        if method not in DRAFTING_METHODS:
            raise ValueError(f"method {method!r} does not use a drafter")
        if method == "sd" and not self.same_vocab:
            raise ValueError("sd needs drafter and target to share one vocabulary")
        if method == "slrs":
            self.slrs()  # refuse early when over budget
        self.free(rid)
        while len(self.sessions) >= self.max_sessions:
            _, old = self.sessions.popitem(last=False)
            old.session.free()
            self.evictions += 1
        st = DrafterState(method=method, params=params, session=self.model.new_session())
        if self.uses_ids(method):
            st.committed = list(prompt_ids)
        else:
            st.text = DrafterText(self.model.tokenizer, prompt)
        self.sessions[rid] = st

    def cached_tokens(self) -> int:
        """Tokens held in all sessions' KV caches."""
        return sum(len(st.session) for st in self.sessions.values())

    def _make_room(self, keep: set[str]) -> None:
        """Evict least recently used sessions not in ``keep`` (the ones just served) until the
        caches fit ``max_cached_tokens``; the kept caches stay whatever their size."""
        if self.max_cached_tokens is None:
            return
        total = self.cached_tokens()
        for old_rid in list(self.sessions):
            if total <= self.max_cached_tokens:
                break
            if old_rid in keep:
                continue
            old = self.sessions.pop(old_rid)
            total -= len(old.session)
            old.session.free()
            self.evictions += 1

    def _state(self, rid: str) -> DrafterState:
        st = self.sessions.get(rid)
        if st is None:
            raise SessionMissing(rid)
        self.sessions.move_to_end(rid)
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
        from hsd_serve.engine.methods import DRAFT_FUNCTIONS

        results: list = [None] * len(calls)
        active: dict[int, list] = {}  # index -> [generator, state, context, forwards0, time0]
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
                gen = DRAFT_FUNCTIONS[st.method](self, st, c.k, c.position, c.attempt)
                active[i] = [gen, st, next(gen), f0, t0]
            except StopIteration as stop:
                finish(i, st, stop.value, f0, t0)
            except Exception as exc:  # noqa: BLE001 - reported to that caller only
                results[i] = exc
        while active:
            items = list(active.items())
            t_step = time.perf_counter()
            rows = forward_batch([a[1].session for _, a in items], [a[2] for _, a in items],
                                 [[] for _ in items])
            dt = time.perf_counter() - t_step
            for (i, a), logits in zip(items, rows):
                gen, st = a[0], a[1]
                st.forwards += 1
                st.draft_s += dt
                try:
                    a[2] = gen.send(logits[-1])
                except StopIteration as stop:
                    del active[i]
                    finish(i, st, stop.value, a[3], a[4])
                except Exception as exc:  # noqa: BLE001
                    del active[i]
                    results[i] = exc
        self._make_room({c.rid for c in calls})  # not while the batch still uses its caches
        for i in later:
            results[i] = self.draft_batch([calls[i]])[0]
        return results

    def slrs_step(self, rid: str, generated: bytes, row: torch.Tensor,
                  position: int) -> SLRSOutcome:
        from hsd_serve.engine.methods.slrs import slrs_step

        st = self._state(rid)
        self.drafts += 1
        self._sync(st, None, generated)
        f0, t0 = st.forwards, st.draft_s
        if st.text.pending(generated):
            return SLRSOutcome(token=-1, accepted=False, proposed=False)
        out = slrs_step(self, st, row, position)
        st.last_drafted = list(out.drafter_ids)
        out.forwards, out.draft_s = st.forwards - f0, st.draft_s - t0
        self._make_room({rid})
        return out

    def free(self, rid: str) -> bool:
        st = self.sessions.pop(rid, None)
        if st is not None:
            st.session.free()
        return st is not None
