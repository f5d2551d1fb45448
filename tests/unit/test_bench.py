"""`hsd-serve bench`: datasets, the ideal-speedup arithmetic, a tiny in-process run, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsd_serve.bench.datasets import (DATASETS, Prompt, available_datasets, load_prompts,
                                      truncate_to_fit)
from hsd_serve.bench.metrics import (alpha_from_tokens_per_round, conditional_alpha,
                                     ideal_speedup, percentile)
from hsd_serve.bench.report import PLOTS, markdown, write_outputs
from hsd_serve.bench.runner import (BenchConfig, RunSpec, build_specs, check_identity,
                                    overlap_variant, run_inprocess)

REQUIRED = ("dataset", "method", "temperature", "lookahead", "prompts", "tokens_per_s", "tpot_ms",
            "ttft_ms", "acceptance_rate", "tokens_per_round", "speedup_vs_ar", "ideal_speedup",
            "identical_to_ar")


# ---------------------------------------------------------------------------- arithmetic


def test_ideal_speedup_hand_values():
    # (1 - 0.5^5) / (0.5 * (4*0.1 + 1)) = 0.96875 / 0.7
    assert ideal_speedup(0.5, 4, 0.1) == pytest.approx(0.96875 / 0.7)
    # (1 - 0.8^3) / (0.2 * (2*0.05 + 1)) = 0.488 / 0.22
    assert ideal_speedup(0.8, 2, 0.05) == pytest.approx(0.488 / 0.22)
    assert ideal_speedup(1.0, 3, 0.0) == pytest.approx(4.0)  # every draft accepted, free drafts
    assert ideal_speedup(1.0, 4, 0.25) == pytest.approx(5.0 / 2.0)
    assert ideal_speedup(0.0, 2, 0.05) == pytest.approx(1.0 / 1.1)  # nothing accepted: pure cost
    assert ideal_speedup(0.999999, 3, 0.1) == pytest.approx(4.0 / 1.3, rel=1e-4)  # continuous at 1
    with pytest.raises(ValueError):
        ideal_speedup(1.5, 2, 0.1)


def test_alpha_estimates():
    # 4 rounds of 2 candidates: 3 accepted the first, 1 of those also the second
    assert conditional_alpha([3, 1], [4, 4]) == pytest.approx(4 / 7)
    assert conditional_alpha([], []) is None
    assert conditional_alpha([0, 0], [5, 5]) == 0.0
    assert conditional_alpha([5, 5, 5], [5, 5, 5]) == 1.0
    for alpha in (0.0, 0.3, 0.7, 0.95):
        tau = (1 - alpha ** 5) / (1 - alpha)
        assert alpha_from_tokens_per_round(tau, 4) == pytest.approx(alpha, abs=1e-6)
    assert alpha_from_tokens_per_round(0.5, 4) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)


def test_specs_and_identity_rules():
    specs = build_specs(["slem", "tli", "hf-uag"], [0.0, 1.0], [2, 4], hf_default_lookahead=20)
    labels = [(s.label, s.temperature) for s in specs]
    assert labels.count(("ar", 0.0)) == 1 and labels.count(("ar", 1.0)) == 1  # AR always runs
    assert ("hf-uag (default, k=20)", 0.0) in labels and ("hf-uag k=4", 1.0) in labels
    assert RunSpec("slem", 0.0, 4).identity_required
    assert RunSpec("slem", 1.0, 4).identity_required  # position-keyed seeds: same tokens as AR
    assert not RunSpec("tli", 1.0, 4).identity_required
    assert not RunSpec("hf-uag", 0.0, 4, "matched").identity_required
    runs = [{"dataset": "d", "label": "tli k=4", "method": "tli", "temperature": 0.0,
             "identical_to_ar": False, "identity_required": True, "differing_prompts": ["p"]},
            {"dataset": "d", "label": "hf-uag k=4", "method": "hf-uag", "temperature": 0.0,
             "identical_to_ar": False, "identity_required": False, "differing_prompts": ["q"]},
            {"dataset": "d", "label": "tli k=4", "method": "tli", "temperature": 1.0,
             "identical_to_ar": False, "identity_required": False, "differing_prompts": ["r"]}]
    failures, baseline = check_identity(runs)
    assert [f["prompts"] for f in failures] == [["p"]]
    assert [b["prompts"] for b in baseline] == [["q"]]


# ---------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_loaders(assets, name):
    if name not in available_datasets():
        pytest.skip(f"{name} not in the shared assets")
    prompts = load_prompts(name, limit=3)
    assert len(prompts) == 3
    for p in prompts:
        assert isinstance(p.text, str) and p.text.strip() and p.id
    if name == "humaneval":
        assert "def " in prompts[0].text
    if name == "mbpp":
        assert prompts[0].text.startswith('"""') and "assert" in prompts[0].text
    if name in ("cnndm", "xsum"):
        assert prompts[0].text.startswith("Summarize: ") and prompts[0].text.endswith("Summary:")
    if name == "qmsum":
        assert len(prompts[0].text) > 10_000 and "Query:" in prompts[0].suffix


