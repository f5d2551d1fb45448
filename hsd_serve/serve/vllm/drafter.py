"""The drafter on vLLM (``drafter_executor: vllm``): the drafter's forwards run in a vLLM engine.

``VllmDrafterWorker`` is a ``DrafterWorker`` (the same sessions, text sync, proposers and batching
of concurrent draft calls) whose forwards are steps of one in-process vLLM ``LLMEngine``: each
draft call of a batch becomes a vLLM request with the drafter's context as its prompt, vLLM
decodes them together (continuous batching; its prefix cache keeps each request's context between
rounds), and after every step each proposer gets the token vLLM chose, as a row whose only finite
logit is that token.

That row is all a proposer that drafts greedily needs: vLLM takes the argmax over the ids the
proposer may pick (TLI: the vocabulary intersection, SD: the target's ids; a mask loaded once in
the engine, ``drafter_mask.AllowedIdsOnly``), and the proposer's own argmax over the row is then
that token.  So the vLLM backend drafts for every method whose drafts are argmaxes — SLEM (at any
temperature: it always drafts greedily and verification keeps the target's own choices), and
greedy TLI (argmax inside the vocabulary intersection) and greedy SD.  Sampled TLI/SD send the
drafter's proposal rows with their drafts and SLRS reads the drafter's whole distribution: vLLM
returns tokens, not rows, so those stay on the HF drafter (``open`` refuses them, and the
coordinator resolves ``auto`` to SLEM for sampled requests).

The output is the target's either way: drafts change speed, never tokens (they are verified by the
target as every other draft).  Which backend is faster per drafted token depends on the hardware:
``hsd-serve bench --drafter-executor hf,vllm`` measures both (``docs/vllm.md``).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from hsd_serve.engine.drafter import DrafterWorker
from hsd_serve.engine.methods import METHODS
from hsd_serve.engine.methods.slem import MAX_DRAFT_PER_K
from hsd_serve.serve.config import VllmDrafterOptions, VllmEngineOptions

log = logging.getLogger(__name__)

MASK_ENV = "HSD_VLLM_DRAFTER_MASK"  # a file of the drafter ids its requests may draft (TLI, SD)
MASKED = "hsd_masked"  # SamplingParams.extra_args key: the request drafts inside that mask

TOKENS_ONLY = ("method {method!r} needs the drafter's distribution (sampled tli/sd send "
               "proposal rows, slrs reads the whole row); this drafter runs on vLLM "
               "(drafter_executor: vllm), which returns tokens: it drafts slem, and tli/sd when "
               "greedy")


class _VllmCached:
    """A drafter session whose keys/values live in vLLM's prefix cache, not here."""

    def __len__(self) -> int:
        return 0

    def free(self) -> None:
        return None


class VllmDraftModel:
    """What the drafter worker knows of a drafter that runs on vLLM: its tokenizer and sizes
    (read from its files, no weights in this process) and the engine, built by ``start`` (the
    first ``VllmDrafterWorker`` on it starts it with the ids its TLI/SD drafts may take)."""

    def __init__(self, path: str, options: Optional[VllmEngineOptions] = None, *,
                 threads: int = 1, trust_remote_code: bool = False):
        from hsd_serve.models.hf import ModelSpec, describe_model

        self.path, self.threads, self.trust_remote_code = path, threads, trust_remote_code
        d = describe_model(ModelSpec(path, trust_remote_code=trust_remote_code))
        self.tokenizer = d.tokenizer
        self.logit_size = d.logit_size
        self.eos_ids = d.eos_ids
        self.options = options or VllmDrafterOptions()
        self.max_context = min(d.max_context, self.options.max_model_len or d.max_context)
        # the engine is built and stepped on this one thread, whoever calls the drafter worker
        # (a single-process GPU engine binds its device and streams to its thread)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="hsd-vllm-drafter")
        self.mask_file = None
        self.engine = None

    def start(self, allowed: Optional[torch.Tensor]) -> None:
        """Build the engine; ``allowed`` ([logit size] bool, or None) is what masked requests
        may draft (``AllowedIdsOnly``, in the engine's process)."""
        import tempfile

        if allowed is not None:
            f = tempfile.NamedTemporaryFile(prefix="hsd-drafter-mask-", suffix=".pt",
                                            delete=False)
            torch.save(allowed.to(torch.bool).cpu(), f.name)
            self.mask_file = f.name
        self.engine = self.thread.submit(
            build_engine, self.path, self.options, threads=self.threads,
            trust_remote_code=self.trust_remote_code, max_model_len=self.max_context,
            mask_file=self.mask_file).result()

    def close(self) -> None:
        """Drop the engine (its memory is freed with it) and stop its thread."""
        engine, self.engine = self.engine, None
        if engine is not None:
            self.thread.submit(lambda: engine.engine_core.shutdown()).result()
        self.thread.shutdown(wait=True)
        if self.mask_file is not None:
            os.unlink(self.mask_file)
            self.mask_file = None

    @property
    def vocab(self):
        return self.tokenizer.vocab

    def new_session(self) -> _VllmCached:
        return _VllmCached()


