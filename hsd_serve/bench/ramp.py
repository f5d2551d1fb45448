"""``hsd-serve bench --endpoint … --ramp 1,4,16,4,1 --step-s N``: a load ramp against a running
service, and what it did over time.

Client streams loop requests of one method (the first of ``--methods`` that drafts, else the
first) over the dataset's prompts; the number of streams follows ``--ramp``, one step every
``--step-s`` seconds (a stream that is asked to stop finishes its request first).  Every
``interval_s`` a sampler records the streams, the tokens and the drafts of the requests that
ended in that interval (aggregate tokens/s, acceptance) and, when this process can reach the Ray
cluster (``ray.init(address="auto")``), the RUNNING replicas of every deployment of the
application from ``serve.status()``.  Greedy runs end with one AR request per prompt used and
check that every output of the ramp is the AR output (``identical_to_ar``).

Written to ``--out``: ``results.json`` (the timeline, the schedule, failures, identity, the
command and the machine) and ``ramp.png`` (tokens/s and streams, acceptance, replicas per
deployment, on one time axis).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Optional

from hsd_serve.bench.datasets import load_prompts
from hsd_serve.bench.runner import PLAIN, BenchConfig, RunSpec, machine_info


class _Streams:
    """``set(n)``: n client threads loop requests (extra ones stop after their request)."""

    def __init__(self, client, dataset: str, prompts, spec: RunSpec, cfg: BenchConfig):
        self.client, self.dataset, self.prompts, self.spec, self.cfg = \
            client, dataset, prompts, spec, cfg
        self.wanted = 0
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.done: list[tuple[float, object]] = []  # (monotonic end, Sample)
        self.failures: list[dict] = []
        self.next_prompt = 0

    def set(self, n: int) -> None:
        self.wanted = n
        while sum(t.is_alive() for t in self.threads) < n:
            t = threading.Thread(target=self._loop, daemon=True)
            self.threads.append(t)
            t.start()

    def active(self) -> int:
        return min(self.wanted, sum(t.is_alive() for t in self.threads))

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            with self.lock:
                alive = [t for t in self.threads if t.is_alive()]
                if alive.index(me) >= self.wanted:
                    return
                i = self.next_prompt
                self.next_prompt += 1
            j = i % len(self.prompts)
            try:
                s = self.client.generate(self.dataset, self.prompts[j], self.spec,
                                         self.cfg.max_new_tokens, self.cfg.seed + j,
                                         concurrency=self.wanted)
                with self.lock:
                    self.done.append((time.monotonic(), s))
            except Exception as exc:  # noqa: BLE001 - counted, the ramp goes on
                with self.lock:
                    self.failures.append({"prompt": self.prompts[j].id,
                                          "error": f"{type(exc).__name__}: {exc}"[:300]})

    def stop(self, timeout_s: float) -> None:
        self.wanted = 0
        for t in self.threads:
            t.join(timeout_s)


def _replica_counter(application: str):
    """A function returning {deployment: RUNNING replicas} from ``serve.status()`` (None when
    this process cannot reach the cluster)."""
    try:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    except Exception:  # noqa: BLE001 - no cluster here: no replica counts
        return None

    def count() -> Optional[dict]:
        try:
            app = serve.status().applications.get(application)
        except Exception:  # noqa: BLE001
            return None
        if app is None:
            return None
        return {name: sum(n for st, n in d.replica_states.items()
                          if str(getattr(st, "value", st)) == "RUNNING")
                for name, d in app.deployments.items()}

    return count


def ramp_spec(cfg: BenchConfig) -> RunSpec:
    drafting = [m for m in cfg.methods if m not in PLAIN]
    method = (drafting or list(cfg.methods) or ["auto"])[0]
    return RunSpec(method, cfg.temperatures[0], cfg.lookaheads[0])


def run_ramp(cfg: BenchConfig, schedule: list[int], step_s: float, *,
             interval_s: float = 1.0, progress: bool = True, replicas="auto") -> dict:
    """``replicas``: "auto" (``serve.status()`` when the Ray cluster is reachable), None (no
    replica counts) or a function returning {deployment: replicas}."""
    from hsd_serve.bench.remote import GrpcClient, HttpClient, parse_endpoint

    if not cfg.endpoint:
        raise ValueError("--ramp measures a running service: give --endpoint")
    if not schedule or any(n < 0 for n in schedule) or step_s <= 0:
        raise ValueError("--ramp: non-negative stream counts; --step-s > 0")
    kind, address = parse_endpoint(cfg.endpoint)
    app = cfg.application.split(",")[0].strip() or "hsd"
    client = (GrpcClient(address, app, cfg.timeout_s) if kind == "grpc"
              else HttpClient(address, cfg.timeout_s))
    dataset = cfg.datasets[0]
    prompts = load_prompts(dataset, cfg.data_dir, cfg.limit)
    if not prompts:
        raise ValueError(f"--ramp: no prompts in {dataset}")
    spec = ramp_spec(cfg)
    if replicas == "auto":
        replicas = _replica_counter(app)
    streams = _Streams(client, dataset, prompts, spec, cfg)
    timeline: list[dict] = []
    started = time.time()
    t0 = time.monotonic()
    seen = 0

    def sample() -> None:
        nonlocal seen
        now = time.monotonic()
        with streams.lock:
            new = streams.done[seen:]
            seen = len(streams.done)
            failed = len(streams.failures)
        prev = timeline[-1]["t"] if timeline else 0.0
        dt = max(1e-9, (now - t0) - prev)
        tokens = sum(len(s.token_ids) for _, s in new)
        drafted = sum(s.drafted for _, s in new)
        accepted = sum(s.accepted for _, s in new)
        timeline.append({"t": round(now - t0, 3), "streams": streams.active(),
                         "requests": len(new), "tokens": tokens,
                         "tokens_per_s": tokens / dt, "drafted": drafted, "accepted": accepted,
                         "acceptance": accepted / drafted if drafted else None,
                         "failures": failed, "replicas": replicas() if replicas else None})
        if progress:
            r = timeline[-1]
            print(f"ramp t={r['t']:6.1f}s streams={r['streams']:3d} "
                  f"{r['tokens_per_s']:7.1f} tok/s replicas={r['replicas']}", flush=True)

    try:
        for n in schedule:
            streams.set(n)
            step_end = time.monotonic() + step_s
            while time.monotonic() < step_end:
                time.sleep(max(0.0, min(interval_s, step_end - time.monotonic())))
                sample()
        streams.stop(cfg.timeout_s)
        sample()
        identity = _check_identity(client, dataset, prompts, spec, cfg, streams.done)
    finally:
        streams.stop(cfg.timeout_s)
        client.close()
    samples = [s for _, s in streams.done]
    total_tokens = sum(len(s.token_ids) for s in samples)
    wall = time.monotonic() - t0
    return {"ramp": {"schedule": list(schedule), "step_s": step_s, "interval_s": interval_s,
                     "application": app, "endpoint": cfg.endpoint, "method": spec.method,
                     "temperature": spec.temperature, "lookahead": spec.lookahead,
                     "dataset": dataset, "max_new_tokens": cfg.max_new_tokens,
                     "requests": len(samples), "failures": streams.failures,
                     "tokens": total_tokens, "wall_s": wall,
                     "tokens_per_s": total_tokens / wall if wall else 0.0,
                     "drafted": sum(s.drafted for s in samples),
                     "accepted": sum(s.accepted for s in samples),
                     "replica_counts": replicas is not None, **identity},
            "timeline": timeline, "machine": machine_info(), "command": cfg.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}


def _check_identity(client, dataset, prompts, spec, cfg, done) -> dict:
    """Greedy: every output of the ramp against one AR request per prompt used."""
    if spec.temperature > 0:
        return {"identical_to_ar": None, "identity_note": "sampled: not compared"}
    ar_spec = RunSpec("ar", 0.0, 1)
    by_id = {p.id: p for p in prompts}
    ref: dict[str, list[int]] = {}
    mismatched = []
    for _, s in done:
        pid = s.prompt_id
        if pid not in ref:
            p = by_id[pid]
            ref[pid] = list(client.generate(dataset, p, ar_spec, cfg.max_new_tokens,
                                            cfg.seed).token_ids)
        if list(s.token_ids) != ref[pid]:
            mismatched.append(pid)
    return {"identical_to_ar": not mismatched, "mismatched_prompts": sorted(set(mismatched)),
            "ar_references": len(ref)}


def write_ramp(results: dict, out_dir: str, *, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json"]
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    if plots:
        paths.append(plot_ramp(results, out / "ramp.png"))
    return paths


def plot_ramp(results: dict, path: Path) -> Path:
    from hsd_serve.bench.report import _plt

    plt = _plt()
    tl = results["timeline"]
    r = results["ramp"]
    t = [x["t"] for x in tl]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax = axes[0]
    # requests end in bursts: each interval's tokens (light) and a moving average over ~5 s
    tps = [x["tokens_per_s"] for x in tl]
    w = max(1, round(5.0 / r["interval_s"]))
    avg = [sum(tps[max(0, i - w + 1):i + 1]) / len(tps[max(0, i - w + 1):i + 1])
           for i in range(len(tps))]
    ax.plot(t, tps, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(t, avg, color="tab:blue", label=f"aggregate tokens/s ({w * r['interval_s']:g} s "
                                             "moving average)")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.step(t, [x["streams"] for x in tl], where="post", color="tab:gray", alpha=0.7,
             label="client streams")
    ax2.set_ylabel("streams")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.set_title(f"{r['method']} T={r['temperature']:g} k={r['lookahead']} · ramp "
                 f"{','.join(map(str, r['schedule']))} × {r['step_s']:g}s · "
                 f"identical to AR: {r.get('identical_to_ar')} · failures: {len(r['failures'])}",
                 fontsize=9)
    axes[1].plot(t, [x["acceptance"] if x["acceptance"] is not None else float("nan")
                     for x in tl], marker=".", color="tab:green")
    axes[1].set_ylabel("acceptance")
    axes[1].set_ylim(0, 1)
    names = sorted({n for x in tl for n in (x["replicas"] or {})})
    for name in names:
        axes[2].step(t, [(x["replicas"] or {}).get(name, float("nan")) for x in tl],
                     where="post", label=name)
    axes[2].set_ylabel("RUNNING replicas")
    axes[2].set_xlabel("seconds")
    if names:
        axes[2].legend(loc="upper right")
    else:
        axes[2].text(0.5, 0.5, "no replica counts (Ray cluster not reachable from the bench)",
                     ha="center", transform=axes[2].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
