"""In-process vLLM engines behind the endpoint clients' interface (``generate(dataset, prompt,
spec, max_new, seed, concurrency) -> Sample``), so that ``run_endpoint`` measures them at every
concurrency side by side with a service (or with each other):

- ``vllm-ar``: vLLM alone on the target (no speculative config);
- ``vllm-hetero``: vLLM's own ``draft_model`` drafting with ``use_heterogeneous_vocab`` (one
  engine per lookahead);
- our methods on the vLLM executor in this process (``serve.vllm.VllmEngine``: the target on
  vLLM, our drafter behind a localhost data-plane server), for ``--executor vllm`` without
  ``--endpoint``.

Each engine is our ``VllmEngine`` (the coordinator drives its requests: detokenization, stop
strings), so the baselines and our methods pay the same per-request overhead.
"""

from __future__ import annotations

import time
from typing import Optional

from hsd_serve.bench.datasets import Prompt
from hsd_serve.bench.runner import VLLM_AR, VLLM_HETERO, BenchConfig, RunSpec, Sample


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
            for overlap in dict.fromkeys(bool(v) for v in cfg.overlap):
                engine = VllmEngine(target, d, options=_options(
                    cfg, num_speculative_tokens=k_max, overlap=overlap), threads=cfg.threads or 1)
                key = overlap if backends == ("hf",) else f"drafter {backend}"
                # a drafter on vLLM is an engine of its own, closed with this client
                owned = d if d is not drafter and hasattr(d, "close") else None
                clients[None, key] = EngineClient(engine, owned=owned)
    return clients


def client_for(clients: dict, default):
    from hsd_serve.bench.runner import OVERLAP_VARIANTS

    ours = [v for key, v in clients.items() if isinstance(key, tuple) and key[0] is None]

    def pick(spec: RunSpec):
        return (clients.get((spec.method, spec.lookahead)) or clients.get(spec.method)
                or default or clients.get((None, spec.variant))
                or clients.get((None, OVERLAP_VARIANTS.get(spec.variant, True))) or ours[0])
    return pick
