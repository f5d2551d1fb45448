"""The distributed service end to end on a local Ray instance: same tokens as in-process."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.models.hf import LoadedModel, ModelSpec
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.convert import finish_reason_from_proto, method_to_proto

PROMPT = "def fib(n):\n    "
META = (("application", "hsd"),)


@pytest.fixture(scope="module")
def local_engine(service):
    return Engine(LoadedModel(ModelSpec(str(service["target"]))),
                  LoadedModel(ModelSpec(str(service["drafter"]))))


@pytest.fixture(scope="module")
def stub(service):
    channel = grpc.insecure_channel(f"127.0.0.1:{service['grpc']}")
    yield hsd_pb2_grpc.GenerationStub(channel)
    channel.close()


@pytest.mark.parametrize("method,temperature,seed", [("ar", 0, 0), ("slem", 0, 0),
                                                     ("tli", 0, 0), ("tli", 0.9, 7),
                                                     ("slem", 0.9, 7)])
def test_grpc_matches_in_process(stub, local_engine, method, temperature, seed):
    want = local_engine.generate(GenerationRequest(
        PROMPT, max_new_tokens=12, method=method,
        params=SamplingParams(temperature=temperature, seed=seed)))
    req = hsd_pb2.GenerateRequest(prompt=PROMPT, max_tokens=12, method=method_to_proto(method),
                                  sampling=hsd_pb2.SamplingParams(temperature=temperature,
                                                                  seed=seed))
    got = stub.Generate(req, metadata=META, timeout=120)
    assert list(got.token_ids) == want.token_ids
    assert got.text == want.text
    assert got.stats.method == method
    chunks = list(stub.GenerateStream(req, metadata=META, timeout=120))
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert "".join(c.text for c in chunks) == want.text
    assert finish_reason_from_proto(chunks[-1].finish_reason) == want.finish_reason
    assert chunks[-1].stats.completion_tokens == len(want.token_ids)


def test_grpc_traced_request_returns_its_timeline(stub):
    """``trace``: the coordinator's per-round spans come back in the last chunk's stats."""
    req = hsd_pb2.GenerateRequest(prompt=PROMPT, max_tokens=12, method=method_to_proto("slem"),
                                  lookahead=3, trace=True)
    st = list(stub.GenerateStream(req, metadata=META, timeout=120))[-1].stats
    verify = [sp for sp in st.timeline if sp.lane == "verify"]
    assert sorted(sp.round for sp in verify) == list(range(st.rounds))
    assert {sp.lane for sp in st.timeline} <= {"draft", "verify"}  # this service: no overlap
    assert any(sp.lane == "draft" for sp in st.timeline)
    assert all(0 <= sp.start_s < sp.end_s <= st.wall_s for sp in st.timeline)
    req.trace = False
    assert len(stub.Generate(req, metadata=META, timeout=120).stats.timeline) == 0


def test_grpc_bad_input_is_invalid_argument(stub):
    bad = [hsd_pb2.GenerateRequest(prompt="x", method=99),  # a value this release does not know
           hsd_pb2.GenerateRequest(prompt="x", sampling=hsd_pb2.SamplingParams(temperature=-1)),
           hsd_pb2.GenerateRequest(prompt="x", max_tokens=10_000_000),
           hsd_pb2.GenerateRequest(prompt="")]
    for req in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, metadata=META, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(req, metadata=META, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = stub.Generate(hsd_pb2.GenerateRequest(prompt="x", max_tokens=2), metadata=META,
                       timeout=60)
    assert len(ok.token_ids) >= 1


def test_grpc_refuses_a_method_name_from_a_client_of_the_old_schema(service):
    """``method`` was ``string method = 4``: an old client's name arrives as an unknown field,
    refused naming ``method`` (not silently run with the default method); the proxy passes the
    unknown field through to the coordinator."""
    old = hsd_pb2.GenerateRequest(prompt="x", max_tokens=2).SerializeToString() + b"\x22\x03tli"
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as ch:
        raw = ch.unary_unary("/hsd.v1.Generation/Generate", request_serializer=None,
                             response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            raw(old, metadata=META, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("method:"), err.value.details()


def test_grpc_health_service(service):
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                    metadata=META, timeout=30)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_http_openai_completions_and_stream(service, local_engine):
    want = local_engine.generate(GenerationRequest(PROMPT, max_new_tokens=10, method="slem"))
    base = f"http://127.0.0.1:{service['http']}"
    with httpx.Client(base_url=base, timeout=120) as client:
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10,
                                                 "temperature": 0, "method": "slem"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == want.text
        assert body["usage"]["completion_tokens"] == len(want.token_ids)
        assert body["hsd"]["method"] == "slem"
        text = []
        with client.stream("POST", "/v1/completions",
                           json={"prompt": PROMPT, "max_tokens": 10, "stream": True, "temperature": 0,
                                 "method": "slem"}) as s:
            assert s.status_code == 200
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for ln in lines[:-1]:
            text.append(json.loads(ln[6:])["choices"][0].get("text", ""))
        assert "".join(text) == want.text
        r = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": -2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-pair"
        assert client.get("/health").status_code == 200


def test_leases_free_replica_sessions(service, stub):
    from ray import serve

    for _ in range(3):
        stub.Generate(hsd_pb2.GenerateRequest(prompt="abc", max_tokens=4,
                                              method=hsd_pb2.METHOD_SLEM),
                      metadata=META, timeout=60)
    import time

    for name in ("Target", "Drafter"):
        handle = serve.get_deployment_handle(name, app_name="hsd")
        deadline = time.time() + 20
        while True:
            stats = handle.stats.remote().result()
            if stats["sessions"] == 0 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert stats["sessions"] == 0, (name, stats)


def test_grpc_unseeded_sampling_draws_a_seed_and_echoes_it(stub):
    """A sampled gRPC request without a seed gets a fresh random one (as over HTTP), reported in
    ``stats.seed``; resending that seed reproduces the output exactly."""
    def request(**seed):
        return hsd_pb2.GenerateRequest(prompt=PROMPT, max_tokens=12, method=hsd_pb2.METHOD_TLI,
                                       sampling=hsd_pb2.SamplingParams(temperature=1.0, **seed))

    a = stub.Generate(request(), metadata=META, timeout=120)
    b = stub.Generate(request(), metadata=META, timeout=120)
    assert a.stats.seed != b.stats.seed
    chunks = list(stub.GenerateStream(request(), metadata=META, timeout=120))
    assert not any(c.HasField("stats") for c in chunks[:-1])
    streamed_seed = chunks[-1].stats.seed
    assert streamed_seed not in (a.stats.seed, b.stats.seed)
    streamed = [t for c in chunks for t in c.token_ids]
    assert len({tuple(a.token_ids), tuple(b.token_ids), tuple(streamed)}) > 1  # not one text
    for seed, ids, text in ((a.stats.seed, list(a.token_ids), a.text),
                            (streamed_seed, streamed, "".join(c.text for c in chunks))):
        again = stub.Generate(request(seed=seed), metadata=META, timeout=120)
        assert again.stats.seed == seed
        assert (list(again.token_ids), again.text) == (ids, text)
    greedy = stub.Generate(hsd_pb2.GenerateRequest(prompt=PROMPT, max_tokens=4,
                                                   method=hsd_pb2.METHOD_SLEM),
                           metadata=META, timeout=120)
    assert greedy.stats.seed == 0
