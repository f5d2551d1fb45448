"""The coordinator: the round loop for one request (draft → bridge → verify → commit).

The loop owns the committed target tokens (the truth) and talks to a drafter and a target through
ports with one shape whether they are in this process (``engine.local``) or replicas reached over
gRPC (``serve``).  Each round: the drafter proposes (SD/TLI: target ids + proposal rows; SLEM:
text, bridged here to candidate target ids), the target verifies and returns the emitted tokens,
and the loop commits them one at a time, applying EOS, stop strings, ``max_new_tokens`` and the
context limit, so every method stops at exactly the token AR stops at.  If the drafter fails or is
too slow, the round runs target-only (still lossless) and counts as a fallback.  Text is released
only when it is complete UTF-8 and cannot still turn into a stop string.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Optional, Protocol

from hsd_serve.core.detok import IncrementalDetokenizer
from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.methods.slem import candidates as slem_candidates
from hsd_serve.engine.protocol import EXACT, ROW, SPECULATIVE, Draft, SessionMissing, Verdict
from hsd_serve.engine.types import (Chunk, GenerationRequest, GenerationResult, RequestError,
                                    RequestStats)
from hsd_serve.models.tokenizer import TokenizerAdapter

log = logging.getLogger(__name__)


class DrafterPort(Protocol):
    async def open(self, rid: str, method: str, prompt: str, params: SamplingParams,
                   prompt_ids: list[int]) -> None: ...

    async def draft(self, rid: str, k: int, position: int, *, committed=None,
                    generated=None, attempt: int = 0) -> Draft: ...

    async def slrs_step(self, rid: str, generated: bytes, row, position: int): ...

    async def free(self, rid: str) -> None: ...


class TargetPort(Protocol):
    async def verify(self, rid: str, committed: list[int], candidates: list[int], rule: str,
                     params: SamplingParams, position: int, proposals=None) -> Verdict: ...

    async def free(self, rid: str) -> None: ...


@dataclass
class TargetInfo:
    """What the coordinator must know about the target (tokenizer-level facts only)."""

    tokenizer: TokenizerAdapter
    eos_ids: frozenset[int]
    max_context: int


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
        if not self.load_aware or self.load <= 4:
            return self.k
        return min(self.k, max(1, math.ceil(self.k_max / (1 + (self.load - 1) / 4))))

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
        elif accepted * 2 < drafted:
            self.k = max(1, self.k - 1)


_ids = itertools.count()


class Coordinator:
    """Runs requests against a target port and (optionally) a drafter port."""

    def __init__(self, target: TargetPort, info: TargetInfo, drafter: Optional[DrafterPort] = None,
                 *, same_vocab: bool = False, draft_timeout_s: Optional[float] = None,
                 drafter_retry_rounds: int = 8, sink=None, load_aware_lookahead: bool = False):
        self.target = target
        self.info = info
        self.drafter = drafter
        self.same_vocab = same_vocab
        self.draft_timeout_s = draft_timeout_s
        self.drafter_retry_rounds = drafter_retry_rounds
        self.load_aware_lookahead = load_aware_lookahead
        self.sink = sink  # hsd_serve.metrics.MetricsSink: gets each request's stats once, at its end

    def report(self, stats: RequestStats, outcome: str) -> None:
        """Hand one ended request's stats to the metrics sink (never fails the request)."""
        if self.sink is None:
            return
        try:
            self.sink.record_request(stats, outcome)
        except Exception as exc:  # noqa: BLE001 - metrics must not break generation
            log.warning("metrics sink failed: %s: %s", type(exc).__name__, exc)

    def resolve_method(self, method: str, params: SamplingParams) -> str:
        if method == "auto":
            if self.drafter is None:
                return "ar"
            if self.same_vocab:
                return "sd"
            return "slem" if params.greedy else "tli"
        if method != "ar" and self.drafter is None:
            raise RequestError("method", f"method {method!r} needs a drafter; none is configured")
        if method == "sd" and not self.same_vocab:
            raise RequestError("method", "sd needs drafter and target to share one vocabulary; "
                                         "use slem, tli or auto")
        return method

    def prepare(self, req: GenerationRequest) -> tuple[str, list[int]]:
        """Validate and tokenize; raises RequestError (nothing has been started yet)."""
        req.validate()
        method = self.resolve_method(req.method, req.params)
        prompt_ids = self.info.tokenizer.encode_prompt(req.prompt)
        if not prompt_ids:
            raise RequestError("prompt", "the prompt encodes to no tokens")
        if len(prompt_ids) >= self.info.max_context:
            raise RequestError("prompt", f"the prompt is {len(prompt_ids)} tokens; the target's "
                                         f"context is {self.info.max_context}")
        return method, prompt_ids

    async def _call_drafter(self, coro):
        if self.draft_timeout_s is None:
            return await coro
        return await asyncio.wait_for(coro, self.draft_timeout_s)

    async def stream(self, req: GenerationRequest, rid: Optional[str] = None, *,
                     target: Optional[TargetPort] = None,
                     drafter: Optional[DrafterPort] = None) -> AsyncIterator[Chunk]:
        """Run one request; ``target``/``drafter`` override the coordinator's ports for this
        request (the service passes the ports of the replicas it leased).  The request's stats
        go to the metrics sink once, when it ends: ``ok`` just before the final chunk,
        otherwise ``invalid``/``cancelled``/``error`` with the work done so far."""
        t_start = time.perf_counter()
        stats = RequestStats()
        outcome = None
        rounds = self._stream(req, rid, target, drafter, stats)
        try:
            async for chunk in rounds:
                if chunk.result is not None:
                    outcome = "ok"
                    self.report(stats, outcome)
                yield chunk
        except RequestError:
            outcome = outcome or "invalid"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = outcome or "cancelled"
            raise
        finally:
            try:
                await rounds.aclose()
            finally:
                if outcome != "ok":
                    stats.method = stats.method or req.method
                    stats.wall_s = stats.wall_s or time.perf_counter() - t_start
                    self.report(stats, outcome or "error")

    async def _stream(self, req: GenerationRequest, rid: Optional[str],
                      target: Optional[TargetPort], drafter: Optional[DrafterPort],
                      stats: RequestStats) -> AsyncIterator[Chunk]:
        """The round loop of one request; fills ``stats`` (plain data, no metric calls)."""
        t_start = time.perf_counter()
        method, committed = self.prepare(req)
        target = target or self.target
        drafter = drafter or self.drafter
        rid = rid or f"{uuid.uuid4().hex[:12]}-{next(_ids)}"
        prompt_len = len(committed)
        params = req.params
        stats.method, stats.prompt_tokens = method, prompt_len
        tok = self.info.tokenizer
        token_bytes = tok.vocab.token_bytes
        prompt_bytes = req.prompt.encode("utf-8")
        generated_bytes = bytearray()
        detok = IncrementalDetokenizer(token_bytes)
        stops = StopStrings(req.stop)
        lookahead = Lookahead(req.lookahead, req.adaptive_lookahead, self.load_aware_lookahead)
        released: list[str] = []
        finish: Optional[str] = None
        drafter_open = False
        drafter_ok = method != "ar"
        attempts = itertools.count()  # draft calls of this request: salts the draft randomness
        ids_mode = method == "sd" or (method == "slem" and self.same_vocab)

        async def open_drafter() -> None:
            nonlocal drafter_open
            await self._call_drafter(drafter.open(rid, method, req.prompt, params,
                                                       committed[:prompt_len]))
            drafter_open = True

        async def draft_round(k: int, position: int) -> tuple[str, list[int], Optional[object]]:
            """(rule, candidates, proposals) for this round; raises on drafter failure."""
            if not drafter_open:
                await open_drafter()
            kwargs = {"committed": committed} if ids_mode else {"generated": bytes(generated_bytes)}
            try:
                d = await self._call_drafter(drafter.draft(rid, k, position, attempt=next(attempts),
                                                           **kwargs))
            except SessionMissing:
                await open_drafter()
                d = await self._call_drafter(drafter.draft(rid, k, position, attempt=next(attempts),
                                                           **kwargs))
            stats.draft_s += d.draft_s
            stats.drafter_forwards += d.forwards
            if method == "slem" and not d.target_ids:
                t0 = time.perf_counter()
                cands = slem_candidates(tok, prompt_bytes + bytes(generated_bytes), d.text, k)
                stats.bridge_s += time.perf_counter() - t0
                return EXACT, cands, None
            if not d.target_ids:
                return EXACT, [], None
            return (EXACT if method == "slem" else SPECULATIVE), d.target_ids, d.proposals

        async def verify(position: int, cands: list[int], rule: str, proposals=None) -> Verdict:
            v = await target.verify(rid, committed, cands, rule, params, position, proposals)
            stats.verify_s += v.verify_s
            stats.target_forwards += 1
            lookahead.load = v.batch_size
            return v

        async def slrs_round(position: int) -> tuple[list[int], int, int, bool]:
            if not drafter_open:
                await open_drafter()
            v = await verify(position, [], ROW)
            try:
                out = await self._call_drafter(
                    drafter.slrs_step(rid, bytes(generated_bytes), v.row, position))
            except SessionMissing:
                await open_drafter()
                out = await self._call_drafter(
                    drafter.slrs_step(rid, bytes(generated_bytes), v.row, position))
            stats.draft_s += out.draft_s
            stats.drafter_forwards += out.forwards
            if out.token < 0:  # drafter mid-character: plain target step below
                raise _NoDraft()
            return [out.token], int(out.proposed), int(out.accepted), not out.proposed

        new_ids: list[int] = []
        text = ""
        retry_at = 0  # round index at which a failed drafter is tried again
        try:
            if drafter_ok:
                try:
                    await open_drafter()
                except ValueError as exc:  # the drafter refuses this method/pair (e.g. SLRS budget)
                    raise RequestError("method", str(exc)) from exc
                except Exception as exc:  # noqa: BLE001 - unreachable drafter: rounds fall back
                    log.warning("request %s: drafter open failed (%s); target-only rounds",
                                rid, exc)
                    retry_at = self.drafter_retry_rounds
            while finish is None:
                room = min(req.max_new_tokens - (len(committed) - prompt_len),
                           self.info.max_context - len(committed))
                if room <= 0:
                    finish = "length"
                    break
                position = len(committed) - prompt_len
                k = max(0, min(lookahead.current, room - 1))
                r0 = (time.perf_counter(), stats.draft_s, stats.verify_s, stats.bridge_s)
                tokens: list[int] = []
                drafted = accepted = 0
                fallback = method != "ar" and k > 0  # a 1-token tail drafts nothing by design
                draft = None
                if drafter_ok and k > 0 and stats.rounds >= retry_at:
                    try:
                        if method == "slrs":
                            tokens, drafted, accepted, fallback = await slrs_round(position)
                        else:
                            draft = await draft_round(k, position)
                    except _NoDraft:
                        pass
                    except (RequestError, asyncio.CancelledError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - the drafter is an optimisation
                        log.warning("request %s: drafter failed (%s: %s); target-only rounds",
                                    rid, type(exc).__name__, exc)
                        drafter_open = False
                        retry_at = stats.rounds + self.drafter_retry_rounds
                        tokens = []
                if draft is not None and draft[1]:  # candidates to verify
                    rule, cands, proposals = draft
                    # never more than the room left: the target must fit committed + candidates
                    # in its context, and room - 1 candidates + 1 bonus already fill max_tokens
                    cands = cands[:room - 1]
                    proposals = proposals[:len(cands)] if proposals is not None else None
                    v = await verify(position, cands, rule, proposals)
                    tokens, drafted, accepted = v.tokens, len(cands), v.accepted
                    fallback = False
                if not tokens:  # AR, or no usable draft this round
                    tokens = (await verify(position, [], EXACT)).tokens
                stats.record_round(drafted, accepted, fallback=fallback, timing=(
                    time.perf_counter() - r0[0], stats.draft_s - r0[1], stats.verify_s - r0[2],
                    stats.bridge_s - r0[3]))
                lookahead.update(drafted, accepted)
                new_ids, text = [], ""
                for t in tokens:
                    if t in self.info.eos_ids:
                        finish = "stop"
                        break
                    committed.append(t)
                    new_ids.append(t)
                    generated_bytes += token_bytes[t]
                    piece, stopped = stops.feed(detok.push([t]))
                    text += piece
                    if stopped:
                        finish = "stop_string"
                        break
                    if len(committed) - prompt_len >= req.max_new_tokens or \
                            len(committed) >= self.info.max_context:
                        finish = "length"
                        break
                stats.emitted += len(new_ids)
                if stats.ttft_s == 0.0:
                    stats.ttft_s = time.perf_counter() - t_start
                if finish is None and (new_ids or text):
                    released.append(text)
                    yield Chunk(new_ids, text)
            if finish == "stop_string":
                finish = "stop"
            else:  # release what was held back, completing partial bytes
                piece, stopped = stops.feed(detok.flush())
                text += piece if stopped else piece + stops.flush()
            released.append(text)
            stats.wall_s = time.perf_counter() - t_start
            stats.lookahead_final = lookahead.k
            result = GenerationResult(text="".join(released), token_ids=committed[prompt_len:],
                                      finish_reason=finish, stats=stats)
            yield Chunk(new_ids, text, result=result)
        finally:
            await self._free(rid, target, drafter if drafter_open else None)

    async def _free(self, rid: str, target: TargetPort, drafter: Optional[DrafterPort]) -> None:
        try:
            await target.free(rid)
        except Exception as exc:  # noqa: BLE001 - freeing a cache must not fail a request
            log.warning("request %s: target free failed: %s", rid, exc)
        if drafter is not None:
            try:
                await self._call_drafter(drafter.free(rid))
            except Exception as exc:  # noqa: BLE001
                log.warning("request %s: drafter free failed: %s", rid, exc)

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        result = None
        async for chunk in self.stream(req):
            result = chunk.result
        return result


class _NoDraft(Exception):
    pass


def run_stream(agen: AsyncIterator[Chunk]) -> Iterator[Chunk]:
    """Drive an async chunk stream from synchronous code (CLI, benchmarks, tests)."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()
