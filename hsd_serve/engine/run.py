"""One request's rounds: ``RequestRun`` holds its state; the coordinator drives it.

A round: the method speculates (``Method.speculate``: draft → bridge → verify, or SLRS's row
first), or, with no usable draft, the target takes one plain step; then ``commit`` applies the
emitted tokens one at a time — EOS, stop strings, ``max_new_tokens``, the context limit — so every
method stops at exactly the token AR stops at.  The committed target tokens are the truth; ports
(``DrafterPort``/``TargetPort`` in ``engine.engine``) are in this process or gRPC replicas.

The drafter is an optimisation: when it fails or is too slow the round runs target-only (still
lossless), counts as a fallback, and the drafter is tried again ``drafter_retry_rounds`` later.
Text is released only when it is complete UTF-8 and cannot still turn into a stop string.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import torch

from hsd_serve.core.detok import IncrementalDetokenizer
from hsd_serve.engine.methods import METHODS, Round
from hsd_serve.engine.protocol import (EXACT, Draft, DrafterFailed, DraftSpec, SessionMissing,
                                      Verdict)
from hsd_serve.engine.types import Chunk, GenerationRequest, GenerationResult, RequestError, \
    RequestStats, Span

log = logging.getLogger(__name__)


class StopStrings:
    """Holds back text that could still become a stop string; reports the cut when one appears."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # all complete text so far (cut at a stop string)
        self.sent = 0  # characters already released

    def feed(self, new: str) -> tuple[str, bool]:
        """Add text; return (text safe to release now, stopped)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += new
        if self.stops and new:
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self.flush(), True
        hold = 0
        for s in self.stops:  # longest suffix that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        out = self.text[self.sent:len(self.text) - hold]
        self.sent = len(self.text) - hold
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out


def load_capped(k_max: int, load: int) -> int:
    """The largest lookahead worth drafting when ``load`` requests share the target's forward
    pass: ``k_max`` up to 4, then ``ceil(k_max / (1 + (load − 1) / 4))`` (at least 1)."""
    if load <= 4:
        return k_max
    return max(1, math.ceil(k_max / (1 + (load - 1) / 4)))


class Lookahead:
    """The lookahead ``k`` of the next round.

    Fixed, or adaptive (``adaptive``): +1 after a fully accepted round, −1 after a round that
    accepted fewer than half of its drafts, within ``[1, k_max]``.  Load-aware (``load_aware``):
    when the target replica verified ``load`` requests in the same forward pass last round, ``k``
    is capped at ``ceil(k_max / (1 + (load − 1) / 4))`` — at high load every extra draft token
    costs target compute that other requests could use, so speculation gets shallower (k_max at
    1–4 requests per pass, about half at 5–8, a quarter at 13 or more).
    """

    def __init__(self, k_max: int, adaptive: bool, load_aware: bool = False):
        self.k = k_max
        self.k_max = k_max
        self.adaptive = adaptive
        self.load_aware = load_aware
        self.load = 1

    @property
    def current(self) -> int:
        if not self.load_aware:
            return self.k
        return min(self.k, load_capped(self.k_max, self.load))

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
        elif accepted * 2 < drafted:
            self.k = max(1, self.k - 1)


OVERLAP_MISS = ("plain", "wait")
BRANCH_PACE_ROUNDS = 4  # drafts made ahead in time before the next one may draft one more branch


@dataclass(frozen=True)
class RunPolicy:
    """How the coordinator treats a request's drafter and lookahead (the same for every request)."""

    same_vocab: bool = False
    draft_timeout_s: Optional[float] = None
    drafter_retry_rounds: int = 8
    load_aware_lookahead: bool = False
    overlap: bool = False  # draft the next round while the target verifies this one
    overlap_max_batch: int = 2  # ... only while the target's batches are at most this large
    # ... and when no draft made ahead is usable: "plain" takes a plain target step while the
    # drafter drafts ahead from the committed tokens (the target never waits for a draft);
    # "wait" asks for a fresh draft and verifies it
    overlap_miss: str = "plain"  # one of OVERLAP_MISS
    # ... and also draft from up to this many other tokens where the target may leave the
    # draft's path (the drafter's runner-ups; methods with ``Method.branches_ahead``), so that a
    # round after a rejection finds a draft ready more often (0: one path; docs/overlap.md)
    overlap_branches: int = 0