def build_engine(path: str, o: VllmEngineOptions, *, threads: int, trust_remote_code: bool,
                 max_model_len: Optional[int], mask_file: Optional[str] = None):
    """A vLLM ``LLMEngine`` for the drafter with its engine core in this process (no core
    process between the drafter worker and the model: a step is scheduled on the calling thread).
    On GPU a single-device model runs in this process too; on CPU vLLM runs it in one worker
    process, with its OpenMP threads bound to the replica's cores."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor import Executor

    from hsd_serve.serve.reaper import ensure_reaper
    from hsd_serve.serve.vllm.executor import _cores, _cpu_only

    env = {MASK_ENV: mask_file or ""}
    if _cpu_only():
        env.update({"VLLM_CPU_KVCACHE_SPACE": str(o.cpu_kvcache_gib),
                    "VLLM_CPU_OMP_THREADS_BIND": _cores(o.cpu_threads_bind, threads)})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read while the engine is built; a target engine here keeps its own
    try:
        kwargs = dict(model=path, dtype=o.dtype, enforce_eager=o.enforce_eager,
                      max_num_seqs=o.max_num_seqs, max_model_len=max_model_len,
                      gpu_memory_utilization=o.gpu_memory_utilization,
                      tensor_parallel_size=o.tensor_parallel_size,
                      pipeline_parallel_size=o.pipeline_parallel_size,
                      trust_remote_code=trust_remote_code, skip_tokenizer_init=True,
                      distributed_executor_backend="uni" if o.tensor_parallel_size
                      * o.pipeline_parallel_size == 1 else None,
                      logits_processors=[ALLOWED_IDS_ONLY] if mask_file else None)
        kwargs.update(o.engine_args)
        cfg = EngineArgs(**kwargs).create_engine_config()
        ensure_reaper()  # vLLM's worker process must not outlive this one if it is killed
        return LLMEngine(vllm_config=cfg, executor_class=Executor.get_class(cfg),
                         log_stats=False, multiprocess_mode=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VllmDrafterWorker(DrafterWorker):
    """``DrafterWorker`` with its forwards on vLLM (greedy drafting methods only)."""

    returns_rows = False
    branches_ok = False  # its sessions are vLLM's: no branches of drafts made ahead

    def __init__(self, model: VllmDraftModel, target_vocab, **kwargs):
        super().__init__(model, target_vocab, **kwargs)
        if model.engine is None:  # TLI drafts inside the intersection, SD inside the target's ids
            allowed = self.proposer(METHODS["tli"]).in_i.clone() if not self.same_vocab else \
                torch.arange(model.logit_size) < target_vocab.size
            model.start(allowed if not bool(allowed.all()) else None)
        self.masked = model.mask_file is not None
        self.engine = model.engine
        self._ids = itertools.count()
        self.steps = 0  # vLLM engine steps run for drafts
        self.tokens = 0  # drafter tokens those steps produced

    def open(self, rid, method, prompt, params, prompt_ids=()) -> None:
        m = METHODS.get(method)
        if m is not None and m.needs_drafter and not m.drafts_argmax(params):
            raise ValueError(TOKENS_ONLY.format(method=method))
        super().open(rid, method, prompt, params, prompt_ids)

    def _sampling(self, method: str, k: int, room: int):
        """vLLM's sampling for one draft call: argmax over the ids the method's proposer may
        pick, at most as many tokens as it can ask for (it is aborted when it is done)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        # TLI: the argmax inside the vocabulary intersection; SD: inside the target's ids
        masked = self.masked and method in ("tli", "sd")
        return VSamplingParams(temperature=0.0, max_tokens=max(1, min(MAX_DRAFT_PER_K * k, room)),
                               ignore_eos=True, detokenize=False, skip_special_tokens=False,
                               extra_args={MASKED: True} if masked else None,
                               output_kind=RequestOutputKind.DELTA)

    def _drive(self, active: dict, finish, results: dict) -> None:
        self.model.thread.submit(self._drive_here, active, finish, results).result()

    def _drive_here(self, active: dict, finish, results: dict) -> None:
        from vllm.inputs import TokensPrompt

        engine = self.engine
        running: dict[str, tuple[int, list[int]]] = {}  # vLLM id -> (index, context so far)

        def stop(vid: str) -> None:
            running.pop(vid, None)
            engine.abort_request([vid])

        for i, a in list(active.items()):
            st, context = a[1], list(a[2])
            room = self.model.max_context - len(context)
            if room <= 0:
                del active[i]
                results[i] = ValueError(f"the drafter's context of {len(context)} tokens fills "
                                        f"its limit of {self.model.max_context}")
                continue
            vid = f"d{next(self._ids)}"
            try:
                engine.add_request(vid, TokensPrompt(prompt_token_ids=context),
                                   self._sampling(st.method, a[5], room))
            except Exception as exc:  # noqa: BLE001 - that call fails, the batch goes on
                del active[i]
                results[i] = exc
                continue
            running[vid] = (i, context)
        try:
            while running:
                t0 = time.perf_counter()
                outs = engine.step()
                dt = time.perf_counter() - t0
                self.steps += 1
                for out in outs:
                    if out.request_id not in running:
                        continue
                    i, context = running[out.request_id]
                    for t in out.outputs[0].token_ids:
                        self.tokens += 1
                        context.append(int(t))
                        row = torch.full((self.model.logit_size,), float("-inf"))
                        row[int(t)] = 0.0
                        self._advance(active, i, row, dt, finish, results)
                        if i not in active:
                            break
                        if active[i][2] != context:  # proposers continue their own drafts
                            del active[i]
                            results[i] = RuntimeError("the proposer left vLLM's sequence")
                            break
                    if i not in active:
                        stop(out.request_id)
                    elif out.finished:  # the drafter's context limit
                        del active[i]
                        stop(out.request_id)
                        results[i] = ValueError("the draft reached the drafter's context limit")
        finally:
            for vid in list(running):  # an error above: nothing stays in the engine
                stop(vid)


VllmDraftModel.worker_class = VllmDrafterWorker  # what ``Engine`` builds for such a drafter
ALLOWED_IDS_ONLY = "hsd_serve.serve.vllm.drafter_mask:AllowedIdsOnly"
