"""A client that goes away (gRPC cancel or deadline, HTTP disconnect) stops its generation at once
and frees its caches and leases on both the drafter and the target replica."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest

from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from tests.e2e.faultkit import (deploy, replica_stats, tiny_args, undeploy, wait_for,
                                watchdog)  # noqa: F401

APP = "hsd-cancel"
META = (("application", APP),)
LONG = 400
PROMPT = "def fib(n):\n    "


@pytest.fixture(scope="module")
def cancel_app(service):
    handle = deploy(APP, tiny_args(service), "/cancel", http_port=service["http"])
    yield {"handle": handle, "grpc": service["grpc"], "http": service["http"]}
    undeploy(APP)


def _calls() -> tuple[int, int]:
    t = replica_stats(APP, "Target", 1)
    d = replica_stats(APP, "Drafter", 1)
    return next(iter(t.values()))["calls"], next(iter(d.values()))["calls"]


def _idle() -> bool:
    for dep in ("Target", "Drafter"):
        s = next(iter(replica_stats(APP, dep, 1).values()))
        if s["sessions"] or s["leases_active"]:
            return False
    return True


def _stopped_and_freed(calls_before: tuple[int, int], full: int, cancelled_at: float) -> dict:
    """Wait for 0 sessions/leases on both replicas, check no round runs after that, and that
    the cancelled request made far fewer target rounds than a full run (``full``)."""
    wait_for(_idle, 20, interval_s=0.1, what="0 sessions and leases on both replicas")
    freed_s = time.monotonic() - cancelled_at
    after = _calls()
    time.sleep(1.0)
    assert _calls() == after, "rounds still running after the client went away"
    target_rounds = after[0] - calls_before[0]
    assert target_rounds < full / 2, (target_rounds, full)
    return {"freed_s": freed_s, "target_rounds": target_rounds}


def _cancelled_mid_request(full: int, go_away) -> dict:
    """``go_away()``: a client that reads its first chunk, then goes away.  A stream's first
    chunk can reach a slow client after the server has run most of the request, and then there
    is little left to stop: such a try is repeated (3 tries).  Then: stopped and freed."""
    for _ in range(3):
        before = _calls()
        go_away()
        cancelled_at = time.monotonic()
        if _calls()[0] - before[0] < full / 2:  # still running when the client left
            return _stopped_and_freed(before, full, cancelled_at)
        wait_for(_idle, 20, interval_s=0.1, what="idle replicas")
    pytest.fail("in 3 tries the client never went away before the request was half done")


@pytest.fixture(scope="module")
def full_rounds(cancel_app):
    """Target rounds of one complete LONG request (the yardstick for 'stopped early')."""
    before = _calls()
    with grpc.insecure_channel(f"127.0.0.1:{cancel_app['grpc']}") as ch:
        r = hsd_pb2_grpc.GenerationStub(ch).Generate(_req(), metadata=META, timeout=300)
    assert len(r.token_ids) > LONG // 2
    wait_for(_idle, 20, what="idle replicas")
    rounds = _calls()[0] - before[0]
    assert rounds >= 40, rounds
    return rounds


def _req() -> hsd_pb2.GenerateRequest:
    return hsd_pb2.GenerateRequest(prompt=PROMPT, max_tokens=LONG, method=hsd_pb2.METHOD_SLEM,
                                   sampling=hsd_pb2.SamplingParams(temperature=0))


def test_grpc_stream_cancelled_after_first_chunk(cancel_app, full_rounds):
    def go_away():
        with grpc.insecure_channel(f"127.0.0.1:{cancel_app['grpc']}") as ch:
            call = hsd_pb2_grpc.GenerationStub(ch).GenerateStream(_req(), metadata=META,
                                                                   timeout=300)
            first = next(call)
            assert first.token_ids
            call.cancel()
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.CANCELLED

    out = _cancelled_mid_request(full_rounds, go_away)
    print("grpc stream cancel:", out)


def test_grpc_unary_deadline_stops_generation(cancel_app, full_rounds):
    before = _calls()
    with grpc.insecure_channel(f"127.0.0.1:{cancel_app['grpc']}") as ch:
        stub = hsd_pb2_grpc.GenerationStub(ch)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(_req(), metadata=META, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 5
    out = _stopped_and_freed(before, full_rounds, time.monotonic())
    print("grpc deadline:", out)


def test_http_sse_client_disconnect(cancel_app, full_rounds):
    base = f"http://127.0.0.1:{cancel_app['http']}"
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "method": "slem",
            "stream": True}

    def go_away():
        with httpx.Client(base_url=base, timeout=60) as client:
            with client.stream("POST", "/cancel/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        assert "choices" in event
                        break
            # leaving the block closes the connection mid-stream

    out = _cancelled_mid_request(full_rounds, go_away)
    print("http sse disconnect:", out)


def test_http_non_streaming_client_timeout(cancel_app, full_rounds):
    before = _calls()
    base = f"http://127.0.0.1:{cancel_app['http']}"
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "method": "slem"}
    with httpx.Client(base_url=base, timeout=0.3) as client:
        with pytest.raises(httpx.TimeoutException):
            client.post("/cancel/v1/completions", json=body)
    out = _stopped_and_freed(before, full_rounds, time.monotonic())
    print("http timeout:", out)