def test_truncate_to_fit_keeps_prefix_and_suffix():
    p = Prompt("qmsum", "x", "Transcript:\n", "word " * 1000, "\nQuery: q\nAnswer:")
    q = truncate_to_fit(p, lambda text: len(text) <= 300)
    assert q is not None and q.truncated and len(q.text) <= 300
    assert q.text.startswith("Transcript:\nword") and q.text.endswith("\nQuery: q\nAnswer:")
    assert truncate_to_fit(p, lambda text: len(text) < 5) is None
    assert truncate_to_fit(p, lambda text: True) is p


# ---------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny_results(loaded_model, families, tmp_path_factory):
    if "humaneval" not in available_datasets():
        pytest.skip("HumanEval not in the shared assets")
    target = loaded_model(families[0])
    drafter = loaded_model(families[1], seed=1)
    cfg = BenchConfig(datasets=["humaneval"], limit=2, methods=["ar", "slem", "tli", "hf-ar"],
                      temperatures=[0.0, 1.0], lookaheads=[2], max_new_tokens=8,
                      calibration_steps=3, command="hsd-serve bench (test)")
    results = run_inprocess(cfg, target=target, drafter=drafter, progress=False)
    out = tmp_path_factory.mktemp("bench-out")
    paths = write_outputs(results, out)
    return results, out, paths


def test_tiny_run_writes_results_json(tiny_results):
    results, out, _ = tiny_results
    data = json.loads((out / "results.json").read_text())
    assert data["command"] == "hsd-serve bench (test)" and data["machine"]["cores"]
    runs = data["runs"]
    assert {(r["method"], r["temperature"]) for r in runs} == {
        (m, t) for m in ("ar", "slem", "tli", "hf-ar") for t in (0.0, 1.0)}
    for r in runs:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, (r["label"], missing)
        assert r["prompts"] == 2 and r["tokens_per_s"] > 0
        assert 0 < r["speedup_vs_ar"] < 100
        assert r["tpot_ms"] is None or r["tpot_ms"] > 0
        assert r["ttft_ms"] > 0
        if r["method"] == "ar":
            assert r["speedup_vs_ar"] == 1.0 and r["ideal_speedup"] == 1.0
            assert r["identical_to_ar"] is True
        elif r["method"] == "hf-ar":  # transformers' plain generate(): same greedy tokens
            assert r["ideal_speedup"] is None and r["tokens_per_round"] == pytest.approx(1.0, abs=0.2)
            if r["temperature"] == 0:
                assert r["identical_to_ar"] is True
        else:
            assert r["lookahead"] == 2 and 0 <= r["acceptance_rate"] <= 1
            assert 1 <= r["tokens_per_round"] <= 3
            assert 0 < r["ideal_speedup"] <= 3 and r["cost_ratio_c"] > 0
            assert r["time_ms_per_token"]["verify"] > 0
        if (r["temperature"] == 0 or r["method"] == "slem") and r["method"] != "hf-ar":
            assert r["identical_to_ar"] is True, r["label"]
        if r["temperature"] > 0:
            assert r["sample_nll"] > 0
            by_prompt = r["sample_nll_by_prompt"]
            assert len(by_prompt) == 2 and min(by_prompt.values()) > 0
    assert data["failures"] == []
    assert data["calibration"]["target_step_ms"] > 0 and data["calibration"]["c"] > 0
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(runs)


