"""Prometheus metrics: every metric is named here, once (DESIGN.md §7).

The engine gathers plain data (:class:`~hsd_serve.engine.types.RequestStats`) and hands each
finished or failed request to a *sink*; :func:`request_samples` turns one request into counter
increments and histogram observations, and a sink applies them:

- :class:`PrometheusSink`: ``prometheus_client`` with its own registry (in-process ``generate``,
  ``bench``, tests).  Exposed names: ``hsd_<name>`` (counters end in ``_total``).
- :class:`RaySink`: ``ray.serve.metrics`` inside the cluster (replica tags ``deployment``,
  ``replica``, ``application`` are added by Ray Serve).  Ray's export adds ``ray_`` in front
  (``ray_hsd_<name>``), ``_total`` to counters, and shows values ~10 s after they are recorded.
  Ray's histogram ``_sum`` is approximate (Ray records bucket midpoints); ``_count`` and buckets
  are exact.

Labels are low-cardinality by construction: ``method`` (one of ``METHODS`` or ``other``),
``outcome`` (``OUTCOMES``), ``position`` (``0``..``15`` or ``16+``), ``component``
(coordinator, drafter, target).  Never a prompt, a request id or a free-form string.
"""

from __future__ import annotations

import asyncio
import logging
import math
import urllib.request
from dataclasses import dataclass
from typing import Optional, Protocol

from hsd_serve.engine.types import METHODS, RequestStats

log = logging.getLogger(__name__)

PREFIX = "hsd_"
RAY_PREFIX = "ray_"  # what Ray's metrics export puts in front of custom metric names

# A request's end: ok = a final result was produced; invalid = bad input (400/INVALID_ARGUMENT);
# error = failed while running; cancelled = the client went away; unavailable = no replica
# could be leased (backpressure, no target).
OUTCOMES = ("ok", "invalid", "error", "cancelled", "unavailable", "unauthenticated")
COMPONENTS = ("coordinator", "drafter", "target")
MAX_POSITION_LABEL = 16  # draft positions >= this share the label "16+"

REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                           120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROUND_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                         2.5, 5.0)


@dataclass(frozen=True)
class MetricDef:
    name: str  # without the prefix
    kind: str  # counter | histogram | gauge
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def full_name(self) -> str:
        """The name as ``prometheus_client`` exposes it (counters get ``_total`` there)."""
        return PREFIX + self.name

    def exposed(self, ray: bool = False) -> str:
        """The series base name in a scrape: ``hsd_x_total`` / ``ray_hsd_x_total`` for counters."""
        base = (RAY_PREFIX if ray else "") + PREFIX + self.name
        return base + "_total" if self.kind == "counter" else base


_M = ("method",)
METRICS: dict[str, MetricDef] = {m.name: m for m in (
    MetricDef("requests", "counter", "Requests by method and outcome.", ("method", "outcome")),
    MetricDef("drafted_tokens", "counter",
              "Draft tokens checked by the target (candidates per round, summed).", _M),
    MetricDef("accepted_tokens", "counter", "Draft tokens the target accepted.", _M),
    MetricDef("emitted_tokens", "counter", "Output tokens committed (completion tokens).", _M),
    MetricDef("drafted_tokens_by_position", "counter",
              "Draft tokens checked, by position within the round's draft (0 = first).",
              ("method", "position")),
    MetricDef("accepted_tokens_by_position", "counter",
              "Draft tokens accepted, by position within the round's draft (0 = first).",
              ("method", "position")),
    MetricDef("rounds", "counter", "Draft/verify rounds (one target forward each).", _M),
    MetricDef("fallback_rounds", "counter",
              "Rounds of a speculative method that ran target-only (no usable draft).", _M),
    MetricDef("ttft_seconds", "histogram", "Time to first token, per successful request.", _M,
              REQUEST_LATENCY_BUCKETS),
    MetricDef("tpot_seconds", "histogram",
              "Mean time per output token after the first, per successful request with more "
              "than one output token.", _M, TOKEN_LATENCY_BUCKETS),
    MetricDef("e2e_latency_seconds", "histogram",
              "End-to-end latency of the round loop, per successful request.", _M,
              REQUEST_LATENCY_BUCKETS),
    MetricDef("draft_latency_seconds", "histogram",
              "Time in the drafter in one round; every round of a speculative method "
              "(0 for target-only rounds).", _M, ROUND_LATENCY_BUCKETS),
    MetricDef("verify_latency_seconds", "histogram",
              "Time in the target's verify forward in one round; every round.", _M,
              ROUND_LATENCY_BUCKETS),
    MetricDef("transport_latency_seconds", "histogram",
              "Round wall time not spent drafting, verifying or bridging (network, "
              "serialization, scheduling); every round.", _M, ROUND_LATENCY_BUCKETS),
    MetricDef("draft_steps", "counter",
              "Drafting ahead (overlap): rounds (HF executor) or engine steps (vLLM executor) "
              "with drafts, by whether the draft was ready on arrival (drafted while the target "
              "verified the previous one), waited for, plain (none ready: the target took a "
              "plain step while the drafter drafted ahead, overlap_miss: plain), or late "
              "(vLLM: the step decoded plainly); vLLM: busy = engine steps over "
              "vllm.draft_max_batch requests, decoded plainly without asking for drafts.",
              ("result",)),
    MetricDef("branch_drafts", "counter",
              "Drafting ahead (overlap, HF executor): of the rounds whose draft was ready, those "
              "whose draft was a branch: another path the drafter guessed (a runner-up token "
              "where the target rejected a candidate or took its bonus token).", ()),
    MetricDef("stale_draft_tokens", "counter",
              "Drafting ahead (overlap): drafted-ahead tokens dropped because the target took "
              "another path.", ()),
    MetricDef("ongoing_requests", "gauge",
              "Requests in flight on this replica (coordinator: requests; drafter/target: "
              "open leases).", ("component",)),
    MetricDef("cache_sessions", "gauge",
              "Per-request cache sessions held by this replica.", ("component",)),
)}

