"""The vLLM executor in one process (benchmarks, ``hsd-serve generate --executor vllm``, tests).

``VllmEngine`` is ``engine.local.Engine`` with the target on vLLM: the same ``Coordinator`` runs
each request (``RequestRun.follow``), the target is a ``VllmTarget`` and the drafter a
``DrafterWorker`` behind its own data-plane gRPC server on localhost — the proposer inside vLLM
reaches it exactly as it reaches a drafter replica of the service.  Everything runs on one event
loop in a background thread; ``stream``/``generate`` are synchronous.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Iterator, Optional

from hsd_serve.engine.types import Chunk, GenerationRequest, GenerationResult
from hsd_serve.serve.config import VllmOptions


class LocalGeneratingTarget:
    """The coordinator's target port for a ``VllmTarget`` in this process."""

    def __init__(self, target):
        self.target = target

    def generate(self, rid, prompt_ids, params, max_new_tokens, spec=None):
        return self.target.generate(rid, prompt_ids, params, max_new_tokens, spec)

    async def free(self, rid: str) -> None:
        return None  # the stream's end aborted the request in vLLM


class DrafterAt:
    """A drafter port that only names its data-plane address (the proposer calls it)."""

    def __init__(self, address: str):
        self._address = address

    async def address(self) -> str:
        return self._address

    async def free(self, rid: str) -> None:
        return None


class VllmEngine:
    """Target on vLLM, drafter (optional) on our HF executor or on vLLM, one process."""

    def __init__(self, target_path: str, drafter=None, *,
                 options: Optional[VllmOptions] = None, threads: int = 1,
                 proposal_top_m: int = 64, sink=None):
        """``drafter``: a ``models.hf.LoadedModel``, a ``serve.vllm.drafter.VllmDraftModel`` (the
        drafter on vLLM too) or None (AR only)."""
        self.target_path = target_path
        self.options = options or VllmOptions()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hsd-vllm-engine",
                                        daemon=True)
        self._thread.start()
        self.server = None
        self.coordinator = None
        self.target = None
        self._call(self._start(drafter, threads, proposal_top_m, sink))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self, drafter, threads, proposal_top_m, sink) -> None:
        from hsd_serve.core.vocab import same_vocabulary
        from hsd_serve.engine.drafter import DrafterWorker
        from hsd_serve.engine.engine import Coordinator, TargetInfo
        from hsd_serve.models.hf import ModelSpec, describe_model
        from hsd_serve.serve.dataplane import start_dataplane_server
        from hsd_serve.serve.vllm.executor import VllmTarget

        d = describe_model(ModelSpec(self.target_path))
        port = None
        same_vocab, rows = False, True
        if drafter is not None:
            worker = getattr(drafter, "worker_class", DrafterWorker)(
                drafter, d.tokenizer.vocab, proposal_top_m=proposal_top_m)
            same_vocab, rows = worker.same_vocab, worker.returns_rows
            self.server, bound = await start_dataplane_server("drafter", worker, "127.0.0.1", 0)
            port = DrafterAt(f"127.0.0.1:{bound}")
        self.target = await VllmTarget(self.target_path, self.options, threads=threads).start()
        self.coordinator = Coordinator(
            LocalGeneratingTarget(self.target), TargetInfo(d.tokenizer, d.eos_ids, d.max_context),
            port, same_vocab=same_vocab, sink=sink, target_generates=True, drafter_rows=rows)

    def resolve_method(self, method: str, params) -> str:
        return self.coordinator.resolve_method(method, params)

    def stream(self, req: GenerationRequest) -> Iterator[Chunk]:
        from hsd_serve.engine.engine import run_stream

        return run_stream(self.coordinator.stream(req), self._call)

    def generate(self, req: GenerationRequest) -> GenerationResult:
        return self._call(self.coordinator.generate(req))

    async def _generate_many(self, reqs):
        return await asyncio.gather(*(self.coordinator.generate(r) for r in reqs))

    def generate_many(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``reqs`` concurrently (vLLM batches them)."""
        return self._call(self._generate_many(list(reqs)))

    def draft_stats(self) -> dict:
        return self._call(self.target.draft_stats())

    def close(self) -> None:
        from hsd_serve.serve.dataplane import stop_dataplane_server

        if self.target is not None:
            self.target.shutdown()
            self.target = None
        if self.server is not None:
            self._call(stop_dataplane_server(self.server))
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