def test_tiny_run_writes_report_and_plots(tiny_results):
    results, out, paths = tiny_results
    md = (out / "results.md").read_text()
    assert "| dataset | method | k |" in md and "## Temperature 0 (greedy)" in md
    assert "Where the time goes" in md and "S_ideal" in md
    if any(r["temperature"] > 0 for r in results["runs"]):
        assert "Δ per prompt ± SE" in md and " ± " in md.split("Δ per prompt ± SE |")[1]
    assert (out / "timeline.png").exists()  # in-process runs are traced
    for name in PLOTS:
        p = out / name
        assert p in paths and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown(results) == md


def test_hf_uag_greedy_matches_ar(loaded_model, families):
    """transformers' heterogeneous assisted generation on a tiny pair, against our AR."""
    from hsd_serve.bench.hf_uag import HFAssisted
    from hsd_serve.engine.local import Engine
    from hsd_serve.engine.types import GenerationRequest

    target = loaded_model(families[0])
    drafter = loaded_model(families[1], seed=1)
    prompt = "def fibonacci(n):\n    "
    ar = Engine(target).generate(GenerationRequest(prompt, max_new_tokens=8, method="ar"))
    hf = HFAssisted(target, drafter)
    head = drafter.model.get_output_embeddings().weight.data_ptr()
    res = hf.generate(target.tokenizer.encode_prompt(prompt), 8, num_assistant_tokens=3)
    assert res.token_ids == ar.token_ids
    assert res.settings["num_assistant_tokens"] == 3 and res.target_forwards >= 1
    assert res.wall_s > 0 and 0 < res.ttft_s <= res.wall_s
    default = hf.effective_settings(None, False)
    assert default["num_assistant_tokens"] >= 1
    # the baseline drives its own copy: our drafter is untouched
    assert drafter.model.get_output_embeddings().weight.data_ptr() == head


