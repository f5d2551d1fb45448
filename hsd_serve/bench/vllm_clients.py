"""In-process vLLM engines behind the endpoint clients' interface (``generate(dataset, prompt,
spec, max_new, seed, concurrency) -> Sample``), so that ``run_endpoint`` measures them at every
concurrency side by side with a service (or with each other):

- ``vllm-ar``: vLLM alone on the target (no speculative config);
- ``vllm-serve``: vLLM's own OpenAI-compatible server (``vllm serve``) on the target, a child
  process measured over HTTP (``VllmServeClient``): the served baseline;
- ``vllm-hetero``: vLLM's own ``draft_model`` drafting with ``use_heterogeneous_vocab`` (one
  engine per lookahead);
- our methods on the vLLM executor in this process (``serve.vllm.VllmEngine``: the target on
  vLLM, our drafter behind a localhost data-plane server), for ``--executor vllm`` without
  ``--endpoint``.

Each engine is our ``VllmEngine`` (the coordinator drives its requests: detokenization, stop
strings), so the baselines and our methods pay the same per-request overhead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

from hsd_serve.bench.datasets import Prompt
from hsd_serve.bench.remote import sse_events
from hsd_serve.bench.runner import VLLM_AR, VLLM_HETERO, VLLM_SERVE, BenchConfig, RunSpec, Sample


class EngineClient:
    """One ``VllmEngine``; ``method``: what it is asked to run (None: the spec's method)."""

    def __init__(self, engine, method: Optional[str] = None, owned=None):
        self.engine = engine
        self.method = method
        self.owned = owned  # closed with it

    def generate(self, dataset: str, prompt: Prompt, spec: RunSpec, max_new: int, seed: int,
                 concurrency: int = 1) -> Sample:
        from hsd_serve.core.sampling import SamplingParams
        from hsd_serve.engine.types import GenerationRequest

        req = GenerationRequest(prompt.text, max_new_tokens=max_new,
                                method=self.method or spec.method,
                                lookahead=max(1, spec.lookahead),
                                params=SamplingParams(temperature=spec.temperature, seed=seed))
        t0 = time.perf_counter()
        result = self.engine.generate(req)
        wall = time.perf_counter() - t0
        sample = Sample.from_result(dataset, prompt.id, spec, result, seed)
        sample.wall_s, sample.concurrency = wall, concurrency
        return sample

    def close(self) -> None:
        self.engine.close()
        if self.owned is not None:  # a drafter on vLLM: its engine
            self.owned.close()


def _options(cfg: BenchConfig, **kw):
    from hsd_serve.serve.config import VllmOptions

    base = dict(cfg.vllm or {})
    base.update(kw)
    return VllmOptions(**base)


def local_clients(cfg: BenchConfig, specs, *, ours: bool) -> dict:
    """``{method or (method, lookahead): client}`` for the specs that run in this process:
    the vLLM baselines, and with ``ours`` our methods on the vLLM executor."""
    from hsd_serve.bench.runner import drafter_for_backend, load_pair
    from hsd_serve.serve.vllm.local import VllmEngine
    from hsd_serve.zoo import bundled_model_dir

    target = cfg.target or str(bundled_model_dir("target"))
    clients: dict = {}
    methods = {s.method for s in specs}
    if VLLM_AR in methods:
        clients[VLLM_AR] = EngineClient(VllmEngine(target, None, options=_options(
            cfg, num_speculative_tokens=0)), method="ar")
    if VLLM_SERVE in methods:
        clients[VLLM_SERVE] = VllmServeClient(target, _options(cfg, num_speculative_tokens=0),
                                              threads=cfg.threads or 1, timeout_s=cfg.timeout_s)
    drafter_dir = cfg.drafter or str(bundled_model_dir("drafter"))
    for k in sorted({s.lookahead for s in specs if s.method == VLLM_HETERO}):
        spec_cfg = {"method": "draft_model", "model": drafter_dir, "num_speculative_tokens": k,
                    "use_heterogeneous_vocab": True}
        clients[VLLM_HETERO, k] = EngineClient(VllmEngine(target, None, options=_options(
            cfg, num_speculative_tokens=0, engine_args={"speculative_config": spec_cfg})),
            method="ar")
    if ours:  # one engine per overlap setting measured (vllm.overlap), or per drafter backend
        _, drafter = load_pair(cfg, target=False)
        k_max = max([s.lookahead for s in specs] + [1])
        backends = cfg.drafter_executors if drafter is not None else ("hf",)
        for backend in backends:
            d = drafter_for_backend(drafter, backend, cfg) if drafter is not None else drafter
            for setting in dict.fromkeys(cfg.overlap):
                miss = {"overlap_miss": "wait"} if setting == "wait" else {}
                engine = VllmEngine(target, d, options=_options(
                    cfg, num_speculative_tokens=k_max, overlap=bool(setting), **miss),
                    threads=cfg.threads or 1)
                key = setting if backends == ("hf",) else f"drafter {backend}"
                # a drafter on vLLM is an engine of its own, closed with this client
                owned = d if d is not drafter and hasattr(d, "close") else None
                clients[None, key] = EngineClient(engine, owned=owned)
    return clients


def client_for(clients: dict, default):
    from hsd_serve.bench.runner import OVERLAP_SETTINGS

    ours = [v for key, v in clients.items() if isinstance(key, tuple) and key[0] is None]

    def pick(spec: RunSpec):
        return (clients.get((spec.method, spec.lookahead)) or clients.get(spec.method)
                or default or clients.get((None, spec.variant))
                or clients.get((None, OVERLAP_SETTINGS.get(spec.variant, True))) or ours[0])
    return pick


def serve_args(target: str, options, port: int) -> list[str]:
    """``vllm serve`` arguments for the target with the same engine settings as ``options``
    (``VllmOptions``): what a user runs instead of us, configured as our target replicas are."""
    o = options
    args = ["--model", target, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "target", "--dtype", o.dtype,
            "--max-num-seqs", str(o.max_num_seqs),
            "--tensor-parallel-size", str(o.tensor_parallel_size),
            "--pipeline-parallel-size", str(o.pipeline_parallel_size),
            "--gpu-memory-utilization", str(o.gpu_memory_utilization),
            "--uvicorn-log-level", "warning"]
    if o.enforce_eager:
        args.append("--enforce-eager")
    if o.max_model_len:
        args += ["--max-model-len", str(o.max_model_len)]
    for key, value in o.engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            args += [flag, json.dumps(value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


class VllmServeClient:
    """``vllm-serve``: vLLM's own OpenAI-compatible server (``vllm serve``) on the target, started
    here as a child process with the engine settings of ``vllm-ar`` (dtype, eager, limits,
    ``engine_args``; on CPU the same KV-cache space and thread binding, and its engine core on
    the worker's cores as vllm-ar's is with ``cpu_pin_engine_core``), measured over HTTP
    streaming ``/v1/completions`` like a client of a service.  It is what a user runs instead of
    our service, so through an ``--endpoint`` it is the served baseline; prompts go as the
    target's token ids (encoded as our coordinator encodes them) and ``return_token_ids`` brings
    the output's ids back, so its output is compared with ``vllm-ar`` token for token."""

    def __init__(self, target: str, options, *, threads: int = 1, timeout_s: float = 300.0,
                 start_timeout_s: float = 900.0):
        import httpx

        from hsd_serve.models.hf import ModelSpec, describe_model
        from hsd_serve.serve.reaper import ensure_reaper
        from hsd_serve.serve.vllm.executor import _cpu_only, cpu_engine_env, engine_core_cores

        self.encode = describe_model(ModelSpec(target)).tokenizer.encode_prompt
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        self.cpu = _cpu_only()
        cpu_engine_env(env, options, threads)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log",
                                               delete=False)
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                        *serve_args(target, options, port)]
        ensure_reaper()  # the server must not outlive this process if it is killed
        self.proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.client = httpx.Client(timeout=timeout_s)
        self.pinned: list[int] = []
        self.bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "")
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise
        cores = engine_core_cores(options, self.bind)
        if cores is not None:  # as vllm-ar's engine and our target replicas run: the engine
            # core, which busy-polls its worker, on the worker's cores
            self.pinned = _pin_engine_core(self.proc.pid, cores)

    def describe(self) -> dict:
        """How the server ran (``results.json: served_baselines``)."""
        return {"command": self.command[1:], "engine_core_pinned": bool(self.pinned),
                "bind": self.bind}

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it "
                                   f"was ready:\n{self.log_tail()}")
            try:
                if self.client.get(f"{self.base}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log.name, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def generate(self, dataset: str, prompt: Prompt, spec: RunSpec, max_new: int, seed: int,
                 concurrency: int = 1) -> Sample:
        prompt_ids = self.encode(prompt.text)
        body = {"model": "target", "prompt": prompt_ids, "max_tokens": max_new,
                "temperature": spec.temperature, "stream": True,
                "return_token_ids": True, "stream_options": {"include_usage": True}}
        if spec.temperature > 0 and not self.cpu:  # as vllm-ar: per-request seeds crash
            body["seed"] = seed  # vLLM 0.32's CPU sampler (FACTS.md), so there it is unseeded
        ids: list[int] = []
        text: list[str] = []
        first = None
        finish = ""
        t0 = time.perf_counter()
        for obj in sse_events(self.client, f"{self.base}/v1/completions", body, "vllm serve: "):
            for choice in obj.get("choices") or []:
                new = choice.get("token_ids") or []
                if new and first is None:
                    first = time.perf_counter()
                ids += new
                text.append(choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
        wall = time.perf_counter() - t0
        return Sample(dataset=dataset, prompt_id=prompt.id, spec=spec,
                      prompt_tokens=len(prompt_ids), token_ids=ids, text="".join(text),
                      finish_reason=finish, wall_s=wall,
                      ttft_s=(first or time.perf_counter()) - t0, rounds=len(ids), seed=seed,
                      concurrency=concurrency)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            try:  # the server, its engine core and workers: one process group
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.log.close()
        try:  # a failed start carried its log in the error
            os.unlink(self.log.name)
        except OSError:
            pass


def _pin_engine_core(server_pid: int, cores: set[int]) -> list[int]:
    from hsd_serve.serve.reaper import descendants
    from hsd_serve.serve.vllm.executor import pin_processes

    engine = [pid for pid in descendants(server_pid) if _comm(pid).startswith("VLLM::EngineCor")]
    return pin_processes(engine, cores)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
