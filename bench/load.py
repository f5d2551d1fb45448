"""Bounded load against a running hsd service on this machine (loopback only).

Holds ``--concurrency`` gRPC ``GenerateStream`` calls open for ``--duration`` seconds (each
worker starts its next request as soon as one finishes), then reports errors by status code,
request latency and time to first token (p50/p90/p99), throughput, and the resident memory of
the service's replica processes sampled over time (to show it stays flat after warm-up).

    python bench/load.py --endpoint 127.0.0.1:9000 --concurrency 64 --duration 300 \\
        --json runs/load.json

Replica processes are found without Ray: the process listening on the endpoint's port is Ray
Serve's proxy; its parent is the node's raylet, whose children titled
``ray::ServeReplica:<application>:<Deployment>`` are the replicas (``--pids`` overrides).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

PROMPTS = [
    "def fib(n):\n    ",
    "Once upon a time, there was a little girl named Lily.",
    "import numpy as np\n\ndef softmax(x):\n",
    "SELECT name, COUNT(*) FROM users WHERE",
    "The capital of France is",
    "class Stack:\n    def __init__(self):\n",
    "Dear Sir or Madam,\n\nI am writing to",
    "for (int i = 0; i < n; i++) {",
]


# ------------------------------------------------------------------------------ processes
def _is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback
                       for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def _pid_of_listener(port: int) -> Optional[int]:
    wanted = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not wanted:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return int(pid)
        except OSError:
            continue
    return None


def _proc(pid: int) -> tuple[int, str]:
    """(parent pid, command line) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    ppid = int(stat[stat.rindex(")") + 2:].split()[1])
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ppid, cmd.strip()


def find_replica_pids(port: int, application: str) -> dict[str, int]:
    """{"Deployment#pid": pid} of the application's replicas behind the proxy on ``port``."""
    proxy = _pid_of_listener(port)
    if proxy is None:
        return {}
    raylet, _ = _proc(proxy)
    out = {}
    prefix = f"ray::ServeReplica:{application}:"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid, cmd = _proc(int(pid))
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and cmd.startswith(prefix):
            role = cmd[len(prefix):].split(".", 1)[0].split()[0]
            out[f"{role}#{pid}"] = int(pid)
    return out


def rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------ load
@dataclass
class LoadReport:
    endpoint: str
    application: str
    concurrency: int
    duration_s: float
    max_tokens: int
    method: str
    requests_ok: int = 0
    errors: dict = field(default_factory=dict)  # status code name -> count
    error_examples: list = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    latency_s: dict = field(default_factory=dict)  # p50/p90/p99/max of whole requests
    ttft_s: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    fallback_rounds: int = 0
    rss_mb: list = field(default_factory=list)  # [t, {replica: MB}] samples
    rss_summary: dict = field(default_factory=dict)  # replica -> {warm, end, max, growth}

    def as_dict(self) -> dict:
        return asdict(self)


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)

    def q(p):
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 4)

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": round(xs[-1], 4),
            "mean": round(statistics.fmean(xs), 4), "n": len(xs)}