COUNTERS = tuple(m for m in METRICS.values() if m.kind == "counter")
HISTOGRAMS = tuple(m for m in METRICS.values() if m.kind == "histogram")
GAUGES = tuple(m for m in METRICS.values() if m.kind == "gauge")


def method_label(method: object) -> str:
    """A method name safe to use as a label: one of ``METHODS``, else ``other``."""
    return method if isinstance(method, str) and method in METHODS else "other"


def position_label(i: int) -> str:
    return str(i) if i < MAX_POSITION_LABEL else f"{MAX_POSITION_LABEL}+"


@dataclass(frozen=True)
class Sample:
    metric: str  # a key of METRICS
    labels: tuple[tuple[str, str], ...]
    value: float


def request_samples(stats: RequestStats, outcome: str) -> list[Sample]:
    """Counter increments and histogram observations for one request that ended.

    Counters count the work done, whatever the outcome (a cancelled request's rounds ran).
    Request histograms (TTFT, TPOT, end-to-end) take one sample per ``ok`` request (TPOT only
    when it emitted more than one token); round histograms take one sample per round (draft:
    only for speculative methods, where every round is sampled, target-only rounds as 0).
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}")
    m = method_label(stats.method)
    lm = (("method", m),)
    out = [Sample("requests", (("method", m), ("outcome", outcome)), 1.0)]
    for name, value in (("drafted_tokens", stats.drafted), ("accepted_tokens", stats.accepted),
                        ("emitted_tokens", stats.emitted), ("rounds", stats.rounds),
                        ("fallback_rounds", stats.fallback_rounds)):
        if value:
            out.append(Sample(name, lm, float(value)))
    by_pos: dict[str, list[float]] = {}
    for i, (d, a) in enumerate(zip(stats.drafted_per_position, stats.accepted_per_position)):
        acc = by_pos.setdefault(position_label(i), [0.0, 0.0])
        acc[0] += d
        acc[1] += a
    for pos, (d, a) in by_pos.items():
        labels = (("method", m), ("position", pos))
        if d:
            out.append(Sample("drafted_tokens_by_position", labels, d))
        if a:
            out.append(Sample("accepted_tokens_by_position", labels, a))
    for result, value in (("ready", stats.ahead_ready), ("waited", stats.ahead_waited),
                          ("plain", stats.ahead_plain)):
        if value:  # HF executor drafting ahead (the vLLM executor's come from its replicas)
            out.append(Sample("draft_steps", (("result", result),), float(value)))
    if stats.ahead_branch:
        out.append(Sample("branch_drafts", (), float(stats.ahead_branch)))
    if stats.ahead_stale:
        out.append(Sample("stale_draft_tokens", (), float(stats.ahead_stale)))
    if outcome == "ok":
        out.append(Sample("ttft_seconds", lm, _seconds(stats.ttft_s)))
        out.append(Sample("e2e_latency_seconds", lm, _seconds(stats.wall_s)))
        if stats.emitted > 1:
            out.append(Sample("tpot_seconds", lm, _seconds(stats.tpot_s)))
    if m != "ar":
        out.extend(Sample("draft_latency_seconds", lm, _seconds(v)) for v in stats.round_draft_s)
    out.extend(Sample("verify_latency_seconds", lm, _seconds(v)) for v in stats.round_verify_s)
    out.extend(Sample("transport_latency_seconds", lm, _seconds(v))
               for v in stats.round_transport_s)
    return out


def _seconds(v: float) -> float:
    v = float(v)
    return v if math.isfinite(v) and v > 0 else 0.0


class MetricsSink(Protocol):
    """Where the engine reports requests (``Coordinator(sink=...)``) and replicas set gauges."""

    def record_request(self, stats: RequestStats, outcome: str) -> None: ...

    def set_gauge(self, name: str, value: float, **labels: str) -> None: ...


class _SinkBase:
    def record_request(self, stats: RequestStats, outcome: str) -> None:
        for s in request_samples(stats, outcome):
            self._apply(s)

    def _apply(self, s: Sample) -> None:
        raise NotImplementedError

    @staticmethod
    def _gauge_def(name: str, labels: dict) -> MetricDef:
        m = METRICS.get(name)
        if m is None or m.kind != "gauge":
            raise ValueError(f"{name!r} is not a gauge; gauges: {[g.name for g in GAUGES]}")
        if set(labels) != set(m.labels):
            raise ValueError(f"gauge {name} takes labels {m.labels}, got {tuple(labels)}")
        comp = labels.get("component")
        if comp is not None and comp not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {comp!r}")
        return m


class PrometheusSink(_SinkBase):
    """``prometheus_client`` metrics in a registry of their own (never the global one)."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = {}
        for m in METRICS.values():
            if m.kind == "counter":
                obj = Counter(m.full_name, m.help, m.labels, registry=self.registry)
            elif m.kind == "histogram":
                obj = Histogram(m.full_name, m.help, m.labels, buckets=m.buckets,
                                registry=self.registry)
            else:
                obj = Gauge(m.full_name, m.help, m.labels, registry=self.registry)
            self._metrics[m.name] = obj

    def _apply(self, s: Sample) -> None:
        m = METRICS[s.metric]
        obj = self._metrics[s.metric]
        child = obj.labels(**dict(s.labels)) if m.labels else obj
        if m.kind == "counter":
            child.inc(s.value)
        else:
            child.observe(s.value)

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        self._gauge_def(name, labels)
        self._metrics[name].labels(**labels).set(value)

    def render(self) -> str:
        """The Prometheus text exposition of this sink's registry."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server (call
        ``shutdown()`` to stop).  Port 0 picks a free port (``server.server_port``)."""
        from prometheus_client import start_http_server

        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be in [0, 65535], got {port!r}")
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server


