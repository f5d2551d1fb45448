"""The service with its drafter on vLLM (``drafter_executor: vllm``), bundled pair, HF target,
local Ray: greedy SLEM/TLI over gRPC streaming and HTTP give AR's tokens with drafts accepted;
sampled TLI is refused naming the method while sampled ``auto`` runs SLEM; a drafter replica
killed mid-stream costs no token."""

from __future__ import annotations

import os

import grpc
import httpx
import pytest

from hsd_serve.engine.local import Engine
from hsd_serve.models.hf import LoadedModel, ModelSpec
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.convert import method_to_proto
from tests.e2e.faultkit import deploy, undeploy
from tests.e2e.test_vllm_service import PROMPTS, greedy_is_ar, kill_drafter_mid_stream

if os.environ.get("HSD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

APP = "hsd-vllm-drafter"
META = (("application", APP),)


@pytest.fixture(scope="module")
def app(ray_serve):
    from hsd_serve.zoo import bundled_model_dir

    args = {"drafter_executor": "vllm",
            "drafter_vllm": {"enforce_eager": True, "cpu_kvcache_gib": 1, "max_num_seqs": 16},
            "max_tokens_limit": 256, "drafter_retry_rounds": 4,
            "drafter_deployment": {"num_cpus": 0.1, "torch_threads": 1},
            "target_deployment": {"num_cpus": 0.1, "torch_threads": 1},
            "coordinator_deployment": {"num_cpus": 0.1}}
    deploy(APP, args, "/vdraft")
    engine = Engine(LoadedModel(ModelSpec(str(bundled_model_dir("target")))))
    yield ray_serve, engine
    undeploy(APP)


def _req(prompt, n, method, temperature=0.0):
    return hsd_pb2.GenerateRequest(prompt=prompt, max_tokens=n, method=method_to_proto(method),
                                   lookahead=3,
                                   sampling=hsd_pb2.SamplingParams(temperature=temperature))


def test_greedy_is_ar_and_what_it_cannot_draft_is_refused(app):
    ports, engine = app
    http = httpx.Client(base_url=f"http://127.0.0.1:{ports['http']}/vdraft", timeout=300)
    try:
        stats = greedy_is_ar(ports, APP, http, engine, PROMPTS[:2], ("slem", "tli"))
        assert sum(s.accepted for s in stats) > 0, "no draft was accepted"
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            stub = hsd_pb2_grpc.GenerationStub(channel)
            chunks = list(stub.GenerateStream(_req(PROMPTS[0], 8, "auto", 1.0), metadata=META,
                                              timeout=300))
            assert chunks[-1].stats.method == "slem"
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GenerateStream(_req(PROMPTS[0], 8, "tli", 1.0), metadata=META,
                                         timeout=300))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "drafter_executor: vllm" in err.value.details()
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                               "temperature": 1.0, "method": "tli"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "method", r.text
    finally:
        http.close()


def test_drafter_killed_mid_stream_costs_no_token(app):
    ports, engine = app
    kill_drafter_mid_stream(ports, APP, engine, PROMPTS, 96)
