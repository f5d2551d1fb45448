"""The service with its target on vLLM (``target_executor: vllm``), bundled pair, local Ray:
greedy output over gRPC streaming and HTTP is vLLM-alone's (= our HF executor's AR, float32) for
SLEM and TLI; a drafter replica killed mid-stream costs no token; SLRS is refused naming the
method; the replica's vLLM metrics are exported."""

from __future__ import annotations

import asyncio
import os

import grpc
import httpx
import pytest

from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.models.hf import LoadedModel, ModelSpec
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.convert import method_to_proto
from tests.e2e.faultkit import deploy, kill_replica, live_replica_names, undeploy, wait_for
from tests.e2e.test_faults import _grpc_streams

if os.environ.get("HSD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

APP = "hsd-vllm"
META = (("application", APP),)
PROMPTS = ['def fib(n):\n    """Return the n-th Fibonacci number."""\n',
           "import os\n\n\ndef list_files(path):\n",
           "class Stack:\n    def __init__(self):\n"]
LONG = 160


@pytest.fixture(scope="module")
def vllm_app(ray_serve):
    from hsd_serve.zoo import bundled_model_dir

    target, drafter = bundled_model_dir("target"), bundled_model_dir("drafter")
    args = {"target_executor": "vllm",
            # draft_max_batch: concurrent streams draft too (the drafter is killed mid-draft)
            "vllm": {"enforce_eager": True, "cpu_kvcache_gib": 1, "num_speculative_tokens": 4,
                     "max_num_seqs": 16, "draft_max_batch": 16},
            "drafter": {"path": "bundled:drafter", "head_ids": 16384},
            "max_tokens_limit": 256, "drafter_retry_rounds": 4,
            "drafter_deployment": {"num_cpus": 0.1, "torch_threads": 1},
            "target_deployment": {"num_cpus": 0.1, "torch_threads": 1},
            "coordinator_deployment": {"num_cpus": 0.1}}
    deploy(APP, args, "/vllm")
    engine = Engine(LoadedModel(ModelSpec(str(target), dtype="float32")),
                    LoadedModel(ModelSpec(str(drafter))))
    yield ray_serve, engine
    undeploy(APP)


def _greedy(prompt, n, method):
    return hsd_pb2.GenerateRequest(prompt=prompt, max_tokens=n, method=method_to_proto(method),
                                   lookahead=3, sampling=hsd_pb2.SamplingParams(temperature=0))


def greedy_is_ar(ports, app: str, http, engine, prompts, methods, n: int = 32) -> list:
    """Each prompt × method, greedy, over gRPC streaming (``app``'s metadata) and ``http``:
    asserts both give ``engine``'s AR; returns the gRPC streams' final stats."""
    out = []
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = hsd_pb2_grpc.GenerationStub(channel)
        for prompt in prompts:
            ar = engine.generate(GenerationRequest(prompt, max_new_tokens=n, method="ar"))
            for method in methods:
                chunks = list(stub.GenerateStream(_greedy(prompt, n, method),
                                                  metadata=(("application", app),), timeout=300))
                assert [t for c in chunks for t in c.token_ids] == ar.token_ids, method
                assert chunks[-1].stats.method == method
                out.append(chunks[-1].stats)
                r = http.post("/v1/completions", json={
                    "prompt": prompt, "max_tokens": n, "temperature": 0, "method": method})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == ar.text, method
    return out


def test_greedy_over_grpc_and_http_is_the_target_alone(vllm_app):
    ports, engine = vllm_app
    http = httpx.Client(base_url=f"http://127.0.0.1:{ports['http']}/vllm", timeout=300)
    try:
        stats = greedy_is_ar(ports, APP, http, engine, PROMPTS[:2], ("ar", "slem", "tli"))
        assert sum(s.drafted for s in stats) > 0, "no drafts reached vLLM"
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "method": "slrs"})
        assert r.status_code == 400 and "method" in r.text, r.text
        metrics = http.get("/metrics").text
        assert "ray_hsd_requests_total" in metrics
    finally:
        http.close()


def kill_drafter_mid_stream(ports, app: str, engine, prompts, n: int) -> set:
    """Greedy SLEM streams of ``prompts``; the one drafter replica is killed once every stream
    has its first chunk: asserts each output is ``engine``'s AR.  Returns the replicas before."""
    before = live_replica_names(app, "Drafter")
    assert len(before) == 1, before
    out, _, _ = asyncio.run(_grpc_streams(
        ports["grpc"], app, [_greedy(p, n, "slem") for p in prompts],
        on_first_chunks=lambda: kill_replica(next(iter(before)))))
    for prompt, (ids, last, _) in zip(prompts, out):
        want = engine.generate(GenerationRequest(prompt, max_new_tokens=n, method="ar"))
        assert ids == want.token_ids, prompt
        assert last.finish_reason in (hsd_pb2.FINISH_REASON_STOP, hsd_pb2.FINISH_REASON_LENGTH)
    return before


def test_drafter_killed_mid_stream_costs_no_token(vllm_app):
    ports, engine = vllm_app
    before = kill_drafter_mid_stream(ports, APP, engine, PROMPTS, LONG)
    wait_for(lambda: live_replica_names(APP, "Drafter") - before, 120,
             what="a replacement drafter replica")
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = hsd_pb2_grpc.GenerationStub(channel)

        def drafting_again():
            chunks = list(stub.GenerateStream(_greedy(PROMPTS[0], 24, "slem"), metadata=META,
                                              timeout=120))
            return chunks[-1].stats.drafted > 0

        wait_for(drafting_again, 120, interval_s=1.0, what="drafts after the replacement")
