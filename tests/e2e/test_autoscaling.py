"""Autoscaling, exercised: a load ramp 1 → 16 → 1 → 0 streams through the real service makes the
drafter pool grow from zero and shrink back to zero, and the target pool grow and shrink on its
own schedule (replica counts from Ray Serve's own status), with every greedy output identical to
the target alone, no failed request, and every cache freed after scale-down.

The first request finds no drafter replica: it is served at once, target-only (exact), while its
lease makes Serve start one.  Bounded: the ramp takes about a minute; every wait has a deadline.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.convert import method_to_proto
from tests.e2e.faultkit import deploy, replica_stats, tiny_args, undeploy, wait_for

APP, ROUTE = "hsd-ramp", "/ramp"
PROMPTS = ["def fib(n):", "Once upon a time", "import numpy as np\n", "The capital of",
           "for i in range(", "class Stack:\n", "SELECT * FROM", "Dear team,"]
MAX_TOKENS = 24
FAST = {"metrics_interval_s": 0.5, "look_back_period_s": 1.0}
# drafters: one per 2 open leases, up at once, down after 3 s, to zero after 3 s idle
DRAFTER = {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2,
           "upscale_delay_s": 0, "downscale_delay_s": 3, "downscale_to_zero_delay_s": 3, **FAST}
# targets: one per 6 requests, up only after 10 s of load, down after 3 s
TARGET = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 6,
          "upscale_delay_s": 10, "downscale_delay_s": 3, **FAST}


def _running(status_app, deployment: str) -> int:
    states = status_app.deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) ==
               "RUNNING")


class Monitor(threading.Thread):
    """Replica counts from ``serve.status()`` every 0.25 s: (t, drafters, targets)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        from ray import serve

        while not self.stop.is_set():
            app = serve.status().applications.get(APP)
            if app is not None:
                self.samples.append((time.monotonic() - self.t0, _running(app, "Drafter"),
                                     _running(app, "Target")))
            self.stop.wait(0.25)


class Load:
    """``streams(n)`` sets how many client streams loop greedy SLEM requests."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = hsd_pb2_grpc.GenerationStub(self.channel)
        self.wanted = 0
        self.threads: list[threading.Thread] = []
        self.results: list[tuple[int, list[int], int, int]] = []  # prompt, ids, drafted, t_end
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def streams(self, n: int) -> None:
        self.wanted = n
        while len([t for t in self.threads if t.is_alive()]) < n:
            i = len(self.threads)
            t = threading.Thread(target=self._loop, args=(i,), daemon=True)
            self.threads.append(t)
            t.start()

    def _loop(self, i: int) -> None:
        k = i
        while True:
            alive = [t for t in self.threads if t.is_alive()]
            if alive.index(threading.current_thread()) >= self.wanted:
                return
            p = k % len(PROMPTS)
            k += 1
            req = hsd_pb2.GenerateRequest(prompt=PROMPTS[p], max_tokens=MAX_TOKENS,
                                          method=method_to_proto("slem"), lookahead=3,
                                          sampling=hsd_pb2.SamplingParams(temperature=0))
            try:
                r = self.stub.Generate(req, metadata=(("application", APP),), timeout=120)
                with self.lock:
                    self.results.append((p, list(r.token_ids), r.stats.drafted,
                                         time.monotonic()))
            except grpc.RpcError as exc:
                with self.lock:
                    self.failures.append(f"{exc.code()}: {exc.details()}")

    def drain(self, timeout_s: float = 120) -> None:
        self.wanted = 0
        for t in self.threads:
            t.join(timeout_s)
        assert not any(t.is_alive() for t in self.threads), "a client stream hung"


@pytest.fixture(scope="module")
def ramp_app(service):
    args = tiny_args(service,
                     drafter_deployment={"num_replicas": None, "num_cpus": 0.05,
                                         "autoscaling_config": DRAFTER},
                     target_deployment={"num_replicas": None, "num_cpus": 0.05,
                                        "autoscaling_config": TARGET},
                     coordinator_deployment={"num_cpus": 0.05, "max_ongoing_requests": 64})
    deploy(APP, args, ROUTE)
    yield service
    undeploy(APP)


def test_load_ramp_scales_drafters_from_zero_and_targets_apart(ramp_app, service):
    from ray import serve

    app = serve.status().applications[APP]
    assert _running(app, "Drafter") == 0 and _running(app, "Target") == 1
    monitor = Monitor()
    monitor.start()
    load = Load(service["grpc"])
    try:
        # 1 stream: the first request finds no drafter and is served at once, target-only
        load.streams(1)
        wait_for(lambda: load.results, 60, what="the first request")
        first_done = monitor.samples[-1] if monitor.samples else (0, 0, 0)
        wait_for(lambda: monitor.samples and monitor.samples[-1][1] >= 1, 60,
                 what="a drafter replica started by the first lease")
        # 16 streams: drafters grow to 3 at once, targets to 2 after their 10 s delay
        load.streams(16)
        wait_for(lambda: max(s[1] for s in monitor.samples) >= 3
                 and max(s[2] for s in monitor.samples) >= 2, 90,
                 what=lambda: f"scale-up (samples {monitor.samples[-3:]})")
        t_peak = time.monotonic() - monitor.t0
        time.sleep(3)
        # back to 1 stream: both pools shrink
        load.streams(1)
        wait_for(lambda: monitor.samples[-1][1] <= 1 and monitor.samples[-1][2] == 1, 90,
                 what=lambda: f"scale-down (samples {monitor.samples[-3:]})")
        load.drain()
        # no load: drafters go to zero
        wait_for(lambda: monitor.samples[-1][1] == 0, 90,
                 what=lambda: f"drafters to zero (samples {monitor.samples[-3:]})")
    finally:
        load.drain()
        monitor.stop.set()
        monitor.join(10)
        load.channel.close()

    assert load.failures == []
    drafters = [s[1] for s in monitor.samples]
    targets = [s[2] for s in monitor.samples]
    assert drafters[0] == 0 and max(drafters) == 3 and drafters[-1] == 0
    assert targets[0] == 1 and max(targets) == 2 and targets[-1] == 1
    # the two pools moved on their own schedules: drafters grew (decided at once) before the
    # targets did (decided after their 10 s delay; replicas take seconds to start either way)
    t_d2 = next(t for t, d, _ in monitor.samples if d >= 2)
    t_t2 = next(t for t, _, n in monitor.samples if n >= 2)
    assert t_d2 < t_t2 <= t_peak
    assert first_done[1] == 0  # the first request ended before any drafter was running ...
    first = min(load.results, key=lambda r: r[3])
    assert first[2] == 0  # ... having drafted nothing: target-only
    assert sum(r[2] for r in load.results) > 0  # later requests drafted
    # every greedy output is the target alone's (AR through the same service)
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as ch:
        stub = hsd_pb2_grpc.GenerationStub(ch)
        ar = {}
        for p in sorted({r[0] for r in load.results}):
            req = hsd_pb2.GenerateRequest(prompt=PROMPTS[p], max_tokens=MAX_TOKENS,
                                          method=method_to_proto("ar"),
                                          sampling=hsd_pb2.SamplingParams(temperature=0))
            ar[p] = list(stub.Generate(req, metadata=(("application", APP),),
                                       timeout=120).token_ids)
    assert len(load.results) >= 30
    assert all(ids == ar[p] for p, ids, _, _ in load.results)
    # caches freed on the replicas left after scale-down
    wait_for(lambda: all(s["sessions"] == 0 and s["leases_active"] == 0
                         for s in replica_stats(APP, "Target", 1).values()), 30,
             what="target caches freed")
