"""The coordinator: validates a request, drives its rounds, reports its stats.

It owns no model: it talks to a drafter and a target through ports with one shape whether they
are in this process (``engine.local``) or replicas reached over gRPC (``serve``).  One request's
state and its round (draft → bridge → verify → commit) live in ``engine.run.RequestRun``; what
each method does on either side lives in ``engine.methods`` (one module per method).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, NamedTuple, Optional, Protocol

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.methods import METHODS
from hsd_serve.engine.protocol import Draft, Verdict
from hsd_serve.engine.run import OVERLAP_MISS, RequestRun, RunPolicy
from hsd_serve.engine.types import Chunk, GenerationRequest, GenerationResult, RequestError, \
    RequestStats
from hsd_serve.models.tokenizer import TokenizerAdapter

log = logging.getLogger(__name__)


class DrafterPort(Protocol):
    async def open(self, rid: str, method: str, prompt: str, params: SamplingParams,
                   prompt_ids: list[int]) -> None: ...

    async def draft(self, rid: str, k: int, position: int, *, committed=None,
                    generated=None, attempt: int = 0, branches: int = 0,
                    span: int = 0) -> Draft: ...

    async def slrs_step(self, rid: str, generated: bytes, row, position: int): ...

    async def free(self, rid: str) -> None: ...


class TargetPort(Protocol):
    async def verify(self, rid: str, committed: list[int], candidates: list[int], rule: str,
                     params: SamplingParams, position: int, proposals=None) -> Verdict: ...

    async def free(self, rid: str) -> None: ...


GENERATING_METHODS = ("ar", "sd", "slem", "tli")  # what a generating (vLLM) target runs


class Prepared(NamedTuple):
    """A validated request: the method it runs with and the target's prompt ids."""

    method: str
    prompt_ids: list[int]


@dataclass
class TargetInfo:
    """What the coordinator must know about the target (tokenizer-level facts only)."""

    tokenizer: TokenizerAdapter
    eos_ids: frozenset[int]
    max_context: int


_ids = itertools.count()