async def run_load(endpoint: str, *, application: str = "hsd", concurrency: int = 8,
                   duration_s: float = 10.0, max_tokens: int = 64, method: str = "",
                   temperature: float = 0.0, request_timeout_s: float = 120.0,
                   sample_every_s: float = 2.0, warmup_fraction: float = 0.2,
                   pids: Optional[dict[str, int]] = None, seed: int = 0,
                   progress: bool = False) -> LoadReport:
    import grpc

    from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
    from hsd_serve.serve.convert import method_to_proto

    method_value = method_to_proto(method)  # "" = the server's default; a bad name fails here
    host, _, port = endpoint.rpartition(":")
    if not _is_loopback(host):
        raise ValueError(f"refusing to load {endpoint}: this tool only targets loopback")
    report = LoadReport(endpoint, application, concurrency, duration_s, max_tokens, method)
    pids = dict(pids) if pids is not None else find_replica_pids(int(port), application)
    latencies: list[float] = []
    ttfts: list[float] = []
    rng = random.Random(seed)
    meta = (("application", application),)
    t_start = time.monotonic()
    deadline = t_start + duration_s

    async def sampler():
        while True:
            sample = {name: rss_mb(pid) for name, pid in pids.items()}
            report.rss_mb.append([round(time.monotonic() - t_start, 1),
                                  {k: round(v, 1) for k, v in sample.items() if v is not None}])
            if progress:
                print(f"[{time.monotonic() - t_start:6.1f}s] ok={report.requests_ok} "
                      f"errors={sum(report.errors.values())} rss={report.rss_mb[-1][1]}",
                      file=sys.stderr, flush=True)
            await asyncio.sleep(sample_every_s)

    async def worker(stub, w: int):
        while time.monotonic() < deadline:
            req = hsd_pb2.GenerateRequest(
                prompt=rng.choice(PROMPTS), max_tokens=max_tokens, method=method_value,
                sampling=hsd_pb2.SamplingParams(temperature=temperature,
                                                seed=rng.randrange(2**31)))
            t0 = time.monotonic()
            first = None
            n = 0
            last = None
            try:
                async for chunk in stub.GenerateStream(req, metadata=meta,
                                                       timeout=request_timeout_s):
                    if first is None:
                        first = time.monotonic() - t0
                    n += len(chunk.token_ids)
                    last = chunk
                if last is None or not last.finish_reason:
                    raise RuntimeError("stream ended without a final chunk")
            except Exception as exc:  # noqa: BLE001 - counted by kind
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else \
                    type(exc).__name__
                report.errors[code] = report.errors.get(code, 0) + 1
                if len(report.error_examples) < 5:
                    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    report.error_examples.append(f"{code}: {detail}"[:300])
                await asyncio.sleep(0.1)
                continue
            latencies.append(time.monotonic() - t0)
            ttfts.append(first)
            report.requests_ok += 1
            report.tokens += n
            report.fallback_rounds += last.stats.fallback_rounds

    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        stub = hsd_pb2_grpc.GenerationStub(channel)
        sampling = asyncio.ensure_future(sampler())
        try:
            await asyncio.wait_for(
                asyncio.gather(*(worker(stub, w) for w in range(concurrency))),
                duration_s + request_timeout_s + 30)
        finally:
            sampling.cancel()
    report.wall_s = round(time.monotonic() - t_start, 2)
    report.rss_mb.append([report.wall_s, {k: round(v, 1) for k, v in
                                          ((n, rss_mb(p)) for n, p in pids.items())
                                          if v is not None}])
    report.latency_s = _pcts(latencies)
    report.ttft_s = _pcts(ttfts)
    report.tokens_per_s = round(report.tokens / report.wall_s, 1) if report.wall_s else 0.0
    report.requests_per_s = round(report.requests_ok / report.wall_s, 2) if report.wall_s else 0.0
    warm_t = duration_s * warmup_fraction
    for name in pids:
        series = [(t, s[name]) for t, s in report.rss_mb if name in s]
        if not series:
            continue
        warm = next((v for t, v in series if t >= warm_t), series[-1][1])
        report.rss_summary[name] = {"start": series[0][1], "warm": warm, "end": series[-1][1],
                                    "max": max(v for _, v in series),
                                    "growth_after_warmup": round(series[-1][1] - warm, 1)}
    return report


def format_report(r: LoadReport) -> str:
    lines = [f"load: {r.concurrency} streams x {r.duration_s:.0f}s against {r.endpoint} "
             f"(app {r.application!r}, max_tokens {r.max_tokens}, method {r.method or 'auto'})",
             f"  requests ok {r.requests_ok}, errors {sum(r.errors.values())} {r.errors or ''}",
             f"  throughput {r.requests_per_s} req/s, {r.tokens_per_s} tokens/s "
             f"({r.tokens} tokens in {r.wall_s}s); fallback rounds {r.fallback_rounds}",
             f"  latency  {r.latency_s}", f"  TTFT     {r.ttft_s}"]
    for name, s in sorted(r.rss_summary.items()):
        lines.append(f"  RSS {name:22s} start {s['start']:7.1f} MB  after warm-up {s['warm']:7.1f}"
                     f"  end {s['end']:7.1f}  max {s['max']:7.1f}  "
                     f"growth {s['growth_after_warmup']:+.1f} MB")
    for e in r.error_examples:
        lines.append(f"  e.g. {e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default="127.0.0.1:9000", help="gRPC host:port (loopback)")
    ap.add_argument("--application", default="hsd")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--method", default="", help="'' = the server's default")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling, seconds")
    ap.add_argument("--pids", default="", help="name=pid,... replicas to sample (default: "
                                                "found from the endpoint)")
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    pids = None
    if args.pids:
        pids = {k: int(v) for k, v in (p.split("=") for p in args.pids.split(","))}
    report = asyncio.run(run_load(
        args.endpoint, application=args.application, concurrency=args.concurrency,
        duration_s=args.duration, max_tokens=args.max_tokens, method=args.method,
        temperature=args.temperature, request_timeout_s=args.timeout,
        sample_every_s=args.sample_every, pids=pids, progress=not args.quiet))
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=1))
    return 1 if report.errors or not report.requests_ok else 0


if __name__ == "__main__":
    sys.exit(main())
