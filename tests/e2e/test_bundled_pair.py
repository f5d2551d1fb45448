"""The service on the bundled pair (Mistral-tokenizer target, GPT-2-tokenizer drafter): greedy
output over HTTP, gRPC unary and gRPC streaming is token-identical to AR for SLEM and TLI, and
sampled output equals the in-process engine's for the same seed."""

from __future__ import annotations

import grpc
import httpx
import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.models.hf import LoadedModel, ModelSpec
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.convert import method_to_proto

APP = "hsd-bundled"
META = (("application", APP),)
PROMPTS = ['def fib(n):\n    """Return the n-th Fibonacci number."""\n',
           "import os\n\n\ndef list_files(path):\n"]


@pytest.fixture(scope="module")
def bundled(ray_serve):
    from ray import serve

    from hsd_serve.serve.app import build_app
    from hsd_serve.zoo import bundled_model_dir

    try:
        target, drafter = bundled_model_dir("target"), bundled_model_dir("drafter")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    args = {"drafter_deployment": {"num_cpus": 0.1, "torch_threads": 1},
            "target_deployment": {"num_cpus": 0.1, "torch_threads": 1},
            "coordinator_deployment": {"num_cpus": 0.1}}
    serve.run(build_app(args), name=APP, route_prefix="/bundled")
    engine = Engine(LoadedModel(ModelSpec(str(target))), LoadedModel(ModelSpec(str(drafter))))
    yield ray_serve, engine
    serve.delete(APP)


def test_greedy_identical_to_ar_over_http_and_grpc(bundled):
    ports, engine = bundled
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    stub = hsd_pb2_grpc.GenerationStub(channel)
    http = httpx.Client(base_url=f"http://127.0.0.1:{ports['http']}/bundled", timeout=300)
    try:
        for prompt in PROMPTS:
            ar = engine.generate(GenerationRequest(prompt, max_new_tokens=24, method="ar"))
            for method in ("slem", "tli"):
                req = hsd_pb2.GenerateRequest(prompt=prompt, max_tokens=24,
                                              method=method_to_proto(method))
                unary = stub.Generate(req, metadata=META, timeout=300)
                assert list(unary.token_ids) == ar.token_ids, method
                chunks = list(stub.GenerateStream(req, metadata=META, timeout=300))
                assert [t for c in chunks for t in c.token_ids] == ar.token_ids, method
                r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24,
                                                       "temperature": 0, "method": method})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == ar.text, method
                assert r.json()["usage"]["completion_tokens"] == len(ar.token_ids)
    finally:
        channel.close()
        http.close()


def test_sampled_output_equals_in_process_for_the_same_seed(bundled):
    ports, engine = bundled
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = hsd_pb2_grpc.GenerationStub(channel)
        for method, seed in (("tli", 1), ("slem", 2), ("ar", 3)):
            want = engine.generate(GenerationRequest(
                PROMPTS[0], max_new_tokens=16, method=method,
                params=SamplingParams(temperature=0.8, seed=seed)))
            got = stub.Generate(hsd_pb2.GenerateRequest(
                prompt=PROMPTS[0], max_tokens=16, method=method_to_proto(method),
                sampling=hsd_pb2.SamplingParams(temperature=0.8, seed=seed)),
                metadata=META, timeout=300)
            assert list(got.token_ids) == want.token_ids, method