class Coordinator:
    """Runs requests against a target port and (optionally) a drafter port."""

    def __init__(self, target: TargetPort, info: TargetInfo, drafter: Optional[DrafterPort] = None,
                 *, same_vocab: bool = False, draft_timeout_s: Optional[float] = None,
                 drafter_retry_rounds: int = 8, sink=None, load_aware_lookahead: bool = False,
                 target_generates: bool = False, drafter_rows: bool = True,
                 overlap: bool = False, overlap_max_batch: int = 2, overlap_miss: str = "plain",
                 overlap_branches: int = 0):
        """``target_generates``: the target runs whole requests itself (``target.generate``: the
        vLLM executor, ``RequestRun.follow``) instead of verifying the coordinator's rounds.
        ``drafter_rows``: the drafter returns its distribution (False: tokens only, vLLM's;
        methods whose drafts are not argmaxes are refused, ``auto`` picks slem).  ``overlap``:
        the drafter drafts the next round while the target verifies (``RunPolicy.overlap``;
        ``overlap_miss``: what a round with no usable draft made ahead does, "plain" or "wait";
        ``overlap_branches``: other paths each draft made ahead also drafts, 0 for none)."""
        if overlap_miss not in OVERLAP_MISS:
            raise ValueError(f"overlap_miss must be one of {', '.join(OVERLAP_MISS)}, "
                             f"got {overlap_miss!r}")
        if not isinstance(overlap_branches, int) or overlap_branches < 0:
            raise ValueError(f"overlap_branches must be an integer >= 0, got {overlap_branches!r}")
        self.target = target
        self.target_generates = target_generates
        self.drafter_rows = drafter_rows
        self.info = info
        self.drafter = drafter
        self.policy = RunPolicy(same_vocab=same_vocab, draft_timeout_s=draft_timeout_s,
                                drafter_retry_rounds=drafter_retry_rounds,
                                load_aware_lookahead=load_aware_lookahead, overlap=overlap,
                                overlap_max_batch=overlap_max_batch, overlap_miss=overlap_miss,
                                overlap_branches=overlap_branches)
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
            if params.greedy or self.drafter_rows:
                return "sd" if self.policy.same_vocab else ("slem" if params.greedy else "tli")
            return "slem"  # sampled drafts need rows this drafter does not return
        m = METHODS[method]
        if self.target_generates and m.needs_drafter and method not in GENERATING_METHODS:
            raise RequestError("method", f"method {method!r} runs on the hf target executor; this "
                                         f"service runs its target on vLLM (use "
                                         f"{', '.join(GENERATING_METHODS)} or auto)")
        if m.needs_drafter and self.drafter is None:
            raise RequestError("method", f"method {method!r} needs a drafter; none is configured")
        if m.needs_drafter and not self.drafter_rows and not m.drafts_argmax(params):
            when = "" if method == "slrs" else " at temperature > 0"
            raise RequestError("method", f"method {method!r}{when} needs the drafter's "
                                         "distribution; this service's drafter runs on vLLM "
                                         "(drafter_executor: vllm), which returns tokens only: "
                                         "use slem or auto")
        try:
            m.check_pair(self.policy.same_vocab)
        except ValueError as exc:
            raise RequestError("method", f"{exc}; use slem, tli or auto") from exc
        return method

    def prepare(self, req: GenerationRequest) -> "Prepared":
        """Validate and tokenize; raises RequestError (nothing has been started yet).  Pass the
        result to ``stream(..., prepared=)`` so it is done once per request."""
        req.validate()
        method = self.resolve_method(req.method, req.params)
        prompt_ids = self.info.tokenizer.encode_prompt(req.prompt)
        if not prompt_ids:
            raise RequestError("prompt", "the prompt encodes to no tokens")
        if len(prompt_ids) >= self.info.max_context:
            raise RequestError("prompt", f"the prompt is {len(prompt_ids)} tokens; the target's "
                                         f"context is {self.info.max_context}")
        return Prepared(method, prompt_ids)

    async def stream(self, req: GenerationRequest, rid: Optional[str] = None, *,
                     target: Optional[TargetPort] = None,
                     drafter: Optional[DrafterPort] = None,
                     prepared: Optional["Prepared"] = None) -> AsyncIterator[Chunk]:
        """Run one request; ``target``/``drafter`` override the coordinator's ports for this
        request (the service passes the ports of the replicas it leased); ``prepared``: what
        ``prepare(req)`` returned, when the caller validated the request already.  The stats
        go to the metrics sink once, when it ends: ``ok`` just before the final chunk,
        otherwise ``invalid``/``cancelled``/``error`` with the work done so far."""
        t_start = time.perf_counter()
        stats = RequestStats()
        outcome = None
        rounds = self._stream(req, rid, target, drafter, stats, prepared)
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
                      stats: RequestStats,
                      prepared: Optional["Prepared"] = None) -> AsyncIterator[Chunk]:
        """The rounds of one request; fills ``stats`` (plain data, no metric calls)."""
        t_start = time.perf_counter()
        method, prompt_ids = prepared or self.prepare(req)
        run = RequestRun(req, method, prompt_ids, rid or f"{uuid.uuid4().hex[:12]}-{next(_ids)}",
                         self.info, target or self.target, drafter or self.drafter, self.policy,
                         stats, t_start=t_start)
        try:
            if self.target_generates:
                async for chunk in run.follow(await run.draft_spec()):
                    yield chunk
                yield run.final_chunk()
                return
            await run.start()
            while run.finish is None:
                chunk = await run.round()
                if chunk is not None:
                    yield chunk
            yield run.final_chunk()
        finally:
            await run.free()

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        result = None
        async for chunk in self.stream(req):
            result = chunk.result
        return result


def run_stream(agen: AsyncIterator[Chunk], run=None) -> Iterator[Chunk]:
    """Drive an async chunk stream from synchronous code (CLI, benchmarks, tests); ``run(coro)``
    runs a coroutine to its result (default: on a new event loop of this thread)."""
    loop = None
    if run is None:
        loop = asyncio.new_event_loop()
        run = loop.run_until_complete
    try:
        while True:
            try:
                yield run(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        run(agen.aclose())
        if loop is not None:
            loop.close()