def test_cli_parses_bench_arguments():
    from hsd_serve.cli import build_parser

    args = build_parser().parse_args(["bench", "--dataset", "humaneval,mbpp", "--lookahead", "2,4,6",
                                      "--temperature", "0,1", "--methods", "ar,slem,hf-uag",
                                      "--limit", "3", "--out", "x"])
    assert args.dataset == ["humaneval", "mbpp"] and args.lookahead == [2, 4, 6]
    assert args.temperature == [0.0, 1.0] and args.methods == ["ar", "slem", "hf-uag"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--dataset", "nope"])
    from hsd_serve.bench.cli import config_from_args

    cfg = config_from_args(args)
    cfg.validate()
    assert cfg.overlap == (False,)  # vLLM executor: vllm.overlap's default
    both = config_from_args(build_parser().parse_args(
        ["bench", "--executor", "vllm", "--overlap", "on,off"]))
    assert both.overlap == (True, False)
    assert RunSpec("slem", 0.0, 2, "no overlap").label == "slem k=2 (no overlap)"
    three = config_from_args(build_parser().parse_args(
        ["bench", "--executor", "vllm", "--overlap", "on,wait,off"]))
    three.validate()
    assert three.overlap == (True, "wait", False)
    assert [overlap_variant(v) for v in three.overlap] == ["overlap", "overlap, wait",
                                                           "no overlap"]
    assert RunSpec("slem", 0.0, 2, "overlap, wait").label == "slem k=2 (overlap, wait)"
    four = config_from_args(build_parser().parse_args(
        ["bench", "--endpoint", "grpc://h:1", "--application", "a,b,c,d",
         "--overlap", "on,branches,wait,off"]))
    four.validate()
    assert [overlap_variant(v) for v in four.overlap] == ["overlap", "overlap, branches",
                                                          "overlap, wait", "no overlap"]
    with pytest.raises(ValueError, match="branches"):  # the vLLM executor has no branches
        config_from_args(build_parser().parse_args(
            ["bench", "--executor", "vllm", "--overlap", "on,branches"])).validate()
    with pytest.raises(SystemExit):
        config_from_args(build_parser().parse_args(["bench", "--overlap", "maybe"]))
    with pytest.raises(ValueError, match="at most once"):
        config_from_args(build_parser().parse_args(
            ["bench", "--executor", "vllm", "--overlap", "on,true"])).validate()
    from hsd_serve.zoo import bundled_model_dir

    named = config_from_args(build_parser().parse_args(
        ["bench", "--target", "bundled:target", "--drafter", "bundled:drafter"]))
    assert (named.target, named.drafter) == (str(bundled_model_dir("target")),
                                             str(bundled_model_dir("drafter")))
    with pytest.raises(ValueError, match="unknown bundled model"):
        config_from_args(build_parser().parse_args(["bench", "--drafter", "bundled:nope"]))
    cfg.concurrency = [2]
    with pytest.raises(ValueError):
        cfg.validate()  # concurrency needs an endpoint


def test_drafter_backends_side_by_side():
    """--drafter-executor hf,vllm: each drafting spec once per backend, the baselines once;
    refused against an endpoint, with both overlap settings, or for an unknown backend."""
    from hsd_serve.bench.cli import config_from_args
    from hsd_serve.bench.runner import per_drafter_backend
    from hsd_serve.cli import build_parser

    specs = build_specs(["slem", "tli"], [0.0], [2])
    both = per_drafter_backend(specs, ("hf", "vllm"))
    assert [s.label for s in both] == ["ar", "slem k=2 (drafter hf)", "slem k=2 (drafter vllm)",
                                       "tli k=2 (drafter hf)", "tli k=2 (drafter vllm)"]
    assert per_drafter_backend(specs, ("hf",)) == specs
    assert [s.variant for s in per_drafter_backend(specs, ("vllm",))][1:] == ["drafter vllm"] * 2
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["bench", "--drafter-executor", "hf,vllm"]))
    assert cfg.drafter_executors == ("hf", "vllm")
    cfg.validate()
    config_from_args(parse(["bench", "--executor", "vllm", "--drafter-executor", "vllm"])).validate()
    for bad in (["--endpoint", "grpc://127.0.0.1:1"], ["--executor", "vllm", "--overlap", "on,off"]):
        with pytest.raises(ValueError, match="drafter-executor"):
            config_from_args(parse(["bench", "--drafter-executor", "hf,vllm", *bad])).validate()
    with pytest.raises(ValueError, match="hf, hf-transformers, vllm"):
        config_from_args(parse(["bench", "--drafter-executor", "tgi"])).validate()
    cfg = config_from_args(parse(["bench", "--drafter-executor", "hf,hf-transformers"]))
    cfg.validate()
    assert [s.label for s in per_drafter_backend(specs, cfg.drafter_executors)][1:3] == [
        "slem k=2 (drafter hf)", "slem k=2 (drafter hf-transformers)"]


# ---------------------------------------------------------------------------- endpoint mode


