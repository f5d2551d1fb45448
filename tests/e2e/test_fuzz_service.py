"""Hostile gRPC input through the live service (Ray Serve's gRPC proxy → Coordinator replica):
a few hundred fuzzed ``GenerateRequest``s, unary and streaming, each answered with a valid
completion or ``INVALID_ARGUMENT`` — never INTERNAL, never a hang — and the service answers a
normal request exactly afterwards."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings

from hsd_serve.engine.types import RequestError
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.config import service_limits
from hsd_serve.serve.convert import request_from_proto
from tests.e2e.faultkit import watchdog  # noqa: F401
from tests.unit.test_fuzz_inputs import requests

FINISHED = (hsd_pb2.FINISH_REASON_STOP, hsd_pb2.FINISH_REASON_LENGTH)

META = (("application", "hsd"),)
# the session service's limits (tests/e2e/conftest.py: default 16 tokens, at most 64)
SERVICE = service_limits(default_max_tokens=16, max_tokens_limit=64)


@pytest.fixture(scope="module")
def stub(service):
    channel = grpc.insecure_channel(f"127.0.0.1:{service['grpc']}")
    yield hsd_pb2_grpc.GenerationStub(channel)
    channel.close()


def _call(stub, msg, streaming: bool):
    try:
        if streaming:
            chunks = list(stub.GenerateStream(msg, metadata=META, timeout=60))
            assert chunks and chunks[-1].finish_reason in FINISHED
            ids = [t for c in chunks for t in c.token_ids]
            assert chunks[-1].stats.completion_tokens == len(ids)
        else:
            r = stub.Generate(msg, metadata=META, timeout=60)
            assert r.finish_reason in FINISHED
            assert r.stats.completion_tokens == len(r.token_ids)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def test_fuzzed_requests_through_the_live_service(stub):
    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(msg=requests())
    def one(msg):
        try:
            request_from_proto(msg, SERVICE)
            locally_valid = True
        except RequestError:
            locally_valid = False
        streaming = len(msg.prompt) % 2 == 1
        code, details = _call(stub, msg, streaming)
        event(f"{code.name}")
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
        if not locally_valid:  # the service refuses exactly what validation refuses
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details

    one()
    ok = stub.Generate(hsd_pb2.GenerateRequest(prompt="def fib(n):", max_tokens=4),
                       metadata=META, timeout=60)
    assert len(ok.token_ids) >= 1


def test_megabyte_prompt_through_the_service(stub):
    code, details = _call(stub, hsd_pb2.GenerateRequest(prompt="x" * 1_000_000), False)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details
    code, details = _call(stub, hsd_pb2.GenerateRequest(prompt="x" * 1_000_001), True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details


def test_undecodable_bytes_are_refused_by_grpc_before_the_service(service, stub):
    """Bytes that are no ``GenerateRequest`` (here: a prompt that is not UTF-8) fail in
    grpcio's request deserializer on the proxy, which answers UNKNOWN ("Unexpected DecodeError")
    without calling any handler — a gap: it should be INVALID_ARGUMENT (docs/reliability.md);
    the service is unaffected."""
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as ch:
        raw = ch.unary_unary("/hsd.v1.Generation/Generate", request_serializer=None,
                             response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\x03\xed\xa0\x80", metadata=META, timeout=30)
        assert info.value.code() in (grpc.StatusCode.UNKNOWN,
                                     grpc.StatusCode.INVALID_ARGUMENT), info.value
        assert "DecodeError" in info.value.details() or "UTF-8" in info.value.details()
        print("\nundecodable request ->", info.value.code(), info.value.details())
    ok = stub.Generate(hsd_pb2.GenerateRequest(prompt="def fib(n):", max_tokens=4),
                       metadata=META, timeout=60)
    assert len(ok.token_ids) >= 1
