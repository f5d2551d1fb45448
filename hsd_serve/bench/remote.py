"""Measure a running service (``--endpoint``) over gRPC or the OpenAI-compatible HTTP API.

``grpc://HOST:PORT`` (or a bare ``HOST:PORT``) streams ``hsd.v1.Generation/GenerateStream`` with
the ``application`` metadata; ``http://HOST:PORT[/prefix]`` streams ``POST /v1/completions``.  Wall
time and TTFT are measured by this client; the service's own statistics (rounds, acceptance,
draft/verify/bridge/transport seconds, its wall time) come back in the last chunk.

Single stream (``--concurrency 1`` and no ``--duration``) interleaves the methods prompt by prompt,
as in-process.  Otherwise each method gets a load phase: ``C`` client threads take prompts in turn
(cycling through them until ``--duration`` seconds have passed, or once through without it) and
``aggregate_tokens_per_s`` is all tokens of the phase over its wall time.  Unless ``--no-warmup``,
each load phase starts with an untimed round of ``C`` concurrent requests: an engine's first
batches of a new size are slow (vLLM's first two-request batch took 1.0–1.6 s to its first token
here, against ~0.1 s after it), and in a phase of a few seconds that transient is a large share.
``--repeats N``: ``N`` passes over the methods in rotated order; a run's aggregate is the median
of its passes and ``aggregate_vs_ar`` the median of its per-pass ratios to the reference.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional
from urllib.parse import urlparse

from hsd_serve.bench.metrics import rotated
from hsd_serve.bench.datasets import Prompt, context_fitter, fit_prompts, load_prompts, LONG_CONTEXT
from hsd_serve.bench.runner import (BASELINES, HF, HF_AR, OVERLAP_MISS, PLAIN, VLLM_SERVE,
                                    BenchConfig, RunSpec, Sample, _config_dict, _progress,
                                    aggregate_dataset, build_specs, calibrate, check_identity,
                                    machine_info, merge_calibrations, overlap_variant,
                                    per_drafter_backend, span_lists)


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """(``grpc`` | ``http``, address or base URL)."""
    if endpoint.startswith(("http://", "https://")):
        return "http", endpoint.rstrip("/")
    if endpoint.startswith("grpc://"):
        return "grpc", endpoint[len("grpc://"):].rstrip("/")
    if "://" in endpoint:
        raise ValueError(f"--endpoint: unsupported scheme in {endpoint!r} (grpc:// or http://)")
    return "grpc", endpoint


class GrpcClient:
    def __init__(self, address: str, application: str, timeout_s: float):
        import grpc

        from hsd_serve.pb import hsd_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.stub = hsd_pb2_grpc.GenerationStub(self.channel)
        from hsd_serve.serve.security import auth_metadata, client_key

        self.metadata = (("application", application),) + auth_metadata(client_key())
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def generate(self, dataset: str, prompt: Prompt, spec: RunSpec, max_new: int, seed: int,
                 concurrency: int = 1) -> Sample:
        from hsd_serve.pb import hsd_pb2
        from hsd_serve.serve.convert import finish_reason_from_proto, method_to_proto

        req = hsd_pb2.GenerateRequest(
            prompt=prompt.text, max_tokens=max_new, method=method_to_proto(spec.method),
            lookahead=max(1, spec.lookahead), trace=concurrency == 1,
            sampling=hsd_pb2.SamplingParams(temperature=spec.temperature, seed=seed))
        ids, text, first, last = [], [], None, None
        t0 = time.perf_counter()
        for chunk in self.stub.GenerateStream(req, metadata=self.metadata, timeout=self.timeout_s):
            if first is None and (chunk.token_ids or chunk.text):
                first = time.perf_counter()
            ids += list(chunk.token_ids)
            text.append(chunk.text)
            last = chunk
        wall = time.perf_counter() - t0
        st = last.stats if last is not None else None
        finish = finish_reason_from_proto(last.finish_reason) if last is not None else ""
        return Sample(dataset=dataset, prompt_id=prompt.id, spec=spec,
                      prompt_tokens=int(st.prompt_tokens) if st else 0, token_ids=ids,
                      text="".join(text), finish_reason=finish,
                      wall_s=wall, ttft_s=(first or time.perf_counter()) - t0,
                      rounds=int(st.rounds), drafted=int(st.drafted), accepted=int(st.accepted),
                      accepted_per_position=list(st.accepted_per_position),
                      drafted_per_position=None, fallback_rounds=int(st.fallback_rounds),
                      draft_s=st.draft_s, verify_s=st.verify_s, bridge_s=st.bridge_s,
                      transport_s=st.transport_s, server_wall_s=st.wall_s, seed=seed,
                      concurrency=concurrency,
                      timeline=span_lists(st.timeline) if st else None)


def sse_events(client, url: str, body: dict, who: str = ""):
    """POST ``body`` to an OpenAI-style streaming endpoint with ``client`` (httpx); yield each
    event's JSON until ``[DONE]``.  An HTTP error or an error event raises (``who`` prefixes
    the message)."""
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"{who}HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data.strip() == "[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{who}stream error: {obj['error']}")
            yield obj


class HttpClient:
    def __init__(self, base: str, timeout_s: float):
        import httpx

        from hsd_serve.serve.security import auth_header, client_key

        self.base = base
        self.client = httpx.Client(timeout=timeout_s, headers=auth_header(client_key()))
        self.model = None
        try:
            models = self.client.get(f"{base}/v1/models").json()
            self.model = models["data"][0]["id"]
        except Exception:  # noqa: BLE001 - the model field is optional
            pass

    def close(self) -> None:
        self.client.close()

    def generate(self, dataset: str, prompt: Prompt, spec: RunSpec, max_new: int, seed: int,
                 concurrency: int = 1) -> Sample:
        body = {"prompt": prompt.text, "max_tokens": max_new, "temperature": spec.temperature,
                "seed": seed, "method": spec.method, "lookahead": max(1, spec.lookahead),
                "stream": True}
        if self.model:
            body["model"] = self.model
        text, first, final = [], None, None
        t0 = time.perf_counter()
        for obj in sse_events(self.client, f"{self.base}/v1/completions", body):
            piece = "".join(c.get("text") or "" for c in obj.get("choices", []))
            if piece and first is None:
                first = time.perf_counter()
            text.append(piece)
            if obj.get("hsd") is not None:
                final = obj
        wall = time.perf_counter() - t0
        hsd = (final or {}).get("hsd") or {}
        usage = (final or {}).get("usage") or {}
        finish = ""
        if final:
            finish = next((c.get("finish_reason") for c in final.get("choices", [])
                           if c.get("finish_reason")), "") or ""
        return Sample(dataset=dataset, prompt_id=prompt.id, spec=spec,
                      prompt_tokens=int(usage.get("prompt_tokens", 0)), token_ids=[],
                      text="".join(text), finish_reason=finish, wall_s=wall,
                      ttft_s=(first or time.perf_counter()) - t0,
                      rounds=int(hsd.get("rounds", 0)), drafted=int(hsd.get("drafted", 0)),
                      accepted=int(hsd.get("accepted", 0)), accepted_per_position=[],
                      drafted_per_position=None, fallback_rounds=int(hsd.get("fallback_rounds", 0)),
                      server_wall_s=hsd.get("wall_s"), seed=seed, concurrency=concurrency,
                      emitted=int(usage.get("completion_tokens", 0)))


def _local_description(cfg: BenchConfig):
    """Tokenizers/contexts of the pair (config files only) for fitting prompts; None if absent."""
    from hsd_serve.models.hf import ModelSpec, describe_model
    from hsd_serve.zoo import bundled_model_dir

    try:
        t = describe_model(ModelSpec(cfg.target or str(bundled_model_dir("target"))))
        dpath = cfg.drafter if cfg.drafter is not None else str(bundled_model_dir("drafter"))
        d = describe_model(ModelSpec(dpath)) if dpath and dpath.lower() != "none" else None
        return t, d
    except Exception:  # noqa: BLE001
        return None, None


def run_endpoint(cfg: BenchConfig, *, progress: bool = True, calibrate_locally: bool = True) -> dict:
    import datetime as _dt

    cfg.validate()
    started = time.time()
    machine = machine_info()
    methods = [m for m in cfg.methods if m not in (HF, HF_AR)]
    skipped = [{"method": m, "reason": "the transformers baselines run in-process only"}
               for m in cfg.methods if m in (HF, HF_AR)]
    specs_all = build_specs(methods, cfg.temperatures, cfg.lookaheads, reference=cfg.reference)
    apps = [a.strip() for a in cfg.application.split(",") if a.strip()] or ["hsd"]
    both = len(set(cfg.overlap)) > 1
    if cfg.endpoint and (len(apps) > 1 or both) and (
            len(apps) != len(cfg.overlap) or not both
            or parse_endpoint(cfg.endpoint)[0] != "grpc"):
        raise ValueError("--overlap on,off (or on,wait,off) against a service needs a gRPC "
                         "--endpoint and one --application per value, the same service "
                         "deployed each way (e.g. --application hsd_overlap,hsd_no_overlap: "
                         "bench/service_config_overlap_ab.yaml, HF executor, or "
                         "bench/service_config_vllm_overlap_ab.yaml)")
    if not cfg.endpoint:  # in-process vLLM executor: our drafter on each backend asked for
        specs_all = per_drafter_backend(specs_all, cfg.drafter_executors)
    if both:
        specs_all = [RunSpec(s.method, s.temperature, s.lookahead, v)
                     for s in specs_all for v in (
                         tuple(overlap_variant(v) for v in cfg.overlap)
                         if s.method not in PLAIN + BASELINES
                         else (s.variant,))]
    if cfg.endpoint:
        kind, address = parse_endpoint(cfg.endpoint)
        client = (GrpcClient(address, apps[0], cfg.timeout_s) if kind == "grpc"
                  else HttpClient(address, cfg.timeout_s))
        mode = f"endpoint ({kind} {address})"
    else:  # --executor vllm in this process
        kind, address, client, mode = "in-process", None, None, "in-process (vLLM executor)"
    # a service deployed with and without drafting ahead: one application each
    by_variant = {overlap_variant(setting): (
        client if i == 0 else GrpcClient(address, app, cfg.timeout_s))
        for i, (app, setting) in enumerate(zip(apps, cfg.overlap))} \
        if cfg.endpoint and both else {}
    served_clients = {id(c) for c in [client, *by_variant.values()] if c is not None}
    from hsd_serve.bench.vllm_clients import client_for, local_clients

    local = local_clients(cfg, specs_all, ours=client is None)
    pick_local = client_for(local, client)

    def pick(spec: RunSpec):
        return by_variant.get(spec.variant) or pick_local(spec)
    t_desc, d_desc = _local_description(cfg)
    calibration: dict = {}
    if calibrate_locally and t_desc is not None:
        try:  # models loaded here only to time their steps, before any load is sent
            from hsd_serve.bench.runner import load_pair

            target, drafter = load_pair(cfg)
            first = load_prompts(cfg.datasets[0], cfg.data_dir, 1)[0]
            calibration = merge_calibrations([calibrate(target, drafter, first.text,
                                                        steps=cfg.calibration_steps,
                                                        verify_ks=cfg.lookaheads)])
            calibration["where"] = "bench process (same machine), before the load"
            del target, drafter
        except Exception as exc:  # noqa: BLE001
            calibration = {"error": f"{type(exc).__name__}: {exc}"}
    runs, all_samples, dataset_info = [], [], {}
    try:
        for dataset in cfg.datasets:
            prompts = load_prompts(dataset, cfg.data_dir, cfg.limit)
            if t_desc is not None:
                fits = context_fitter(t_desc.tokenizer, t_desc.max_context, cfg.max_new_tokens,
                                      drafter_tokenizer=d_desc.tokenizer if d_desc else None,
                                      drafter_context=d_desc.max_context if d_desc else None,
                                      lookahead=max(cfg.lookaheads))
                loaded = len(prompts)
                prompts, dropped = fit_prompts(prompts, fits)
            else:
                loaded, dropped = len(prompts), 0
            dataset_info[dataset] = {"loaded": loaded, "used": len(prompts), "dropped": dropped,
                                     "truncated": sum(p.truncated for p in prompts),
                                     "long_context": dataset in LONG_CONTEXT}
            if not prompts:
                continue
            specs = list(specs_all)
            if cfg.warmup:
                for spec in list(specs):
                    try:
                        pick(spec).generate(dataset, prompts[0], spec, min(8, cfg.max_new_tokens),
                                            cfg.seed)
                    except Exception as exc:  # noqa: BLE001 - e.g. a method the pair refuses
                        if spec.method in ("ar", cfg.reference):
                            raise
                        specs.remove(spec)
                        skipped.append({"dataset": dataset, "label": spec.label,
                                        "temperature": spec.temperature, "reason": str(exc)[:300]})
            for conc in cfg.concurrency:
                if conc == 1 and not cfg.duration:
                    samples, aggregate_tps = _single_stream(pick, cfg, dataset, prompts, specs,
                                                            progress)
                    passes = {}
                else:
                    samples, aggregate_tps, passes = _load_phases(pick, cfg, dataset, prompts,
                                                                  specs, conc, progress)
                sub = aggregate_dataset(dataset, specs, samples, calibration, concurrency=conc,
                                        reference=cfg.reference, executor=cfg.executor)
                for r in sub:
                    served = id(pick(RunSpec(r["method"], r["temperature"], r["lookahead"],
                                             r["variant"] or ""))) in served_clients
                    r["endpoint"] = served
                    r["endpoint_kind"] = (kind if served else "http (vllm serve)"
                                          if r["method"] == VLLM_SERVE else "in-process")
                    key = RunSpec(r["method"], r["temperature"], r["lookahead"], r["variant"] or "")
                    r["aggregate_tokens_per_s"] = aggregate_tps.get(key, r["tokens_per_s"])
                    if key in passes:
                        r["aggregate_tokens_per_s_passes"] = passes[key]
                    if r.get("overlap") is None and r["drafted"] and (
                            cfg.endpoint or cfg.executor == "vllm"):
                        r["overlap"] = bool(cfg.overlap[0])
                        r["overlap_miss"] = OVERLAP_MISS.get(overlap_variant(cfg.overlap[0]))
                runs += sub
                all_samples += samples
    finally:
        proposer_stats = _proposer_stats(local)
        served_baseline = {m: c.describe() for m, c in local.items() if hasattr(c, "describe")}
        for c in {id(c): c for c in [client, *by_variant.values(), *local.values()]}.values():
            if c is not None:
                c.close()
    # aggregate throughput against one stream of the same configuration
    for r in runs:
        one = next((o for o in runs if o["dataset"] == r["dataset"] and o["label"] == r["label"]
                    and o["temperature"] == r["temperature"] and o["concurrency"] == 1), None)
        if one and one.get("aggregate_tokens_per_s"):
            r["aggregate_vs_single_stream"] = r["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]
    aggregate_vs_reference(runs)
    failures, baseline = check_identity(runs)
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return {"runs": runs, "machine": machine, "command": cfg.command,
            "proposer_stats": proposer_stats, "served_baselines": served_baseline,
            "mode": mode, "endpoint": cfg.endpoint, "executor": cfg.executor,
            "config": _config_dict(cfg), "calibration": calibration, "datasets": dataset_info,
            "failures": failures, "baseline_mismatches": baseline, "skipped": skipped,
            "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
            "elapsed_s": time.time() - started, "samples": all_samples}


def aggregate_vs_reference(runs: list[dict]) -> None:
    """Each load run's ``aggregate_vs_ar``: its aggregate tok/s over its reference's (AR or
    vllm-ar, same dataset, temperature and concurrency), the median of the per-pass ratios when
    both have passes (pass ``i`` against pass ``i``: the two ran minutes apart, not a whole
    sweep apart), with the per-pass ratios in ``aggregate_vs_ar_passes``."""
    for r in runs:
        if "aggregate_tokens_per_s_passes" not in r:
            continue
        ref = next((o for o in runs if o["method"] == r.get("reference") and not o["lookahead"]
                    and o["dataset"] == r["dataset"] and o["temperature"] == r["temperature"]
                    and o.get("concurrency") == r.get("concurrency")
                    and "aggregate_tokens_per_s_passes" in o), None)
        if ref is None:
            continue
        ratios = [a / b for a, b in zip(r["aggregate_tokens_per_s_passes"],
                                        ref["aggregate_tokens_per_s_passes"]) if b > 0]
        if ratios:
            r["aggregate_vs_ar"] = statistics.median(ratios)
            r["aggregate_vs_ar_passes"] = ratios


def _single_stream(pick, cfg, dataset, prompts, specs, progress):
    samples = []
    bar = _progress(len(prompts) * len(specs), progress, f"bench {dataset} (endpoint)")
    for i, prompt in enumerate(prompts):
        for spec in rotated(specs, i):
            bar.set_postfix_str(f"{spec.label} T={spec.temperature:g}")
            samples.append(pick(spec).generate(dataset, prompt, spec, cfg.max_new_tokens,
                                               cfg.seed + i))
            bar.update(1)
    bar.close()
    return samples, {}


def _load_phases(pick, cfg, dataset, prompts, specs, conc, progress):
    """Every spec's load phase at ``conc`` streams, ``cfg.repeats`` passes over the specs (pass
    ``r`` starts at spec ``r``, so no method always runs first or after the same neighbour).
    Returns the samples, each spec's median aggregate tok/s and its per-pass list."""
    samples, passes = [], {spec: [] for spec in specs}
    total = None if cfg.duration else len(prompts) * len(specs) * cfg.repeats
    bar = _progress(total or 0, progress, f"bench {dataset} ×{conc}")
    for rep in range(cfg.repeats):
        for spec in rotated(specs, rep):
            bar.set_postfix_str(f"{spec.label} T={spec.temperature:g}"
                                + (f" pass {rep + 1}/{cfg.repeats}" if cfg.repeats > 1 else ""))
            phase, tps = _load_phase(pick, cfg, dataset, prompts, spec, conc, bar, rep)
            passes[spec].append(tps)
            samples += phase
    bar.close()
    return samples, {spec: statistics.median(v) for spec, v in passes.items()}, passes