@dataclass
class _Ahead:
    """A draft requested while the target verified ``ids`` (committed + candidates; ``text``:
    their bytes after the prompt), continuing them by a guess of the bonus token and more."""

    task: asyncio.Future
    ids: list[int]
    text: bytes

    def follow(self, d, committed: list[int], generated: bytes, k: int):
        """``(draft, from_branch)``: the part of draft ``d`` — or of one of its branches — after
        what was committed since, if the committed tokens went its way (None: they went none of
        them).  Of several branches that fit, the one reaching furthest."""
        ready = self._follow(d, committed, generated, k)
        if ready is not None:
            return ready, False
        best, size = None, 0
        for b in d.branches:
            ready = self._follow_branch(b, committed, generated, k)
            n = len(ready.target_ids) + len(ready.text) if ready is not None else 0
            if n > size:
                best, size = ready, n
        return best, best is not None

    def _follow(self, d, committed, generated, k):
        if d.target_ids:  # token-level (TLI, SD; SLEM on a shared vocabulary)
            n = len(self.ids)
            if len(committed) != n + 1 or committed[:n] != self.ids or \
                    d.target_ids[0] != committed[n] or len(d.target_ids) < 2:
                return None
            rows = d.proposals[1:k + 1] if d.proposals is not None else None
            return Draft(drafter_ids=list(d.drafter_ids[1:k + 1]),
                         target_ids=list(d.target_ids[1:k + 1]), proposals=rows)
        return self._rest(self.text + d.text, generated)

    def _follow_branch(self, b, committed, generated, k):
        """A branch (``protocol.Branch``, SLEM only: greedy, no rows): the committed tokens
        left the draft's path at its fork point and took its first token."""
        if b.target_ids:
            n = b.at
            if not 0 <= n < len(self.ids) + 1 or len(committed) != n + 1 or \
                    committed[:n] != self.ids[:n] or committed[n] != b.target_ids[0] or \
                    len(b.target_ids) < 2:
                return None
            return Draft(drafter_ids=list(b.drafter_ids[1:k + 1]),
                         target_ids=list(b.target_ids[1:k + 1]))
        if not 0 <= b.at <= len(self.text):
            return None
        return self._rest(self.text[:b.at] + b.text, generated)

    @staticmethod
    def _rest(full: bytes, generated: bytes):
        """SLEM's text: drafted text whose start the committed text is; the rest is the draft."""
        if len(full) <= len(generated) or not full.startswith(generated):
            return None
        return Draft(text=full[len(generated):])


