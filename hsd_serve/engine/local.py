"""In-process generation: the coordinator wired to drafter/target workers in this process."""

from __future__ import annotations

import asyncio
from typing import Iterator, Optional

from hsd_serve.engine.drafter import DrafterWorker
from hsd_serve.engine.engine import Coordinator, TargetInfo, run_stream
from hsd_serve.engine.target import TargetWorker
from hsd_serve.engine.types import Chunk, GenerationRequest, GenerationResult
from hsd_serve.models.hf import LoadedModel


class LocalTarget:
    """``TargetPort`` over a ``TargetWorker`` in this process."""

    def __init__(self, worker: TargetWorker):
        self.worker = worker

    async def verify(self, rid, committed, candidates, rule, params, position, proposals=None):
        # let a draft made ahead (a task started just before, ``overlap``) run first: in one
        # process the two cannot overlap, and it is then done at the verdict, as a drafter
        # that keeps up with the target is
        await asyncio.sleep(0)
        return self.worker.verify(rid, committed, candidates, rule, params, position, proposals)

    async def free(self, rid):
        self.worker.free(rid)


class LocalDrafter:
    """``DrafterPort`` over a ``DrafterWorker`` in this process."""

    def __init__(self, worker: DrafterWorker):
        self.worker = worker

    async def open(self, rid, method, prompt, params, prompt_ids):
        self.worker.open(rid, method, prompt, params, prompt_ids)

    async def draft(self, rid, k, position, *, committed=None, generated=None, attempt=0,
                    branches=0, span=0):
        return self.worker.draft(rid, k, position, committed=committed, generated=generated,
                                 attempt=attempt, branches=branches, span=span)

    async def slrs_step(self, rid, generated, row, position):
        return self.worker.slrs_step(rid, generated, row, position)

    async def free(self, rid):
        self.worker.free(rid)


class Engine:
    """Lossless speculative generation in this process.

    >>> engine = Engine(LoadedModel(ModelSpec(target_dir)), LoadedModel(ModelSpec(drafter_dir)))
    >>> engine.generate(GenerationRequest("def fib(n):", method="slem")).text
    """

    def __init__(self, target: LoadedModel, drafter: Optional[LoadedModel] = None, *,
                 slrs_max_forwards: int = 64, slrs_max_target_bytes: Optional[int] = 8,
                 proposal_top_m: int = 64, sink=None, overlap: bool = False,
                 overlap_miss: str = "plain", overlap_branches: int = 0):
        """``sink``: a :class:`hsd_serve.metrics.MetricsSink` (e.g. ``PrometheusSink()``) that
        receives every request's stats when it ends.  ``drafter`` may also be a model that names
        its own ``worker_class`` (``serve.vllm.drafter.VllmDraftModel``: the drafter on vLLM)."""
        self.target = target
        self.drafter = drafter
        self.target_worker = TargetWorker(target)
        self.drafter_worker = None
        if drafter is not None:
            worker_class = getattr(drafter, "worker_class", DrafterWorker)
            self.drafter_worker = worker_class(drafter, target.vocab,
                                                proposal_top_m=proposal_top_m,
                                                slrs_max_forwards=slrs_max_forwards,
                                                slrs_max_target_bytes=slrs_max_target_bytes)
        self.coordinator = Coordinator(
            LocalTarget(self.target_worker),
            TargetInfo(target.tokenizer, target.eos_ids, target.max_context),
            LocalDrafter(self.drafter_worker) if self.drafter_worker else None,
            same_vocab=bool(self.drafter_worker and self.drafter_worker.same_vocab), sink=sink,
            drafter_rows=self.drafter_worker is None or self.drafter_worker.returns_rows,
            overlap=overlap, overlap_miss=overlap_miss, overlap_branches=overlap_branches)

    def resolve_method(self, method: str, params) -> str:
        return self.coordinator.resolve_method(method, params)

    def stream(self, req: GenerationRequest) -> Iterator[Chunk]:
        return run_stream(self.coordinator.stream(req))

    def generate(self, req: GenerationRequest) -> GenerationResult:
        result = None
        for chunk in self.stream(req):
            result = chunk.result
        return result