def _load_phase(pick, cfg, dataset, prompts, spec, conc, bar, rep: int = 0):
    """One spec at ``conc`` streams for ``cfg.duration`` s (or once through the prompts): its
    samples and aggregate tok/s.  Pass ``rep`` > 0 marks its sample ids ``@pass{rep + 1}`` (they
    pair with the other methods' samples of the same pass)."""
    counter = itertools.count()
    lock = threading.Lock()
    phase: list[Sample] = []
    if cfg.warmup:  # untimed: the engine's first batches of this size (shapes, caches)
        with ThreadPoolExecutor(max_workers=conc) as pool:
            list(pool.map(lambda j: pick(spec).generate(
                dataset, prompts[j % len(prompts)], spec, cfg.max_new_tokens, cfg.seed + j,
                concurrency=conc), range(conc)))
    deadline = time.perf_counter() + cfg.duration if cfg.duration else None

    def worker():
        while True:
            with lock:
                i = next(counter)
            if deadline is None and i >= len(prompts):
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            j = i % len(prompts)
            s = pick(spec).generate(dataset, prompts[j], spec, cfg.max_new_tokens,
                                    cfg.seed + j, concurrency=conc)
            s.prompt_id = (prompts[j].id if i < len(prompts)
                           else f"{prompts[j].id}#{i // len(prompts)}")
            if rep:
                s.prompt_id += f"@pass{rep + 1}"
            with lock:
                phase.append(s)
                bar.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=conc) as pool:
        futures = [pool.submit(worker) for _ in range(conc)]
        for f in futures:
            f.result()
    wall = time.perf_counter() - t0
    return phase, (sum(s.n_tokens for s in phase) / wall if wall > 0 else 0.0)


def _proposer_stats(local: dict) -> dict:
    """Our in-process vLLM engines' proposer counters (``DraftBroker.stats``: draft calls, time
    in the drafter round trip, the drafter's model time, bridging), by engine variant."""
    out = {}
    for key, c in local.items():
        engine = getattr(c, "engine", None)
        if isinstance(key, tuple) and key[0] is None and hasattr(engine, "draft_stats"):
            try:
                out[str(key[1])] = engine.draft_stats()
            except Exception as exc:  # noqa: BLE001 - a report, never a failure
                out[str(key[1])] = {"error": str(exc)[:200]}
    return out