@pytest.fixture(scope="module")
def live_endpoints(loaded_model, families):
    """The engine on a tiny pair behind a real gRPC server and a real HTTP server (uvicorn), each
    on its own event loop thread — what ``--endpoint`` talks to, without Ray."""
    import asyncio
    import socket
    import threading

    import grpc
    import uvicorn

    from hsd_serve.engine.local import Engine
    from hsd_serve.pb import hsd_pb2_grpc
    from hsd_serve.serve.config import service_limits
    from hsd_serve.serve.grpc_api import generate_stream, generate_unary
    from hsd_serve.serve.openai_api import CoordinatorBackend, build_openai_app

    engine = Engine(loaded_model(families[0]), loaded_model(families[1], seed=1))

    class Dep:
        limits = service_limits()

        def stream(self, req):
            return engine.coordinator.stream(req)

    class Servicer(hsd_pb2_grpc.GenerationServicer):
        async def Generate(self, request, ctx):
            return await generate_unary(Dep(), request, ctx)

        async def GenerateStream(self, request, ctx):
            async for chunk in generate_stream(Dep(), request, ctx):
                yield chunk

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    grpc_port, http_port = free_port(), free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def serve_grpc():
        server = grpc.aio.server()
        hsd_pb2_grpc.add_GenerationServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await server.start()
        state["grpc"] = server
        ready.set()
        await server.wait_for_termination()

    threading.Thread(target=lambda: loop.run_until_complete(serve_grpc()), daemon=True).start()
    app = build_openai_app(CoordinatorBackend(engine.coordinator, engine.target.tokenizer, "tiny"))
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="error"))
    threading.Thread(target=http.run, daemon=True).start()
    assert ready.wait(30)
    import time

    for _ in range(300):
        if http.started:
            break
        time.sleep(0.1)
    yield {"grpc": f"grpc://127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}"}
    http.should_exit = True
    fut = asyncio.run_coroutine_threadsafe(state["grpc"].stop(0), loop)
    try:  # best effort: the server threads are daemons
        fut.result(5)
    except Exception:  # noqa: BLE001
        pass


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_endpoint_run(live_endpoints, kind, tmp_path):
    from hsd_serve.bench.remote import run_endpoint

    if "humaneval" not in available_datasets():
        pytest.skip("HumanEval not in the shared assets")
    cfg = BenchConfig(datasets=["humaneval"], limit=2, methods=["ar", "slem", "hf-uag"],
                      lookaheads=[2], max_new_tokens=6, endpoint=live_endpoints[kind],
                      concurrency=[1, 2], target="none-here", calibration_steps=2)
    results = run_endpoint(cfg, progress=False, calibrate_locally=False)
    runs = results["runs"]
    assert {(r["method"], r["concurrency"]) for r in runs} == {
        ("ar", 1), ("slem", 1), ("ar", 2), ("slem", 2)}
    for r in runs:
        assert all(k in r for k in REQUIRED)
        assert r["endpoint"] is True and r["aggregate_tokens_per_s"] > 0
        assert r["identical_to_ar"] is True and r["ttft_ms"] > 0
        assert r["time_ms_per_token"] is not None
    assert results["failures"] == []
    assert any(s.get("method") == "hf-uag" for s in results["skipped"])
    write_outputs(results, tmp_path)
    assert "conc." in (tmp_path / "results.md").read_text()