class RaySink(_SinkBase):
    """``ray.serve.metrics`` (``ray.util.metrics`` with Ray Serve's replica tags) in this process.

    Create it inside a replica (e.g. in the deployment's ``__init__``) so the tags are set.
    """

    def __init__(self):
        from ray.serve import metrics as rm

        self._metrics = {}
        for m in METRICS.values():
            if m.kind == "counter":
                obj = rm.Counter(m.full_name, description=m.help, tag_keys=m.labels)
            elif m.kind == "histogram":
                obj = rm.Histogram(m.full_name, description=m.help, boundaries=list(m.buckets),
                                   tag_keys=m.labels)
            else:
                obj = rm.Gauge(m.full_name, description=m.help, tag_keys=m.labels)
            self._metrics[m.name] = obj

    def _apply(self, s: Sample) -> None:
        m = METRICS[s.metric]
        tags = dict(s.labels)
        if m.kind == "counter":
            if s.value > 0:  # Ray's Counter.inc rejects 0
                self._metrics[s.metric].inc(s.value, tags=tags)
        else:
            self._metrics[s.metric].observe(s.value, tags=tags)

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        self._gauge_def(name, labels)
        self._metrics[name].set(value, tags=labels)


# ------------------------------------------------------------------ Ray's metrics export


def ray_metrics_url() -> str:
    """``http://HOST:PORT/metrics`` of the Ray metrics export of the node this process is on."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            port = int(node.get("MetricsExportPort") or 0)
            if port <= 0:
                raise RuntimeError("this Ray node has no metrics export port")
            return f"http://{node.get('NodeManagerAddress') or '127.0.0.1'}:{port}/metrics"
    raise RuntimeError(f"Ray node {node_id} not found in ray.nodes()")


class RayMetricsProxy:
    """Reads this node's Ray metrics export (so the coordinator's ``/metrics`` shows it)."""

    def __init__(self, url: Optional[str] = None, timeout_s: float = 10.0):
        self.url = url
        self.timeout_s = timeout_s

    def _fetch(self) -> tuple[bytes, str]:
        if self.url is None:
            self.url = ray_metrics_url()
        with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
            return resp.read(), resp.headers.get("Content-Type",
                                                 "text/plain; version=0.0.4; charset=utf-8")

    async def scrape(self) -> tuple[bytes, str]:
        """(body, content type); raises ``RuntimeError`` naming the export when it fails."""
        try:
            return await asyncio.to_thread(self._fetch)
        except Exception as exc:  # noqa: BLE001 - reported as one clear error
            url, self.url = self.url, None  # look the port up again next time
            raise RuntimeError(f"Ray metrics export {url or '(unknown)'} unreachable: "
                               f"{type(exc).__name__}: {exc}") from exc


def mount_metrics_route(app, proxy: Optional[RayMetricsProxy] = None,
                        path: str = "/metrics", dependencies=None) -> None:
    """Add ``GET /metrics`` to a FastAPI app: this node's Ray metrics export, passed through
    (``ray_hsd_*``, ``ray_serve_*`` and Ray's own metrics: one scrape shows everything
    locally).  503 with a one-line reason when the export cannot be read.  ``dependencies``:
    FastAPI dependencies of the route (e.g. the API-key check)."""
    from fastapi.responses import PlainTextResponse, Response

    proxy = proxy or RayMetricsProxy()

    @app.get(path, include_in_schema=False, dependencies=dependencies)
    async def _metrics() -> Response:
        try:
            body, content_type = await proxy.scrape()
        except RuntimeError as exc:
            return PlainTextResponse(f"metrics unavailable: {exc}\n", status_code=503)
        return Response(content=body, media_type=content_type)


class ReplicaGauges:
    """Keeps a replica's ``ongoing_requests``/``cache_sessions`` gauges current: set on every
    change the caller reports (:meth:`update`) and refreshed every ``interval_s`` by a task."""

    def __init__(self, sink: MetricsSink, component: str, ongoing, sessions=None,
                 interval_s: float = 2.0):
        self.sink, self.component = sink, component
        self.ongoing, self.sessions = ongoing, sessions  # () -> number
        self.interval_s = interval_s
        self.task: Optional[asyncio.Task] = None
        self.update()

    def update(self) -> None:
        try:
            self.sink.set_gauge("ongoing_requests", float(self.ongoing()),
                                component=self.component)
            if self.sessions is not None:
                self.sink.set_gauge("cache_sessions", float(self.sessions()),
                                    component=self.component)
        except Exception as exc:  # noqa: BLE001 - metrics must not break serving
            log.warning("gauge update failed: %s: %s", type(exc).__name__, exc)

    def start(self) -> "ReplicaGauges":
        """Start the refresh task on the running event loop."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval_s)
                self.update()

        self.task = asyncio.get_running_loop().create_task(loop())
        return self


