"""Metrics end to end: requests through the local service, then a scrape of ``GET /metrics``.

The requests go to an application of their own (its series carry ``application=APP``), so
requests of other tests on the shared Ray instance, whose values Ray may export at any moment,
cannot change the counts checked here.  Ray exports custom metrics every ~10 s: the scrape is
polled with a deadline until it shows every expected value.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc
import httpx
import pytest

from hsd_serve import metrics as M
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.convert import method_to_proto

APP, ROUTE = "hsd-metrics", "/metrics-e2e"
DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana-dashboard.json"
DEADLINE_S = 90


@pytest.fixture(scope="module")
def app(service):
    from ray import serve

    from hsd_serve.serve.app import build_app

    # the target drafts for itself here: tiny random models of two vocabularies accept almost
    # nothing, and these counts should move
    args = dict(service["args"], drafter={"path": str(service["target"])})
    serve.run(build_app(args), name=APP, route_prefix=ROUTE)
    yield dict(service, base=f"http://127.0.0.1:{service['http']}")
    serve.delete(APP)


def _scrape(url: str) -> dict:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/plain")
    return M.parse_scrape(r.text)


def _mine(samples: dict) -> dict:
    """This application's series (Ray Serve adds the ``application`` tag in replicas)."""
    return {k: v for k, v in samples.items() if ("application", APP) in k[1]}