def test_load_phases_repeat_in_rotated_order_and_pair_ratios_by_pass(live_endpoints, tmp_path):
    """--repeats N: N passes over the methods at each concurrency, each pass in a rotated order;
    aggregate tok/s is the median of a run's passes, aggregate ×AR the median of the ratios of
    pass i to AR's pass i, and each pass's samples pair with AR's of the same pass."""
    import statistics

    from hsd_serve.bench.remote import run_endpoint

    if "humaneval" not in available_datasets():
        pytest.skip("HumanEval not in the shared assets")
    cfg = BenchConfig(datasets=["humaneval"], limit=2, methods=["ar", "slem"], lookaheads=[2],
                      max_new_tokens=6, endpoint=live_endpoints["grpc"], concurrency=[2],
                      repeats=3, target="none-here", calibration_steps=2, warmup=False)
    results = run_endpoint(cfg, progress=False, calibrate_locally=False)
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"ar", "slem"}
    for r in runs.values():
        passes = r["aggregate_tokens_per_s_passes"]
        assert len(passes) == 3 and all(p > 0 for p in passes)
        assert r["aggregate_tokens_per_s"] == statistics.median(passes)
        assert r["prompts"] == 2 * 3 and r["identical_to_ar"] is True
    want = [s / a for s, a in zip(runs["slem"]["aggregate_tokens_per_s_passes"],
                                  runs["ar"]["aggregate_tokens_per_s_passes"])]
    assert runs["slem"]["aggregate_vs_ar_passes"] == want
    assert runs["slem"]["aggregate_vs_ar"] == statistics.median(want)
    assert runs["ar"]["aggregate_vs_ar"] == 1.0
    order: dict[str, list[str]] = {}  # pass -> methods in the order their phases ran
    for s in results["samples"]:
        tag = s.prompt_id.partition("@")[2] or "pass1"
        methods = order.setdefault(tag, [])
        if s.spec.method not in methods:
            methods.append(s.spec.method)
    assert order == {"pass1": ["ar", "slem"], "pass2": ["slem", "ar"], "pass3": ["ar", "slem"]}
    write_outputs(results, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "aggregate ×AR" in md
    lo, hi = min(want), max(want)
    assert f"({lo:.2f}–{hi:.2f})" in md
    with pytest.raises(ValueError, match="--repeats"):
        BenchConfig(repeats=0).validate()


@pytest.mark.parametrize("endpoint,apps", [("http://127.0.0.1:1", "a,b"),
                                           ("grpc://127.0.0.1:1", "a"),
                                           ("grpc://127.0.0.1:1", "a,b,c")])
def test_overlap_both_ways_against_a_service_needs_one_grpc_application_each(endpoint, apps):
    from hsd_serve.bench.remote import run_endpoint

    cfg = BenchConfig(endpoint=endpoint, executor="vllm", overlap=(True, False),
                      application=apps, methods=["slem"])
    with pytest.raises(ValueError, match="--application"):
        run_endpoint(cfg, progress=False, calibrate_locally=False)


def test_ramp_against_a_live_endpoint_writes_the_timeline_and_plot(live_endpoints, tmp_path):
    """``--ramp``: streams follow the schedule, every interval is sampled, greedy outputs are
    checked against AR through the same endpoint, and ramp.png is written."""
    from hsd_serve.bench.cli import configure_parser
    from hsd_serve.bench.ramp import ramp_spec, run_ramp, write_ramp

    if "humaneval" not in available_datasets():
        pytest.skip("HumanEval not in the shared assets")
    import argparse

    args = configure_parser(argparse.ArgumentParser()).parse_args(
        ["--ramp", "1,3,0", "--step-s", "2", "--endpoint", "x:1"])
    assert args.ramp == [1, 3, 0] and args.step_s == 2.0
    cfg = BenchConfig(datasets=["humaneval"], limit=2, methods=["ar", "slem"], lookaheads=[2],
                      max_new_tokens=6, endpoint=live_endpoints["grpc"])
    assert ramp_spec(cfg).method == "slem"
    counts = iter(range(1000))
    results = run_ramp(cfg, [1, 3, 0], 1.5, interval_s=0.5, progress=False,
                       replicas=lambda: {"Drafter": next(counts) % 3, "Target": 1})
    r, tl = results["ramp"], results["timeline"]
    assert r["failures"] == [] and r["requests"] > 0 and r["identical_to_ar"] is True
    assert r["tokens"] == sum(x["tokens"] for x in tl) > 0
    assert max(x["streams"] for x in tl) == 3 and tl[-1]["streams"] == 0
    assert all(x["replicas"]["Target"] == 1 for x in tl) and len(tl) >= 8
    paths = write_ramp(results, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["ramp"]["schedule"] == [1, 3, 0]
    assert (tmp_path / "ramp.png").stat().st_size > 10_000 and len(paths) == 2
    with pytest.raises(ValueError, match="--endpoint"):
        run_ramp(BenchConfig(), [1], 1.0, progress=False, replicas=None)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[2]
                                                          / "bench").glob("*.yaml")))
def test_bench_service_configs_are_valid(name):
    """Every service config the benchmarks deploy passes Ray's schema and our strict AppConfig
    (what ``hsd-serve serve`` checks before deploying)."""
    from hsd_serve.serve.launch import hsd_apps, read_config

    cfg = read_config(str(Path(__file__).resolve().parents[2] / "bench" / name))
    assert hsd_apps(cfg)


