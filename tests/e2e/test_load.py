"""A short, bounded run of the load script (bench/load.py) against the session service:
8 concurrent streams for 10 s, zero errors, latencies reported, replica memory sampled."""

from __future__ import annotations

import asyncio

from bench.load import find_replica_pids, format_report, run_load
from tests.e2e.faultkit import watchdog  # noqa: F401


def test_short_load_run_has_no_errors(service):
    pids = find_replica_pids(service["grpc"], "hsd")
    assert {name.split("#")[0] for name in pids} >= {"Coordinator", "Drafter", "Target"}, pids
    report = asyncio.run(run_load(f"127.0.0.1:{service['grpc']}", application="hsd",
                                  concurrency=8, duration_s=10, max_tokens=32,
                                  sample_every_s=1.0, pids=pids))
    print("\n" + format_report(report))
    assert report.errors == {}, report.error_examples
    assert report.requests_ok >= 8
    assert report.latency_s["p99"] < 60 and report.ttft_s["p50"] > 0
    assert report.rss_summary and all(s["max"] > 0 for s in report.rss_summary.values())


def test_load_tool_refuses_non_loopback_targets():
    import pytest

    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_load("10.1.2.3:9000", duration_s=1))
