"""Clients' gRPC over TLS (``security.client_grpc_tls``): the coordinator's own TLS port serves
``hsd.v1.Generation`` with the same keys, limits and status codes as Ray Serve's proxy, over a
real in-process engine, with certificates made in the test; mTLS refuses callers without a
certificate from the CA; a coordinator at capacity answers RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.config import ClientGrpcTls, service_limits
from hsd_serve.serve.convert import method_to_proto
from hsd_serve.serve.grpc_api import start_client_grpc_server
from hsd_serve.serve.security import ApiKeys
from tests.support.certs import make_tls_files

KEY = "sk-tls-0123456789abcdef"


@pytest.fixture(scope="module")
def engine(loaded_model, families):
    return Engine(loaded_model(families[0]), loaded_model(families[1], seed=1))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("client-tls"))


class Dep:
    """What the TLS servicer needs of a CoordinatorDeployment, over an in-process engine."""

    def __init__(self, engine):
        self.engine, self.limits, self.ongoing = engine, service_limits(), 0
        self.api_keys, self.refusals = ApiKeys([KEY]), 0

    async def stream(self, req):
        self.ongoing += 1
        try:
            async for chunk in self.engine.coordinator.stream(req):
                yield chunk
        finally:
            self.ongoing -= 1

    def refused(self):
        self.refusals += 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


REQ = hsd_pb2.GenerateRequest(prompt="def fib(n):", max_tokens=8, method=method_to_proto("slem"),
                              lookahead=3, sampling=hsd_pb2.SamplingParams(temperature=0))
AUTH = (("authorization", f"Bearer {KEY}"),)


async def _code(coro):
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_tls_port_serves_generation_with_keys_and_limits(engine, certs):
    want = asyncio.run(engine.coordinator.generate(
        GenerationRequest("def fib(n):", max_new_tokens=8, method="slem", lookahead=3)))

    async def main():
        dep = Dep(engine)
        tls = ClientGrpcTls(cert_file=certs["cert"], key_file=certs["key"], host="127.0.0.1",
                            port=_free_port())
        server, port = await start_client_grpc_server(dep, tls.host, tls.port, 4, tls)
        addr = f"127.0.0.1:{port}"
        try:
            creds = grpc.ssl_channel_credentials(_read(certs["ca"]))
            async with grpc.aio.secure_channel(addr, creds) as ch:
                stub = hsd_pb2_grpc.GenerationStub(ch)
                got = await stub.Generate(REQ, metadata=AUTH, timeout=120)
                chunks = [c async for c in stub.GenerateStream(REQ, metadata=AUTH, timeout=120)]
                assert list(got.token_ids) == want.token_ids and got.text == want.text
                assert [t for c in chunks for t in c.token_ids] == want.token_ids
                for md in ((), (("authorization", "Bearer nope"),)):
                    code, details = await _code(stub.Generate(REQ, metadata=md, timeout=30))
                    assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
                    code, _ = await _code(_drain(stub.GenerateStream(REQ, metadata=md,
                                                                     timeout=30)))
                    assert code == grpc.StatusCode.UNAUTHENTICATED
                assert dep.refusals == 4
                bad = hsd_pb2.GenerateRequest(prompt="x", max_tokens=10**9)
                code, details = await _code(stub.Generate(bad, metadata=AUTH, timeout=30))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in details
                code, details = await _code(_drain(stub.GenerateStream(bad, metadata=AUTH,
                                                                       timeout=30)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in details
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=30)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                dep.ongoing = 4  # at capacity
                code, _ = await _code(stub.Generate(REQ, metadata=AUTH, timeout=30))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                dep.ongoing = 0
            async with grpc.aio.insecure_channel(addr) as ch:  # plaintext: no answer
                code, _ = await _code(hsd_pb2_grpc.GenerationStub(ch).Generate(
                    REQ, metadata=AUTH, timeout=10))
                assert code == grpc.StatusCode.UNAVAILABLE
            other = grpc.ssl_channel_credentials(_read(certs["other-ca"]))
            async with grpc.aio.secure_channel(addr, other) as ch:  # trusts another CA
                code, _ = await _code(hsd_pb2_grpc.GenerationStub(ch).Generate(
                    REQ, metadata=AUTH, timeout=10))
                assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())


async def _drain(call):
    async for _ in call:
        pass


def test_mtls_port_refuses_callers_without_a_certificate_from_the_ca(engine, certs):
    async def main():
        tls = ClientGrpcTls(cert_file=certs["cert"], key_file=certs["key"], ca_file=certs["ca"],
                            require_client_cert=True, host="127.0.0.1", port=_free_port())
        server, port = await start_client_grpc_server(Dep(engine), tls.host, tls.port, 4, tls)
        addr = f"127.0.0.1:{port}"
        try:
            ca = _read(certs["ca"])
            results = {}
            for name, creds in {
                    "no certificate": grpc.ssl_channel_credentials(ca),
                    "another CA's": grpc.ssl_channel_credentials(
                        ca, _read(certs["other-key"]), _read(certs["other-cert"])),
                    "the CA's": grpc.ssl_channel_credentials(ca, _read(certs["key"]),
                                                             _read(certs["cert"]))}.items():
                async with grpc.aio.secure_channel(addr, creds) as ch:
                    results[name] = (await _code(hsd_pb2_grpc.GenerationStub(ch).Generate(
                        REQ, metadata=AUTH, timeout=60)))[0]
        finally:
            await server.stop(None)
        return results

    results = asyncio.run(main())
    assert results["the CA's"] == grpc.StatusCode.OK
    assert results["no certificate"] != grpc.StatusCode.OK
    assert results["another CA's"] != grpc.StatusCode.OK


def test_tls_config_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="require_client_cert needs ca_file"):
        ClientGrpcTls(cert_file="c", key_file="k", require_client_cert=True)
    with pytest.raises(ValidationError, match="port"):
        ClientGrpcTls(cert_file="c", key_file="k", port=70000)
    tls = ClientGrpcTls(cert_file="/missing.pem", key_file="/missing.key", port=_free_port())

    async def main():
        with pytest.raises(ValueError, match="client_grpc_tls: cannot read /missing"):
            await start_client_grpc_server(None, tls.host, tls.port, 1, tls)

    asyncio.run(main())