def test_timeline_plot_shows_one_prompt_every_configuration_ran_cleanly(tmp_path):
    """timeline.png: one panel per drafting configuration, on the first prompt that each ran
    without a fallback round; none when no request was traced."""
    from hsd_serve.bench.report import _plot_timeline, _plt
    from hsd_serve.bench.runner import Sample

    def sample(label_variant, prompt, fallback, timeline):
        spec = RunSpec("slem", 0.0, 2, variant=label_variant)
        return Sample(dataset="d", prompt_id=prompt, spec=spec, prompt_tokens=3, token_ids=[1],
                      text="x", finish_reason="length", wall_s=1.0, ttft_s=0.1,
                      fallback_rounds=fallback, timeline=timeline)

    spans = [["draft", 0, 0.0, 0.01], ["verify", 0, 0.01, 0.03], ["draft ahead", 0, 0.012, 0.02],
             ["verify", 1, 0.03, 0.05]]
    samples = [sample("overlap", "p0", 1, spans), sample("no overlap", "p0", 0, spans),
               sample("overlap", "p1", 0, spans), sample("no overlap", "p1", 0, spans),
               sample("overlap", "p2", 0, spans)]
    plt = _plt()
    fig = _plot_timeline(plt, samples)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2 and all("p1" in t for t in titles), titles
    plt.close(fig)
    assert _plot_timeline(plt, [sample("overlap", "p0", 0, None)]) is None


def test_proposer_counters_become_a_table_per_engine():
    """The vLLM proposer's counters (DraftBroker.stats) are reported per draft call and step;
    an engine that drafted nothing is left out."""
    from hsd_serve.bench.report import proposer_table

    lines = proposer_table({
        "drafter hf": {"draft_calls": 10, "steps": 20, "wait_s": 0.1, "rpc_s": 0.05,
                       "drafter_model_s": 0.03, "drafter_forwards": 27, "bridge_s": 0.002,
                       "ready": 1, "waited": 9},
        "True": {"draft_calls": 4, "steps": 10, "ready": 3, "plain": 7},
        "idle": {"draft_calls": 0}})
    row = next(line for line in lines if line.startswith("| drafter hf"))
    assert row == "| drafter hf | 10 | 20 | 5.00 | 5.00 | 3.00 | 2.70 | 0.20 | 1 | 9 | 0 |"
    row = next(line for line in lines if line.startswith("| overlap"))  # --overlap on's engine
    assert row.endswith("| 3 | 0 | 7 |")
    assert not any(line.startswith("| idle") for line in lines)
    assert proposer_table({}) == []


def test_vllm_serve_arguments_follow_the_engine_options():
    """``vllm-serve`` runs vLLM's server with vllm-ar's engine settings: dtype, eager, limits
    and every ``engine_args`` entry as its command-line flag."""
    from hsd_serve.bench.vllm_clients import serve_args
    from hsd_serve.serve.config import VllmOptions

    o = VllmOptions(enforce_eager=True, max_model_len=512, dtype="bfloat16", max_num_seqs=8,
                    engine_args={"enable_prefix_caching": False, "block_size": 32,
                                 "compilation_config": {"level": 0}, "async_scheduling": True})
    args = serve_args("/m/target", o, 1234)

    def value(flag):
        return args[args.index(flag) + 1]
    assert value("--model") == "/m/target" and value("--port") == "1234"
    assert value("--dtype") == "bfloat16" and value("--max-model-len") == "512"
    assert value("--max-num-seqs") == "8" and value("--block-size") == "32"
    assert "--enforce-eager" in args and "--no-enable-prefix-caching" in args
    assert "--async-scheduling" in args
    assert json.loads(value("--compilation-config")) == {"level": 0}
    assert "--enforce-eager" not in serve_args("/m", VllmOptions(), 1)
    from hsd_serve.bench.runner import PLAIN, VLLM_BASELINES, build_specs

    assert "vllm-serve" in PLAIN and "vllm-serve" in VLLM_BASELINES
    specs = build_specs(["vllm-serve", "slem"], [0.0], [2], reference="vllm-ar")
    assert [s.label for s in specs] == ["vllm-ar", "ar", "vllm-serve", "slem k=2"]
    assert not specs[2].identity_required
