"""The data plane is closed: drafter and target replicas' gRPC servers answer only callers with the
cluster's token (and, when configured, over TLS with a certificate made in the test, mTLS too);
the coordinator's calls carry it and change nothing in the output."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.pb import hsd_pb2_grpc as pb_grpc
from hsd_serve.serve.security import DataPlaneSecurity, resolve_dataplane_token
from tests.serve.test_dataplane import PROMPT, SAMPLED, key, served
from tests.support.certs import make_tls_files

TOKEN = "t0k3n-for-this-cluster_abcdefghijklmnopqrstuvwxyz"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def hetero(loaded_model, families):
    return loaded_model(families[1]), loaded_model(families[0], seed=1)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("certs"))


REQUESTS = [GenerationRequest(PROMPT, max_new_tokens=10, method="slem", lookahead=3),
            GenerationRequest(PROMPT, max_new_tokens=8, method="tli", lookahead=3,
                              params=SamplingParams(seed=5, **SAMPLED))]


def _in_process(hetero):
    engine = Engine(*hetero)
    return [key(asyncio.run(engine.coordinator.generate(r))) for r in REQUESTS]


def _calls(channel):
    """One call of every data-plane method (they would all change state if they got through)."""
    target, drafter = pb_grpc.TargetStub(channel), pb_grpc.DrafterStub(channel)
    sampling = pb.SamplingParams(seed=0)
    return [
        lambda md: target.Verify(pb.VerifyRequest(request_id="x", committed=[1],
                                                  rule=pb.RULE_ROW, sampling=sampling),
                                 metadata=md, timeout=30),
        lambda md: target.Free(pb.FreeRequest(request_id="x"), metadata=md, timeout=30),
        lambda md: drafter.Open(pb.OpenRequest(request_id="x", method=pb.METHOD_SLEM,
                                               prompt="hi", sampling=sampling, prompt_ids=[1]),
                                metadata=md, timeout=30),
        lambda md: drafter.Draft(pb.DraftRequest(request_id="x", k=2), metadata=md, timeout=30),
    ]


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


BAD_METADATA = [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                (("authorization", f"Basic {TOKEN}"),), (("authorization", f"Bearer {TOKEN}x"),),
                (("authorization", f"Bearer {TOKEN[:-1]}"),), (("authorization", "Bearer "),),
                (("x-token", TOKEN),)]


def test_token_closes_the_data_plane_and_changes_no_output(hetero):
    security = DataPlaneSecurity(TOKEN)
    want = _in_process(hetero)

    async def main():
        async with served(*hetero, security=security) as srv:
            got = [key(await srv.run(r)) for r in REQUESTS]
            tw = srv.target_server.hsd_servicer.worker
            dw = srv.drafter_server.hsd_servicer.worker
            verifies = tw.verifies
            for addr in (srv.target_addr, srv.drafter_addr):
                async with grpc.aio.insecure_channel(addr) as ch:
                    # the standard health check stays open (load balancers, probes)
                    health = health_pb2_grpc.HealthStub(ch)
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                    for call in _calls(ch):
                        for md in BAD_METADATA:
                            assert await _code(call(md)) == UNAUTH, (addr, md)
                    # reflection lists the services only with the token
                    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                    ask = reflection_pb2.ServerReflectionRequest(list_services="")
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for _ in refl.ServerReflectionInfo(iter([ask]), timeout=30):
                            pass
                    assert info.value.code() == UNAUTH
                    names = []
                    async for r in refl.ServerReflectionInfo(iter([ask]), timeout=30,
                                                             metadata=security.metadata):
                        names += [s.name for s in r.list_services_response.service]
                    assert names
            # nothing a stranger sent reached a worker
            assert tw.verifies == verifies and not dw.sessions and not tw.sessions
            # the right token gets through (the refused Draft of an unknown session is a reply)
            async with grpc.aio.insecure_channel(srv.drafter_addr) as ch:
                reply = await pb_grpc.DrafterStub(ch).Draft(
                    pb.DraftRequest(request_id="nope", k=2, generated=b"x"),
                    metadata=security.metadata, timeout=30)
                assert reply.session_missing
            # and a caller without the token cannot generate through the ports either
            from hsd_serve.serve.dataplane import ChannelPool, GrpcTarget

            stranger = ChannelPool()
            try:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await GrpcTarget(srv.target_addr, pool=stranger).free("x")
                assert info.value.code() == UNAUTH
            finally:
                await stranger.close()
            return got

    assert asyncio.run(main()) == want


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(values=st.lists(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                               max_size=120), min_size=1, max_size=8))
def test_fuzzed_authorization_values_are_refused_and_never_crash(values):
    """Arbitrary printable ``authorization`` values: UNAUTHENTICATED every time, and the server
    still answers the token afterwards."""
    from hsd_serve.serve.dataplane import start_dataplane_server, stop_dataplane_server
    from tests.serve.test_dataplane import RecordingWorker

    async def main():
        worker = RecordingWorker()
        security = DataPlaneSecurity(TOKEN)
        server, port = await start_dataplane_server("target", worker, host="127.0.0.1",
                                                    security=security)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                free = _calls(ch)[1]
                for v in values:
                    if v.strip() == f"Bearer {TOKEN}":
                        continue
                    assert await _code(free((("authorization", v),))) == UNAUTH, v
                assert worker.calls == []
                assert await _code(free(security.metadata)) == grpc.StatusCode.OK
        finally:
            await stop_dataplane_server(server, grace=None)

    asyncio.run(main())


def _tls(files, **kw):
    return {"cert_file": files["cert"], "key_file": files["key"], "ca_file": files["ca"],
            "require_client_cert": False, "server_name": None, **kw}


def test_tls_and_mtls_with_a_certificate_made_here(hetero, tls_files):
    """TLS: the same output over TLS; a plaintext caller or one that trusts another CA gets no
    answer.  mTLS: a caller without a certificate, or with one from another CA, is refused."""
    want = _in_process(hetero)
    f = tls_files

    async def refused(addr, creds) -> bool:
        async with grpc.aio.secure_channel(
                addr, creds, options=[("grpc.ssl_target_name_override", "hsd-dataplane")]) as ch:
            code = await _code(pb_grpc.TargetStub(ch).Free(
                pb.FreeRequest(request_id="x"), metadata=((("authorization", f"Bearer {TOKEN}"),)),
                timeout=10))
        return code != grpc.StatusCode.OK

    def read(stem):
        with open(f[stem], "rb") as fh:
            return fh.read()

    async def main():
        # TLS, the server's certificate names "hsd-dataplane" (replicas are dialled by IP)
        tls = DataPlaneSecurity(TOKEN, _tls(f, server_name="hsd-dataplane"))
        async with served(*hetero, security=tls) as srv:
            got = [key(await srv.run(r)) for r in REQUESTS]
            async with grpc.aio.insecure_channel(srv.target_addr) as ch:  # plaintext
                assert await _code(pb_grpc.TargetStub(ch).Free(
                    pb.FreeRequest(request_id="x"), metadata=tls.metadata, timeout=10)) \
                    == grpc.StatusCode.UNAVAILABLE
            assert await refused(srv.target_addr,
                                 grpc.ssl_channel_credentials(read("other-ca")))
            assert not await refused(srv.target_addr, grpc.ssl_channel_credentials(read("ca")))
        # mTLS
        mtls = DataPlaneSecurity(TOKEN, _tls(f, server_name="hsd-dataplane",
                                             require_client_cert=True))
        async with served(*hetero, security=mtls) as srv:
            got_m = [key(await srv.run(r)) for r in REQUESTS]
            addr = srv.target_addr
            assert await refused(addr, grpc.ssl_channel_credentials(read("ca")))  # no cert
            assert await refused(addr, grpc.ssl_channel_credentials(
                read("ca"), read("other-key"), read("other-cert")))  # a stranger's cert
            assert not await refused(addr, grpc.ssl_channel_credentials(
                read("ca"), read("key"), read("cert")))
        return got, got_m

    got, got_m = asyncio.run(main())
    assert got == want and got_m == want


def test_tls_config_errors_are_clear(tmp_path):
    from pydantic import ValidationError

    from hsd_serve.serve.config import AppConfig

    with pytest.raises(ValidationError, match="require_client_cert needs ca_file"):
        AppConfig(security={"dataplane_tls": {"cert_file": "c", "key_file": "k",
                                              "require_client_cert": True}})
    sec = DataPlaneSecurity(TOKEN, {"cert_file": str(tmp_path / "missing.pem"),
                                    "key_file": str(tmp_path / "missing.key")})
    with pytest.raises(ValueError, match="cannot read .*missing"):
        sec.add_port(grpc.server(ThreadPoolExecutor(1)), "127.0.0.1:0")
    with pytest.raises(ValueError, match="printable ASCII"):
        DataPlaneSecurity("has space")
    assert TOKEN not in repr(sec) and TOKEN not in repr(DataPlaneSecurity(TOKEN))


def test_token_resolution_env_then_one_per_cluster():
    from hsd_serve.serve.config import SecurityConfig

    sec = SecurityConfig()
    assert resolve_dataplane_token(sec, {"HSD_DATAPLANE_TOKEN": " given "}) == "given"
    a, b = resolve_dataplane_token(sec, {}), resolve_dataplane_token(sec, {})
    import ray

    assert len(a) >= 40 and len(b) >= 40
    if ray.is_initialized():  # a Ray cluster (the e2e tests' session): one token per cluster
        assert a == b
    else:  # without Ray: a fresh random token per build
        assert a != b
    env = DataPlaneSecurity(a).to_env()
    assert DataPlaneSecurity.from_env({"HSD_DATAPLANE_SECURITY": env}).token == a
    assert DataPlaneSecurity.from_env({}) is None