class DraftStepCounters:
    """A vLLM target replica's proposer counters (``VllmTarget.draft_stats``, kept in vLLM's
    worker process) as ``hsd_draft_steps_total`` / ``hsd_stale_draft_tokens_total``: the
    increments since the last poll, every ``interval_s``."""

    def __init__(self, sink, poll, interval_s: float = 2.0):
        self.sink, self.poll, self.interval_s = sink, poll, interval_s
        self.last: dict = {}
        self.task: Optional[asyncio.Task] = None

    async def update(self) -> None:
        try:
            now = await self.poll()
        except Exception as exc:  # noqa: BLE001 - metrics must not break serving
            log.debug("draft stats poll failed: %s", exc)
            return
        delta = {k: now.get(k, 0) - self.last.get(k, 0) for k in now}
        self.last = dict(now)
        for key, result in (("ready", "ready"), ("waited", "waited"), ("plain", "plain"),
                            ("late", "late"), ("busy_steps", "busy")):
            if delta.get(key, 0) > 0:
                self.sink._apply(Sample("draft_steps", (("result", result),), delta[key]))
        if delta.get("stale", 0) > 0:
            self.sink._apply(Sample("stale_draft_tokens", (), delta["stale"]))

    def start(self) -> "DraftStepCounters":
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval_s)
                await self.update()

        self.task = asyncio.get_running_loop().create_task(loop())
        return self


# ------------------------------------------------------------------ reading a scrape


def parse_scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """Samples of a Prometheus text exposition as ``{(name, frozenset(labels)): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            out[key] = out.get(key, 0.0) + s.value
    return out


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
