"""Metrics: one definition per name, exact counts from RequestStats, safe labels, and the
in-process engine reporting every request once (PrometheusSink, real prometheus_client)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request

import pytest

from hsd_serve import metrics as M
from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.types import GenerationRequest, RequestError, RequestStats

ALLOWED_LABELS = {"method", "outcome", "position", "component", "result"}


def _stats(method="slem") -> RequestStats:
    s = RequestStats(method=method)
    s.record_round(4, 2, emitted=3, timing=(0.010, 0.004, 0.003, 0.001))
    s.record_round(4, 4, emitted=5, timing=(0.012, 0.005, 0.004, 0.0))
    s.record_round(0, 0, emitted=1, fallback=True, timing=(0.005, 0.0, 0.004, 0.0))
    s.ttft_s, s.wall_s = 0.02, 0.05
    return s


def _scrape(sink: M.PrometheusSink):
    return M.parse_scrape(sink.render())


# ------------------------------------------------------------------ definitions


def test_every_metric_is_named_once_with_the_prefix_and_safe_labels():
    names = [m.full_name for m in M.METRICS.values()]
    assert len(names) == len(set(names))
    for m in M.METRICS.values():
        assert m.full_name.startswith("hsd_") and m.kind in ("counter", "histogram", "gauge")
        assert set(m.labels) <= ALLOWED_LABELS, m
        assert m.help
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(set(m.buckets)) and m.buckets[0] > 0
    required = {"requests", "drafted_tokens", "accepted_tokens", "emitted_tokens",
                "accepted_tokens_by_position", "rounds", "fallback_rounds", "ttft_seconds",
                "tpot_seconds", "e2e_latency_seconds", "draft_latency_seconds",
                "verify_latency_seconds", "transport_latency_seconds", "ongoing_requests",
                "cache_sessions"}
    assert required <= set(M.METRICS)
    assert M.METRICS["requests"].exposed(ray=True) == "ray_hsd_requests_total"
    assert M.METRICS["ttft_seconds"].exposed() == "hsd_ttft_seconds"


def test_prometheus_sink_counts_exactly_what_the_stats_say():
    sink = M.PrometheusSink()
    s = _stats()
    sink.record_request(s, "ok")
    sink.record_request(s, "ok")
    got = _scrape(sink)
    T = M.total
    assert T(got, "hsd_requests_total", method="slem", outcome="ok") == 2
    assert T(got, "hsd_drafted_tokens_total", method="slem") == 2 * 8
    assert T(got, "hsd_accepted_tokens_total", method="slem") == 2 * 6
    assert T(got, "hsd_emitted_tokens_total", method="slem") == 2 * 9
    assert T(got, "hsd_rounds_total", method="slem") == 2 * 3
    assert T(got, "hsd_fallback_rounds_total", method="slem") == 2
    for pos, (d, a) in enumerate([(2, 2), (2, 2), (2, 1), (2, 1)]):
        assert T(got, "hsd_drafted_tokens_by_position_total", position=str(pos)) == 2 * d
        assert T(got, "hsd_accepted_tokens_by_position_total", position=str(pos)) == 2 * a
    assert T(got, "hsd_accepted_tokens_by_position_total") == T(got, "hsd_accepted_tokens_total")
    for name in ("ttft_seconds", "e2e_latency_seconds", "tpot_seconds"):
        assert T(got, f"hsd_{name}_count", method="slem") == 2
    assert T(got, "hsd_ttft_seconds_sum") == pytest.approx(0.04)
    assert T(got, "hsd_tpot_seconds_sum") == pytest.approx(2 * 0.03 / 8)
    for name in ("draft", "verify", "transport"):
        assert T(got, f"hsd_{name}_latency_seconds_count", method="slem") == 2 * 3
    assert T(got, "hsd_draft_latency_seconds_sum") == pytest.approx(2 * 0.009)
    assert T(got, "hsd_transport_latency_seconds_sum") == pytest.approx(2 * 0.006)
    # a bucket boundary is honoured: 0.0025 <= 2 samples of 0.0 (the fallback round)
    assert T(got, "hsd_draft_latency_seconds_bucket", le="0.0025") == 2


def test_drafting_ahead_counts_reach_the_shared_counters():
    """HF executor overlap: a request's ready/waited rounds and stale tokens add to the counters
    the vLLM proposer feeds; a request without drafting ahead adds none."""
    sink = M.PrometheusSink()
    s = _stats()
    s.ahead_ready, s.ahead_waited, s.ahead_plain, s.ahead_stale = 3, 5, 2, 11
    s.ahead_branch = 1  # of the ready ones, a branch
    sink.record_request(s, "ok")
    sink.record_request(_stats(), "ok")
    got = _scrape(sink)
    assert M.total(got, "hsd_draft_steps_total", result="ready") == 3
    assert M.total(got, "hsd_draft_steps_total", result="waited") == 5
    assert M.total(got, "hsd_draft_steps_total", result="plain") == 2
    assert M.total(got, "hsd_stale_draft_tokens_total") == 11
    assert M.total(got, "hsd_branch_drafts_total") == 1


def test_failed_requests_count_work_but_not_request_latency():
    sink = M.PrometheusSink()
    sink.record_request(_stats("tli"), "cancelled")
    sink.record_request(RequestStats(method="ar"), "invalid")
    got = _scrape(sink)
    assert M.total(got, "hsd_requests_total", outcome="cancelled", method="tli") == 1
    assert M.total(got, "hsd_requests_total", outcome="invalid", method="ar") == 1
    assert M.total(got, "hsd_drafted_tokens_total", method="tli") == 8
    assert M.total(got, "hsd_ttft_seconds_count") == 0
    assert M.total(got, "hsd_e2e_latency_seconds_count") == 0
    assert M.total(got, "hsd_verify_latency_seconds_count") == 3


def test_ar_rounds_have_no_draft_samples():
    s = RequestStats(method="ar")
    for _ in range(3):
        s.record_round(0, 0, emitted=1, timing=(0.01, 0.0, 0.008, 0.0))
    s.ttft_s, s.wall_s = 0.01, 0.03
    sink = M.PrometheusSink()
    sink.record_request(s, "ok")
    got = _scrape(sink)
    assert M.total(got, "hsd_draft_latency_seconds_count") == 0
    assert M.total(got, "hsd_verify_latency_seconds_count", method="ar") == 3


def test_labels_stay_low_cardinality():
    sink = M.PrometheusSink()
    s = RequestStats(method="def fib(n): # a prompt, not a method")
    for _ in range(3):
        s.record_round(20, 20, emitted=21)
    sink.record_request(s, "error")
    got = _scrape(sink)
    labels = {dict(ls).get("method") for (_, ls) in got}
    assert labels <= {None, "other"}
    positions = {dict(ls)["position"] for (n, ls) in got if "position" in dict(ls)}
    assert positions == {str(i) for i in range(16)} | {"16+"}
    assert M.total(got, "hsd_drafted_tokens_by_position_total", position="16+") == 3 * 4
    with pytest.raises(ValueError, match="unknown outcome"):
        sink.record_request(s, "weird")
    with pytest.raises(ValueError, match="not a gauge"):
        sink.set_gauge("requests", 1, component="target")
    with pytest.raises(ValueError, match="takes labels"):
        sink.set_gauge("cache_sessions", 1, component="target", replica="r1")
    with pytest.raises(ValueError, match="component"):
        sink.set_gauge("cache_sessions", 1, component="prompt text")
    sink.set_gauge("cache_sessions", 3, component="target")
    assert M.total(_scrape(sink), "hsd_cache_sessions", component="target") == 3


def test_sinks_have_their_own_registries():
    a, b = M.PrometheusSink(), M.PrometheusSink()
    a.record_request(_stats(), "ok")
    assert M.total(_scrape(b), "hsd_requests_total") == 0
    assert M.total(_scrape(a), "hsd_requests_total") == 1


def test_serve_exposes_the_registry_over_http():
    sink = M.PrometheusSink()
    sink.record_request(_stats(), "ok")
    server = sink.serve(0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert M.total(M.parse_scrape(text), "hsd_emitted_tokens_total") == 9
    with pytest.raises(ValueError, match="port"):
        sink.serve(70000)


# ------------------------------------------------------------------ the engine reports


@pytest.fixture(scope="module")
def engine_and_sink(loaded_model):
    from hsd_serve.engine.local import Engine

    sink = M.PrometheusSink()
    return Engine(loaded_model("mistral-v0.1"), loaded_model("gpt2", seed=1), sink=sink), sink


def _totals(sink):
    got = _scrape(sink)
    names = ["hsd_drafted_tokens_total", "hsd_accepted_tokens_total", "hsd_emitted_tokens_total",
             "hsd_rounds_total", "hsd_fallback_rounds_total", "hsd_ttft_seconds_count",
             "hsd_e2e_latency_seconds_count", "hsd_tpot_seconds_count",
             "hsd_verify_latency_seconds_count", "hsd_draft_latency_seconds_count",
             "hsd_transport_latency_seconds_count"]
    out = {n: M.total(got, n) for n in names}
    for o in M.OUTCOMES:
        out[o] = M.total(got, "hsd_requests_total", outcome=o)
    out["by_pos"] = [M.total(got, "hsd_accepted_tokens_by_position_total",
                             position=M.position_label(i)) for i in range(17)]
    return out


def test_engine_reports_each_request_once_with_exact_counts(engine_and_sink):
    engine, sink = engine_and_sink
    before = _totals(sink)
    reqs = [GenerationRequest("def fib(n):", max_new_tokens=10, method="slem"),
            GenerationRequest("import os\n", max_new_tokens=8, method="tli", lookahead=3,
                              params=SamplingParams(temperature=0.9, seed=3)),
            GenerationRequest("hello", max_new_tokens=6, method="ar")]
    results = [engine.generate(r) for r in reqs]
    after = _totals(sink)
    d = {k: (after[k] - before[k]) if k != "by_pos" else
         [a - b for a, b in zip(after[k], before[k])] for k in after}
    st = [r.stats for r in results]
    assert d["ok"] == 3 and d["error"] == d["cancelled"] == d["invalid"] == 0
    assert d["hsd_drafted_tokens_total"] == sum(s.drafted for s in st)
    assert d["hsd_accepted_tokens_total"] == sum(s.accepted for s in st)
    assert d["hsd_emitted_tokens_total"] == sum(len(r.token_ids) for r in results)
    assert d["hsd_rounds_total"] == sum(s.rounds for s in st)
    assert d["hsd_fallback_rounds_total"] == sum(s.fallback_rounds for s in st)
    assert sum(s.drafted for s in st) > 0
    want_pos = [0] * 17
    for s in st:
        for i, a in enumerate(s.accepted_per_position):
            want_pos[min(i, 16)] += a
    assert d["by_pos"] == want_pos
    assert d["hsd_ttft_seconds_count"] == d["hsd_e2e_latency_seconds_count"] == 3
    assert d["hsd_tpot_seconds_count"] == sum(s.emitted > 1 for s in st)
    assert d["hsd_verify_latency_seconds_count"] == sum(s.rounds for s in st)
    assert d["hsd_transport_latency_seconds_count"] == sum(s.rounds for s in st)
    assert d["hsd_draft_latency_seconds_count"] == sum(s.rounds for s in st if s.method != "ar")


def test_engine_reports_invalid_and_cancelled_requests(engine_and_sink):
    engine, sink = engine_and_sink
    before = _totals(sink)
    with pytest.raises(RequestError):
        engine.generate(GenerationRequest("x", method="sd"))  # different vocabularies
    with pytest.raises(RequestError):
        engine.generate(GenerationRequest("x", method="nope"))
    stream = engine.stream(GenerationRequest("def fib(n):", max_new_tokens=30, method="slem"))
    first = next(stream)
    assert first.result is None  # (greedy, deterministic: the request is not over yet)
    stream.close()  # the client went away after the first chunk
    after = _totals(sink)
    got = _scrape(sink)
    assert after["invalid"] - before["invalid"] == 2
    assert M.total(got, "hsd_requests_total", outcome="invalid", method="sd") >= 1
    assert M.total(got, "hsd_requests_total", outcome="invalid", method="other") >= 1
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["ok"] == before["ok"]
    assert after["hsd_emitted_tokens_total"] - before["hsd_emitted_tokens_total"] == \
        len(first.token_ids)
    assert after["hsd_ttft_seconds_count"] == before["hsd_ttft_seconds_count"]


def test_drafter_failures_are_counted_as_fallback_rounds(loaded_model):
    from hsd_serve.engine.engine import Coordinator, TargetInfo
    from hsd_serve.engine.local import Engine

    class Down:
        async def open(self, *a, **k):
            raise ConnectionError("drafter down")

        draft = slrs_step = open

        async def free(self, rid):
            return None

    base = Engine(loaded_model("mistral-v0.1"), loaded_model("gpt2", seed=1))
    sink = M.PrometheusSink()
    t = base.target
    coord = Coordinator(base.coordinator.target, TargetInfo(t.tokenizer, t.eos_ids, t.max_context),
                        Down(), sink=sink, drafter_retry_rounds=2)
    want = base.generate(GenerationRequest("def f(x):", max_new_tokens=6, method="slem"))
    result = asyncio.run(coord.generate(GenerationRequest("def f(x):", max_new_tokens=6,
                                                          method="slem")))
    assert result.token_ids == want.token_ids  # still lossless
    got = _scrape(sink)
    assert M.total(got, "hsd_requests_total", outcome="ok", method="slem") == 1
    # every round that could draft fell back; the last round (one token left, k = 0) drafts
    # nothing by design and is not a fallback
    assert M.total(got, "hsd_fallback_rounds_total") == result.stats.fallback_rounds == \
        result.stats.rounds - 1
    assert M.total(got, "hsd_drafted_tokens_total") == 0


def test_a_broken_sink_never_fails_a_request(loaded_model):
    from hsd_serve.engine.local import Engine

    class Broken:
        def record_request(self, stats, outcome):
            raise RuntimeError("boom")

    engine = Engine(loaded_model("mistral-v0.1"), None, sink=Broken())
    assert engine.generate(GenerationRequest("hi", max_new_tokens=3, method="ar")).stats.rounds


# ------------------------------------------------------------------ hsd-serve generate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_generate_prints_and_serves_metrics(tiny_model_dir, capsys):
    from hsd_serve.cli import main

    target, drafter = str(tiny_model_dir("mistral-v0.1")), str(tiny_model_dir("gpt2", seed=1))
    common = ["generate", "--target", target, "--drafter", drafter, "--method", "slem",
              "--max-new-tokens", "8", "--json"]
    assert main(common + ["--print-metrics", "def fib(n):"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)["stats"]
    got = M.parse_scrape(err)
    assert M.total(got, "hsd_requests_total", outcome="ok", method="slem") == 1
    assert M.total(got, "hsd_drafted_tokens_total") == stats["drafted"]
    assert M.total(got, "hsd_accepted_tokens_total") == stats["accepted"]
    assert M.total(got, "hsd_rounds_total") == stats["rounds"]

    port = _free_port()
    rc = {}
    th = threading.Thread(target=lambda: rc.setdefault("rc", main(
        common + ["--metrics-port", str(port), "--metrics-hold-s", "4", "import os"])))
    th.start()
    deadline, text = time.time() + 120, ""
    while time.time() < deadline and th.is_alive():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            if M.total(M.parse_scrape(text.decode()), "hsd_requests_total") == 1:
                break
        except OSError:
            pass
        time.sleep(0.2)
    th.join(60)
    assert rc.get("rc") == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)["stats"]
    got = M.parse_scrape(text.decode())
    assert M.total(got, "hsd_requests_total", outcome="ok") == 1
    assert M.total(got, "hsd_emitted_tokens_total") == len(json.loads(out)["token_ids"])
    assert M.total(got, "hsd_rounds_total") == stats["rounds"]
    assert f"127.0.0.1:{port}/metrics" in err
    assert main(common + ["--metrics-port", "-3", "x"]) == 2
    assert "metrics" in capsys.readouterr().err


def test_draft_step_counters_add_what_the_proposer_counted_since_the_last_poll():
    """``DraftStepCounters`` turns the vLLM proposer's running totals into counter increments
    (a poll that fails changes nothing)."""
    import asyncio

    sink = M.PrometheusSink()
    polls = iter([{"ready": 3, "waited": 5, "late": 0, "stale": 7},
                  RuntimeError("engine busy"),
                  {"ready": 10, "waited": 6, "late": 2, "stale": 9, "busy_steps": 4,
                   "plain": 3}])

    async def poll():
        v = next(polls)
        if isinstance(v, Exception):
            raise v
        return v

    counters = M.DraftStepCounters(sink, poll)
    for _ in range(3):
        asyncio.run(counters.update())
    got = _scrape(sink)
    assert M.total(got, "hsd_draft_steps_total", result="ready") == 10
    assert M.total(got, "hsd_draft_steps_total", result="waited") == 6
    assert M.total(got, "hsd_draft_steps_total", result="late") == 2
    assert M.total(got, "hsd_draft_steps_total", result="busy") == 4
    assert M.total(got, "hsd_draft_steps_total", result="plain") == 3
    assert M.total(got, "hsd_stale_draft_tokens_total") == 9
