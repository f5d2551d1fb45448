"""Keys on every door, through the real service on the local Ray instance: an application whose
coordinator reads its API keys from a file refuses gRPC calls (``UNAUTHENTICATED``) and HTTP
calls (401) without a valid key, answers valid ones exactly as the open application does (the
official OpenAI client included), keeps ``/health`` and the gRPC health check open; its replicas'
data planes refuse a caller without the cluster's token."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.pb import hsd_pb2_grpc as pb_grpc
from hsd_serve.serve.convert import method_to_proto
from tests.e2e.faultkit import deploy, tiny_args, undeploy
from tests.support.certs import make_tls_files

APP, ROUTE = "hsd-keys", "/keys"
KEY = "sk-e2e-0123456789abcdef0123456789"
OTHER = "sk-e2e-second-key-for-rotation-0000"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def keyed(service, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"# two keys: rotation\n{KEY}\n{OTHER}\n")
    certs = make_tls_files(tmp_path_factory.mktemp("certs"))
    tls_port = _free_port()
    security = {"api_keys_file": str(keys),
                "client_grpc_tls": {"cert_file": certs["cert"], "key_file": certs["key"],
                                    "host": "127.0.0.1", "port": tls_port}}
    deploy(APP, tiny_args(service, security=security), ROUTE, http_port=service["http"])
    yield dict(service, base=f"http://127.0.0.1:{service['http']}", tls_port=tls_port,
               certs=certs)
    undeploy(APP)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(prompt="def fib(n):", n=8):
    return hsd_pb2.GenerateRequest(prompt=prompt, max_tokens=n, method=method_to_proto("slem"),
                                   lookahead=3, sampling=hsd_pb2.SamplingParams(temperature=0))


def _auth(key):
    return (("authorization", f"Bearer {key}"),) if key is not None else ()


def test_grpc_needs_a_key_and_a_valid_one_changes_nothing(keyed):
    with grpc.insecure_channel(f"127.0.0.1:{keyed['grpc']}") as ch:
        stub = hsd_pb2_grpc.GenerationStub(ch)
        mine = (("application", APP),)
        for bad in (None, "wrong", f"{KEY}x", KEY[:-1], ""):
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(_request(), metadata=mine + _auth(bad), timeout=120)
            assert info.value.code() == UNAUTH, bad
            assert "API key" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                list(stub.GenerateStream(_request(), metadata=mine + _auth(bad), timeout=120))
            assert info.value.code() == UNAUTH, bad
        # a key sent as a bare value or under another scheme is no key
        for value in (KEY, f"Basic {KEY}", f"Token {KEY}"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(_request(), metadata=mine + (("authorization", value),),
                              timeout=120)
            assert info.value.code() == UNAUTH
        # the open application (same models) is the reference
        want = stub.Generate(_request(), metadata=(("application", keyed["app"]),), timeout=300)
        for key in (KEY, OTHER):
            got = stub.Generate(_request(), metadata=mine + _auth(key), timeout=300)
            assert list(got.token_ids) == list(want.token_ids) and got.text == want.text
            chunks = list(stub.GenerateStream(_request(), metadata=mine + _auth(key),
                                              timeout=300))
            assert [t for c in chunks for t in c.token_ids] == list(want.token_ids)
        # the health check stays open
        health = health_pb2_grpc.HealthStub(ch)
        reply = health.Check(health_pb2.HealthCheckRequest(), metadata=mine, timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_http_needs_a_key_health_stays_open_metrics_keyed(keyed):
    base, keyed_base = keyed["base"], keyed["base"] + ROUTE
    body = {"prompt": "def fib(n):", "max_tokens": 8, "temperature": 0, "method": "slem"}
    with httpx.Client(timeout=300) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = http.post(f"{keyed_base}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            assert http.get(f"{keyed_base}/metrics", headers=headers).status_code == 401
        assert http.get(f"{keyed_base}/health").status_code == 200
        want = http.post(f"{base}/v1/completions", json=body).json()["choices"][0]["text"]
        good = {"Authorization": f"Bearer {KEY}"}
        r = http.post(f"{keyed_base}/v1/completions", json=body, headers=good)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert http.get(f"{keyed_base}/metrics", headers=good).status_code == 200


def test_official_openai_client_with_a_key(keyed):
    openai = pytest.importorskip("openai")
    url = keyed["base"] + ROUTE + "/v1"
    good = openai.OpenAI(api_key=OTHER, base_url=url, max_retries=0, timeout=300)
    out = good.completions.create(model="tiny-pair", prompt="def fib(n):", max_tokens=6,
                                  temperature=0)
    assert out.usage.completion_tokens >= 1
    chunks = list(good.chat.completions.create(
        model="tiny-pair", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="sk-wrong", base_url=url, max_retries=0,
                      timeout=60).models.list()


def test_replica_data_planes_refuse_callers_without_the_clusters_token(keyed):
    """A stranger who can reach a replica's gRPC port gets ``UNAUTHENTICATED``; the token the
    replicas hold is the one kept once per Ray cluster (so a rebuilt app keeps it)."""
    from ray import serve

    from hsd_serve.serve.config import SecurityConfig
    from hsd_serve.serve.security import resolve_dataplane_token

    addrs = {d: serve.get_deployment_handle(d, app_name=APP).address_of.remote().result()
             for d in ("Target", "Drafter")}
    token = resolve_dataplane_token(SecurityConfig(), {})
    for kind, addr in addrs.items():
        with grpc.insecure_channel(addr) as ch:
            free = (pb_grpc.TargetStub(ch) if kind == "Target" else pb_grpc.DrafterStub(ch)).Free
            for md in ((), (("authorization", "Bearer guess"),)):
                with pytest.raises(grpc.RpcError) as info:
                    free(pb.FreeRequest(request_id="stranger"), metadata=md, timeout=60)
                assert info.value.code() == UNAUTH, (kind, md)
            reply = free(pb.FreeRequest(request_id="stranger"),
                         metadata=(("authorization", f"Bearer {token}"),), timeout=60)
            assert reply.freed is False


def test_grpc_over_tls_on_the_coordinators_own_port(keyed):
    """Ray Serve's gRPC proxy is plaintext; ``security.client_grpc_tls`` serves the same API
    over TLS from the coordinator: same keys, same output, plaintext refused."""
    with open(keyed["certs"]["ca"], "rb") as f:
        creds = grpc.ssl_channel_credentials(f.read())
    addr = f"127.0.0.1:{keyed['tls_port']}"
    with grpc.insecure_channel(f"127.0.0.1:{keyed['grpc']}") as ch:
        want = hsd_pb2_grpc.GenerationStub(ch).Generate(
            _request(), metadata=(("application", keyed["app"]),), timeout=300)
    with grpc.secure_channel(addr, creds) as ch:
        stub = hsd_pb2_grpc.GenerationStub(ch)
        got = stub.Generate(_request(), metadata=_auth(KEY), timeout=300)
        assert list(got.token_ids) == list(want.token_ids) and got.text == want.text
        chunks = list(stub.GenerateStream(_request(), metadata=_auth(OTHER), timeout=300))
        assert [t for c in chunks for t in c.token_ids] == list(want.token_ids)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(_request(), metadata=_auth("wrong"), timeout=60)
        assert info.value.code() == UNAUTH
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError) as info:
            hsd_pb2_grpc.GenerationStub(ch).Generate(_request(), metadata=_auth(KEY),
                                                     timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