class RequestRun:
    """The state of one request between rounds, and its round: ``speculate`` / ``verify`` /
    ``commit``.  ``info`` is the coordinator's ``TargetInfo`` (tokenizer, EOS ids, context)."""

    def __init__(self, req: GenerationRequest, method: str, prompt_ids: list[int], rid: str,
                 info, target, drafter, policy: RunPolicy, stats: RequestStats,
                 t_start: Optional[float] = None):
        self.req, self.rid, self.info, self.policy, self.stats = req, rid, info, policy, stats
        self.method = METHODS[method]
        self.target, self.drafter = target, drafter
        self.params = req.params
        self.tokenizer = info.tokenizer
        self.token_bytes = info.tokenizer.vocab.token_bytes
        self.committed = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.prompt_bytes = req.prompt.encode("utf-8")
        self.generated = bytearray()  # bytes of the committed tokens after the prompt
        self.detok = IncrementalDetokenizer(self.token_bytes)
        self.stops = StopStrings(req.stop)
        self.lookahead = Lookahead(req.lookahead, req.adaptive_lookahead,
                                   policy.load_aware_lookahead)
        self.released: list[str] = []
        self.finish: Optional[str] = None
        self.last_ids: list[int] = []  # the last round's new ids and text (the final chunk's)
        self.last_text = ""
        self.room = 0  # tokens this round may still add (max_new_tokens, context)
        self.drafter_open = False
        self.drafter_ok = self.method.needs_drafter
        self.retry_at = 0  # round index at which a failed drafter is tried again
        self._attempts = itertools.count()  # draft calls: salt the draft randomness
        self.ahead: Optional[_Ahead] = None  # the next draft, drafted while the target verifies
        self.ahead_failed = False  # the last draft made ahead failed (the next round waits)
        # branches the next draft made ahead asks for: policy.overlap_branches, fewer while the
        # drafts made ahead come after the verdict (``ready_draft``)
        self.branches = policy.overlap_branches
        self._on_time = 0  # drafts made ahead done by the verdict since branches last changed
        self.t_start = time.perf_counter() if t_start is None else t_start
        stats.method, stats.prompt_tokens = method, self.prompt_len

    def span(self, lane: str, t0: float, round_: Optional[int] = None) -> None:
        """With ``req.trace``: record that ``lane`` ran from ``t0`` until now (in round
        ``round_``, default the current one) in ``stats.timeline``."""
        if self.req.trace:
            self.stats.timeline.append(Span(lane, self.stats.rounds if round_ is None else round_,
                                            t0 - self.t_start, time.perf_counter() - self.t_start))

    # ---- the drafter ---------------------------------------------------------------------------
    async def _call_drafter(self, coro):
        if self.policy.draft_timeout_s is None:
            return await coro
        return await asyncio.wait_for(coro, self.policy.draft_timeout_s)

    async def open_drafter(self) -> None:
        await self._call_drafter(self.drafter.open(self.rid, self.method.name, self.req.prompt,
                                                   self.params, self.committed[:self.prompt_len]))
        self.drafter_open = True

    async def start(self) -> None:
        """Open the drafter session; a drafter that refuses the method fails the request, one
        that cannot be reached only turns the first rounds target-only."""
        if not self.drafter_ok:
            return
        try:
            await self.open_drafter()
        except ValueError as exc:  # the drafter refuses this method/pair (e.g. SLRS budget)
            raise RequestError("method", str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - unreachable drafter: rounds fall back
            log.warning("request %s: drafter open failed (%s); target-only rounds", self.rid, exc)
            self.drafter_failed(0)

    def drafter_failed(self, now: int) -> None:
        """The drafter failed at round (or engine step) ``now``: close its session (the next call
        reopens it) and leave it alone for ``policy.drafter_retry_rounds``."""
        self.drafter_open = False
        self.retry_at = now + self.policy.drafter_retry_rounds

    async def ensure_drafter(self) -> None:
        """(Re)open the drafter session if a failure closed it (raises ``DrafterFailed``)."""
        if not self.drafter_open:
            await self._drafter_failures(self.open_drafter())

    async def _drafter_call(self, call):
        """``call()`` on the open drafter session, reopening it once if the replica lost it;
        any failure of the drafter is raised as ``DrafterFailed``."""
        await self.ensure_drafter()

        async def with_reopen():
            try:
                return await self._call_drafter(call())
            except SessionMissing:
                await self.open_drafter()
                return await self._call_drafter(call())

        return await self._drafter_failures(with_reopen())

    @staticmethod
    async def _drafter_failures(coro):
        try:
            return await coro
        except (RequestError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the drafter's failure
            raise DrafterFailed(exc) from exc

    async def draft(self, k: int, position: int):
        """The drafter's ``Draft`` for this round (raises on drafter failure)."""
        if self.method.uses_ids(self.policy.same_vocab):
            kwargs = {"committed": self.committed}
        else:
            kwargs = {"generated": bytes(self.generated)}
        t0 = time.perf_counter()
        d = await self._drafter_call(lambda: self.drafter.draft(
            self.rid, k, position, attempt=next(self._attempts), **kwargs))
        self.ahead_failed = False
        self.span("draft", t0)
        self.stats.draft_s += d.draft_s
        self.stats.drafter_forwards += d.forwards
        return d

    # ---- drafting ahead (policy.overlap) -------------------------------------------------------
    def drafting_ahead(self) -> bool:
        """Whether this round drafts ahead: overlap is on and the target's last batch was small
        (under load the drafter has no idle time to hide, docs/overlap.md)."""
        return self.policy.overlap and self.lookahead.load <= self.policy.overlap_max_batch

    def draft_ahead(self, k: int, position: int, cands: list[int]) -> None:
        """While the target verifies ``cands``, ask the drafter to continue them as if all were
        accepted, by ``k + 1``: its first token is a guess of the target's bonus token (with no
        ``cands``, of the token the target's plain step is taking)."""
        if not self.drafting_ahead():
            return
        ids = self.committed + list(cands)
        text = bytes(self.generated) + b"".join(self.token_bytes[t] for t in cands)
        ids_level = self.method.uses_ids(self.policy.same_vocab)
        kwargs = {"committed": ids} if ids_level else {"generated": text}
        if self.branches > 0 and self.method.branches_ahead:
            kwargs["branches"] = self.branches
            kwargs["span"] = len(cands) if ids_level else len(text) - len(self.generated)
        call = self._drafter_call(lambda: self.drafter.draft(
            self.rid, k + 1, position + len(cands), attempt=next(self._attempts), **kwargs))
        task = asyncio.ensure_future(call)
        if self.req.trace:
            t0, n = time.perf_counter(), self.stats.rounds
            task.add_done_callback(lambda t: t.cancelled() or self.span("draft ahead", t0, n))
        self.ahead = _Ahead(task, ids, text)

    async def ready_draft(self, k: int):
        """The draft made ahead last round, if the target's tokens took the path it continued
        (its ``k`` first candidates); None otherwise (its tokens are counted stale).  Which of
        the two is used depends only on the committed tokens and the drafter's own draws."""
        ahead, self.ahead = self.ahead, None
        if ahead is None:
            return None
        self._pace_branches(late=not ahead.task.done())
        try:
            d = await ahead.task
        except Exception as exc:  # noqa: BLE001 - a fresh draft call follows
            log.info("request %s: drafting ahead failed (%s)", self.rid, exc)
            self.stats.ahead_waited += 1
            self.ahead_failed = True
            return None
        self.stats.draft_s += d.draft_s
        self.stats.drafter_forwards += d.forwards
        ready, branch = ahead.follow(d, self.committed, bytes(self.generated), k)
        if ready is None or branch:
            self.stats.ahead_stale += max(len(d.target_ids), len(d.drafter_ids))
        if ready is None:
            if not self.plain_on_miss():
                self.stats.ahead_waited += 1
            return None
        self.stats.ahead_ready += 1
        self.stats.ahead_branch += branch
        return ready

    def _pace_branches(self, late: bool) -> None:
        """Branches cost the drafter time, and a draft made ahead still out at the verdict makes
        the target wait for it: then halve the branches the next ones draft; after
        ``BRANCH_PACE_ROUNDS`` drafts made ahead in a row were done by the verdict, allow one
        more, up to ``policy.overlap_branches`` (slow up, fast down: the branches settle where
        the drafter keeps up with the target)."""
        if late:
            self.branches //= 2
            self._on_time = 0
            return
        self._on_time += 1
        if self._on_time >= BRANCH_PACE_ROUNDS:
            self.branches = min(self.policy.overlap_branches, self.branches + 1)
            self._on_time = 0

    def plain_on_miss(self) -> bool:
        """With no usable draft made ahead: whether this round takes a plain target step while
        the drafter drafts ahead from the committed tokens (``policy.overlap_miss == "plain"``,
        drafting ahead on, and the last draft made ahead did not fail: a failing drafter is
        asked directly, so that its failure turns the rounds target-only)."""
        return (self.policy.overlap_miss == "plain" and self.drafting_ahead()
                and not self.ahead_failed)

    async def plain_while_drafting(self, k: int, position: int) -> Round:
        """The target's plain step, while the drafter drafts ``k + 1`` tokens ahead from the
        committed ones (the first a guess of the token this step takes)."""
        self.stats.ahead_plain += 1
        self.draft_ahead(k, position, [])
        v = await self.verify(position, [], EXACT)
        return Round(v.tokens, 0, 0)

    def drop_ahead(self) -> None:
        """Forget the draft made ahead (cancelling a finished task also marks its error seen)."""
        if self.ahead is not None:
            self.ahead.task.cancel()
            self.ahead = None

    async def slrs_step(self, position: int, row: torch.Tensor):
        t0 = time.perf_counter()
        out = await self._drafter_call(lambda: self.drafter.slrs_step(
            self.rid, bytes(self.generated), row, position))
        self.span("draft", t0)
        self.stats.draft_s += out.draft_s
        self.stats.drafter_forwards += out.forwards
        return out

    def committed_bytes(self) -> bytes:
        """Prompt and generated bytes: the text the drafted text continues."""
        return self.prompt_bytes + bytes(self.generated)

    # ---- the target ----------------------------------------------------------------------------
    def fit(self, cands: list[int], proposals=None):
        """Candidates cut to the room left: the target must fit committed + candidates in its
        context, and room − 1 candidates + 1 bonus already fill ``max_new_tokens``."""
        cands = list(cands)[:max(0, self.room - 1)]
        return cands, (proposals[:len(cands)] if proposals is not None else None)

    async def verify(self, position: int, cands: list[int], rule: str,
                     proposals=None) -> Verdict:
        t0 = time.perf_counter()
        v = await self.target.verify(self.rid, self.committed, cands, rule, self.params, position,
                                     proposals)
        self.span("verify", t0)
        self.stats.verify_s += v.verify_s
        self.stats.target_forwards += 1
        self.lookahead.load = v.batch_size
        return v

    # ---- one round -----------------------------------------------------------------------------
    async def round(self) -> Optional[Chunk]:
        """Run one round; the chunk to release (``None`` when nothing new or the request ended:
        then ``finish`` is set and ``final_chunk()`` ends it)."""
        stats = self.stats
        self.room = min(self.req.max_new_tokens - (len(self.committed) - self.prompt_len),
                        self.info.max_context - len(self.committed))
        if self.room <= 0:
            self.finish = "length"
            self.last_ids, self.last_text = [], ""
            return None
        position = len(self.committed) - self.prompt_len
        k = max(0, min(self.lookahead.current, self.room - 1))
        r0 = (time.perf_counter(), stats.draft_s, stats.verify_s, stats.bridge_s)
        outcome = None
        if self.drafter_ok and k > 0 and stats.rounds >= self.retry_at:
            outcome = await self._speculate(k, position)
        if outcome is None:  # AR, or no usable draft this round; a 1-token tail drafts nothing
            tokens = (await self.verify(position, [], EXACT)).tokens
            outcome = Round(tokens, 0, 0, fallback=self.method.needs_drafter and k > 0)
        stats.record_round(outcome.drafted, outcome.accepted, fallback=outcome.fallback, timing=(
            time.perf_counter() - r0[0], stats.draft_s - r0[1], stats.verify_s - r0[2],
            stats.bridge_s - r0[3]))
        self.lookahead.update(outcome.drafted, outcome.accepted)
        return self.commit(outcome.tokens)

    async def _speculate(self, k: int, position: int) -> Optional[Round]:
        try:
            return await self.method.speculate(self, k, position)
        except DrafterFailed as failed:  # the drafter is an optimisation; target errors propagate
            exc = failed.__cause__
            log.warning("request %s: drafter failed (%s: %s); target-only rounds",
                        self.rid, type(exc).__name__, exc)
            self.drafter_failed(self.stats.rounds)
            self.drop_ahead()
            return None

    # ---- a target that runs the whole request (the vLLM executor) ------------------------------
    async def draft_spec(self) -> Optional[DraftSpec]:
        """What the generating target's proposer needs to fetch this request's drafts (None:
        plain decoding): the address of the drafter replica (``drafter.address()``, leased)."""
        if not self.method.needs_drafter or self.drafter is None:
            return None
        try:
            address = await self._call_drafter(self.drafter.address())
        except Exception as exc:  # noqa: BLE001 - no drafter: the request decodes plainly
            log.warning("request %s: no drafter address (%s); plain decoding", self.rid, exc)
            self.stats.fallback_rounds += 1
            return None
        return self._draft_spec(address, self.req.prompt)

    def _draft_spec(self, address: str, prompt: str) -> DraftSpec:
        return DraftSpec(self.rid, self.method.name, address, prompt, self.req.lookahead,
                         self.policy.same_vocab)

    def _late_drafter(self) -> Optional[str]:
        """A request decoding plainly for want of a drafter: the address of one leased since
        (``ready_address`` of a leased drafter port; None: none yet, or no such port)."""
        ready = getattr(self.drafter, "ready_address", None)
        return ready() if ready is not None else None

    async def follow(self, spec=None, max_resumes: int = 3) -> AsyncIterator[Chunk]:
        """The request's chunks from a target that decodes it to the end itself
        (``target.generate``: the vLLM executor, which verifies the drafts that ``spec`` — a
        ``DraftSpec`` or None — tells its proposer to fetch).  Every step's tokens go through
        ``commit``, so EOS, stop strings and the limits end it at exactly AR's token; the stream
        is closed (the request aborted in vLLM) as soon as they do.  A target replica lost
        mid-stream: the request resumes from what was committed (``max_resumes`` times).  A
        request that started without a drafter (none leasable: e.g. the drafters scaled to zero)
        checks between steps whether one has been leased since; then it resumes from what was
        committed with drafts (vLLM re-reads the committed prefix, from its prefix cache)."""
        stats = self.stats
        resumes = 0
        wants_drafter = spec is None and self.method.needs_drafter and self.drafter is not None
        while self.finish is None:
            done = len(self.committed) - self.prompt_len
            steps = self.target.generate(self.rid, list(self.committed), self.params,
                                         self.req.max_new_tokens - done, spec)
            t0 = time.perf_counter()
            broke = None
            try:
                async with contextlib.aclosing(steps):
                    async for step in steps:
                        self._time_step(step, time.perf_counter() - t0)
                        stats.rounds += 1
                        stats.target_forwards += 1
                        stats.drafted, stats.accepted = step.drafted, step.accepted
                        if step.drafted_per_position:
                            stats.drafted_per_position = list(step.drafted_per_position)
                            stats.accepted_per_position = list(step.accepted_per_position)
                        chunk = self.commit(step.token_ids)
                        if chunk is not None:
                            yield chunk
                        if self.finish is None and step.finished:
                            self.finish = "stop" if step.finish_reason == "stop" else "length"
                        if self.finish is not None:
                            return
                        address = self._late_drafter() if wants_drafter else None
                        if address is not None:
                            spec, wants_drafter = self._draft_spec(address, ""), False
                            log.info("request %s: a drafter is up; drafting from now on",
                                     self.rid)
                            break
                        t0 = time.perf_counter()
                    else:
                        broke = ConnectionError("the target's stream ended early")
            except ConnectionError as exc:
                broke = exc
            if spec is not None:  # the drafts continue prompt + output, the new prompt
                spec = dataclasses.replace(spec, prompt=self.committed_bytes().decode(
                    "utf-8", errors="replace"))
            if broke is None:  # left to start drafting: not a failure
                continue
            resumes += 1  # the stream broke off: go on from the committed tokens
            if resumes > max_resumes:
                raise ConnectionError(f"the target's stream broke off {resumes} times") from broke
            log.warning("request %s: target stream ended early; resuming", self.rid)

    def _time_step(self, step, wall: float) -> None:
        """One engine output's round: ``wall`` seconds here; the target's ``step_s`` of them on
        its side, of which ``draft_s`` getting drafts and the rest verifying; what remains of
        ``wall`` is transport (as ``record_round`` splits an HF round)."""
        stats = self.stats
        if not step.step_s:  # not measured by the target: all of it is the target's
            stats.verify_s += wall
            return
        draft = min(step.draft_s, step.step_s)
        verify = step.step_s - draft
        transport = max(0.0, wall - step.step_s)
        stats.draft_s += draft
        stats.verify_s += verify
        stats.transport_s += transport
        stats.round_draft_s.append(draft)
        stats.round_verify_s.append(verify)
        stats.round_transport_s.append(transport)

    def commit(self, tokens: list[int]) -> Optional[Chunk]:
        """Append the target's tokens one at a time, stopping exactly where AR would."""
        new_ids, text = [], ""
        for t in tokens:
            if t in self.info.eos_ids:
                self.finish = "stop"
                break
            self.committed.append(t)
            new_ids.append(t)
            self.generated += self.token_bytes[t]
            piece, stopped = self.stops.feed(self.detok.push([t]))
            text += piece
            if stopped:
                self.finish = "stop_string"
                break
            if len(self.committed) - self.prompt_len >= self.req.max_new_tokens or \
                    len(self.committed) >= self.info.max_context:
                self.finish = "length"
                break
        self.stats.emitted += len(new_ids)
        if self.stats.ttft_s == 0.0:
            self.stats.ttft_s = time.perf_counter() - self.t_start
        self.last_ids, self.last_text = new_ids, text
        if self.finish is None and (new_ids or text):
            self.released.append(text)
            return Chunk(new_ids, text)
        return None

    def final_chunk(self) -> Chunk:
        """The last chunk, carrying the result (call once ``finish`` is set)."""
        text = self.last_text
        if self.finish == "stop_string":
            self.finish = "stop"
        else:  # release what was held back, completing partial bytes
            piece, stopped = self.stops.feed(self.detok.flush())
            text += piece if stopped else piece + self.stops.flush()
        self.released.append(text)
        self.stats.wall_s = time.perf_counter() - self.t_start
        self.stats.lookahead_final = self.lookahead.current  # adaptive k, load cap applied
        result = GenerationResult(text="".join(self.released),
                                  token_ids=self.committed[self.prompt_len:],
                                  finish_reason=self.finish, stats=self.stats)
        return Chunk(self.last_ids, text, result=result)

    async def free(self) -> None:
        """Free the request's caches (the drafter's only if a session was opened)."""
        self.drop_ahead()
        try:
            await self.target.free(self.rid)
        except Exception as exc:  # noqa: BLE001 - freeing a cache must not fail a request
            log.warning("request %s: target free failed: %s", self.rid, exc)
        if self.drafter_open:
            try:
                await self._call_drafter(self.drafter.free(self.rid))
            except Exception as exc:  # noqa: BLE001
                log.warning("request %s: drafter free failed: %s", self.rid, exc)