def _run_requests(app) -> list[dict]:
    """A few requests over gRPC and HTTP; returns what each response reported."""
    out = []
    meta = (("application", APP),)
    with grpc.insecure_channel(f"127.0.0.1:{app['grpc']}") as ch:
        stub = hsd_pb2_grpc.GenerationStub(ch)
        for method, temp, seed in (("slem", 0.0, 0), ("tli", 0.9, 5)):
            resp = stub.Generate(hsd_pb2.GenerateRequest(
                prompt="def fib(n):\n    ", max_tokens=12, method=method_to_proto(method),
                sampling=hsd_pb2.SamplingParams(temperature=temp, seed=seed)),
                metadata=meta, timeout=120)
            out.append(_from_proto(resp.stats))
        chunks = list(stub.GenerateStream(hsd_pb2.GenerateRequest(
            prompt="import os\n", max_tokens=9, method=hsd_pb2.METHOD_SLEM), metadata=meta,
            timeout=120))
        out.append(_from_proto(chunks[-1].stats))
    with httpx.Client(base_url=app["base"] + ROUTE, timeout=120) as client:
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 7,
                                                 "temperature": 0, "method": "ar"})
        assert r.status_code == 200, r.text
        body = r.json()
        out.append({"outcome": "ok", "method": body["hsd"]["method"],
                    "rounds": body["hsd"]["rounds"], "drafted": body["hsd"]["drafted"],
                    "accepted": body["hsd"]["accepted"],
                    "fallback_rounds": body["hsd"]["fallback_rounds"],
                    "emitted": body["usage"]["completion_tokens"], "per_position": []})
        # valid JSON, but the coordinator refuses it: longer than the target's context (512)
        r = client.post("/v1/completions", json={"prompt": "tok " * 2000, "max_tokens": 3,
                                                 "method": "tli"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        out.append({"outcome": "invalid", "method": "tli", "rounds": 0, "drafted": 0,
                    "accepted": 0, "fallback_rounds": 0, "emitted": 0, "per_position": []})
    return out


def _from_proto(stats) -> dict:
    return {"outcome": "ok", "method": stats.method, "rounds": stats.rounds,
            "drafted": stats.drafted, "accepted": stats.accepted,
            "fallback_rounds": stats.fallback_rounds, "emitted": stats.completion_tokens,
            "per_position": list(stats.accepted_per_position)}


def _expected(reports: list[dict]) -> dict[tuple[str, tuple], float]:
    """(exposed name, label filter) -> expected increase."""
    want: dict[tuple[str, tuple], float] = {}

    def add(name, value, **labels):
        key = (name, tuple(sorted(labels.items())))
        want[key] = want.get(key, 0) + value

    for r in reports:
        m = r["method"]
        add("ray_hsd_requests_total", 1, method=m, outcome=r["outcome"])
        for field, name in (("drafted", "drafted_tokens"), ("accepted", "accepted_tokens"),
                            ("emitted", "emitted_tokens"), ("rounds", "rounds"),
                            ("fallback_rounds", "fallback_rounds")):
            add(f"ray_hsd_{name}_total", r[field], method=m)
            add(f"ray_hsd_{name}_total", r[field])
        for i, a in enumerate(r["per_position"]):
            add("ray_hsd_accepted_tokens_by_position_total", a, position=M.position_label(i))
        ok = r["outcome"] == "ok"
        add("ray_hsd_ttft_seconds_count", int(ok), method=m)
        add("ray_hsd_e2e_latency_seconds_count", int(ok), method=m)
        add("ray_hsd_tpot_seconds_count", int(ok and r["emitted"] > 1))
        add("ray_hsd_verify_latency_seconds_count", r["rounds"], method=m)
        add("ray_hsd_transport_latency_seconds_count", r["rounds"])
        add("ray_hsd_draft_latency_seconds_count", r["rounds"] if m != "ar" else 0)
    add("ray_hsd_accepted_tokens_by_position_total",
        sum(r["accepted"] for r in reports))
    add("ray_hsd_drafted_tokens_by_position_total", sum(r["drafted"] for r in reports))
    return want


def _mismatches(before: dict, after: dict, want: dict) -> list[str]:
    bad = []
    for (name, labels), value in want.items():
        got = M.total(after, name, **dict(labels)) - M.total(before, name, **dict(labels))
        if got != value:
            bad.append(f"{name}{dict(labels)}: +{got}, want +{value}")
    return bad


def test_scrape_shows_exact_counts_after_requests(app):
    url = f"{app['base']}/metrics"  # the main app's /metrics: this node's whole Ray export
    before = _mine(_scrape(url))
    reports = _run_requests(app)
    assert sum(r["drafted"] for r in reports) > 0 and sum(r["accepted"] for r in reports) > 0
    want = _expected(reports)
    deadline = time.time() + DEADLINE_S
    while True:
        after = _mine(_scrape(url))
        bad = _mismatches(before, after, want)
        if not bad or time.time() > deadline:
            break
        time.sleep(1.0)
    assert not bad, "\n".join(bad)
    # low-cardinality labels only: no prompt, no request id
    hsd_labels = {k for (n, ls) in after if n.startswith("ray_hsd_") for k, _ in ls}
    assert {"method", "outcome", "position", "deployment", "replica", "application"} <= \
        hsd_labels
    for (n, ls) in after:
        if n.startswith("ray_hsd_"):
            d = dict(ls)
            assert d.get("method", "ar") in M.METHODS + ("other",), d
            assert "def fib" not in json.dumps(d)


def test_replica_gauges_and_the_apps_own_metrics_route(app):
    want = {("Coordinator", "coordinator"), ("Drafter", "drafter"), ("Target", "target")}

    def state(got):
        have = {(dict(ls).get("deployment"), dict(ls).get("component"))
                for (n, ls) in got if n in ("ray_hsd_ongoing_requests", "ray_hsd_cache_sessions")}
        # nothing in flight once the requests are over; caches freed with the leases
        busy = M.total(got, "ray_hsd_ongoing_requests") + M.total(got, "ray_hsd_cache_sessions")
        return have, busy

    deadline = time.time() + DEADLINE_S
    while True:  # through this application's own HTTP route
        got = _mine(_scrape(f"{app['base']}{ROUTE}/metrics"))
        have, busy = state(got)
        if (want <= have and busy == 0) or time.time() > deadline:
            break
        time.sleep(1.0)
    assert want <= have, have
    assert busy == 0
    assert M.total(got, "ray_serve_deployment_replica_healthy", deployment="Target") >= 1


def test_every_dashboard_query_uses_an_exported_metric(app):
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
             for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"\b(ray_[a-z0-9_]+)\b", e)}
    assert names
    deadline = time.time() + DEADLINE_S
    while True:
        exported = {n for (n, _) in _scrape(f"{app['base']}/metrics")}
        missing = names - exported
        if not missing or time.time() > deadline:
            break
        time.sleep(1.0)
    assert not missing, sorted(missing)
