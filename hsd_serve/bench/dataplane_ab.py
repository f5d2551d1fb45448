"""`python -m hsd_serve.bench.dataplane_ab`: drafting ahead (overlap) measured over the real gRPC
data plane, without Ray.

The drafter and the target each run in a process of their own behind ``start_dataplane_server``
(the servers a Serve replica starts), on any device; this process is the coordinator and the
client.  It runs the same prompts with each overlap setting side by side, in passes of rotated
order, and reports per-pass tokens/s and their ratios to no overlap.  Every output is checked
token for token against AR run through the same target process.

It exists for machines where Ray Serve is not installed, such as a GPU machine with no package
index (``bench/README.md``, "On a GPU").  ``hsd-serve bench --endpoint``
remains the way to measure the service itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# setting -> Coordinator options (the serve config's overlap / overlap_miss / overlap_branches)
SETTINGS = {"off": {"overlap": False}, "on": {"overlap": True},
            "branches": {"overlap": True}, "wait": {"overlap": True, "overlap_miss": "wait"}}
STAT_FIELDS = ("rounds", "drafted", "accepted", "emitted", "fallback_rounds", "ahead_ready",
               "ahead_waited", "ahead_plain", "ahead_branch", "ahead_stale", "draft_s",
               "verify_s", "transport_s")


def _specs(args):
    from hsd_serve.models.hf import ModelSpec
    from hsd_serve.zoo import resolve_model_path

    target = ModelSpec(resolve_model_path(args.target), dtype=args.dtype, device=args.device)
    drafter = ModelSpec(resolve_model_path(args.drafter), dtype=args.dtype, device=args.device,
                        head_ids=args.drafter_head_ids, plain_forward=True)
    return target, drafter


# ----------------------------------------------------------------------------- worker processes
def worker_main(args) -> None:
    """One model behind its data-plane server; writes the port to ``--port-file``, runs until
    its standard input closes (the parent went away)."""
    import torch

    from hsd_serve.engine.drafter import DrafterWorker
    from hsd_serve.engine.target import TargetWorker
    from hsd_serve.models.hf import LoadedModel, describe_model
    from hsd_serve.serve.dataplane import start_dataplane_server, stop_dataplane_server

    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    target_spec, drafter_spec = _specs(args)
    if args.worker == "target":
        worker = TargetWorker(LoadedModel(target_spec))
    else:
        worker = DrafterWorker(LoadedModel(drafter_spec),
                               describe_model(target_spec).tokenizer.vocab)

    async def serve():
        server, port = await start_dataplane_server(args.worker, worker, host="127.0.0.1")
        tmp = args.port_file + ".tmp"
        Path(tmp).write_text(str(port))
        os.replace(tmp, args.port_file)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await stop_dataplane_server(server, grace=None)

    asyncio.run(serve())


def _spawn(kind: str, argv: list[str], tmp: str, cpus: Optional[str]):
    port_file = os.path.join(tmp, f"{kind}.port")
    cmd = [sys.executable, "-m", "hsd_serve.bench.dataplane_ab", *argv, "--worker", kind,
           "--port-file", port_file] + (["--cpus", cpus] if cpus else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    return proc, port_file


def _wait_port(proc, port_file: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(port_file):
        if proc.poll() is not None:
            raise RuntimeError(f"the {Path(port_file).stem} worker exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {Path(port_file).stem} worker did not start in {timeout_s}s")
        time.sleep(0.2)
    return f"127.0.0.1:{Path(port_file).read_text().strip()}"


# ----------------------------------------------------------------------------- the coordinator
def _coordinators(args, t_addr: str, d_addr: str):
    from hsd_serve.core.vocab import same_vocabulary
    from hsd_serve.engine.engine import Coordinator, TargetInfo
    from hsd_serve.models.hf import describe_model
    from hsd_serve.serve.dataplane import ChannelPool, GrpcDrafter, GrpcTarget

    target_spec, drafter_spec = _specs(args)
    target, drafter = describe_model(target_spec), describe_model(drafter_spec)
    same = same_vocabulary(drafter.tokenizer.vocab, target.tokenizer.vocab)
    pool = ChannelPool()
    info = TargetInfo(target.tokenizer, target.eos_ids, target.max_context)
    coords = {}
    for name in args.settings:
        opts = dict(SETTINGS[name])
        if name == "branches":
            opts["overlap_branches"] = args.branches
        coords[name] = Coordinator(
            GrpcTarget(t_addr, pool=pool), info,
            GrpcDrafter(d_addr, target_vocab_size=target.tokenizer.vocab.size, pool=pool),
            same_vocab=same, **opts)
    return coords, pool, target, drafter


async def _one(coord, prompt: str, args, method: str, k: int, seed: int):
    from hsd_serve.core.sampling import SamplingParams
    from hsd_serve.engine.types import GenerationRequest

    req = GenerationRequest(prompt, max_new_tokens=args.max_new_tokens, method=method,
                            lookahead=k, params=SamplingParams(temperature=args.temperature,
                                                               seed=seed))
    result = None
    async for chunk in coord.stream(req):
        result = chunk.result
    return result


async def _phase(coord, prompts, args, method: str, k: int, concurrency: int):
    """All prompts, ``concurrency`` at a time; (wall seconds, results in prompt order)."""
    sem = asyncio.Semaphore(concurrency)

    async def guarded(i, p):
        async with sem:
            return await _one(coord, p, args, method, k, args.seed + i)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - t0, results


def _summ(results) -> dict:
    out = {f: 0 for f in STAT_FIELDS}
    for r in results:
        for f in STAT_FIELDS:
            out[f] += getattr(r.stats, f)
    out["tokens"] = sum(len(r.token_ids) for r in results)
    return out


def _write(args, out: dict, partial: bool) -> None:
    """``results.json`` (and ``results.md`` once a summary exists) under ``--out``; written
    after every phase, so that a run cut short keeps what it measured (``partial``)."""
    if not args.out:
        return
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    out = dict(out, partial=partial,
               config={k: v for k, v in vars(args).items()
                       if k not in ("worker", "port_file", "cpus")})
    (d / "results.json").write_text(json.dumps(out, indent=1, default=str))
    if "summary" in out:
        (d / "results.md").write_text(_table(out["summary"], args.settings[0],
                                             out["ar"]["tokens_per_s"]))


async def run(args, t_addr: str, d_addr: str, machine: dict) -> dict:
    from hsd_serve.bench.datasets import context_fitter, fit_prompts, load_prompts
    from hsd_serve.bench.metrics import rotated

    coords, pool, target, drafter = _coordinators(args, t_addr, d_addr)
    fits = context_fitter(target.tokenizer, target.max_context, args.max_new_tokens,
                          drafter_tokenizer=drafter.tokenizer,
                          drafter_context=drafter.max_context, lookahead=max(args.lookahead))
    fitted, _ = fit_prompts(load_prompts(args.dataset, args.data_dir, args.limit), fits)
    prompts = [p.text for p in fitted]  # cut to fit both contexts, as `hsd-serve bench` does
    try:
        ar_coord = coords[args.settings[0]]
        await _phase(ar_coord, prompts[:2], args, "ar", 1, 1)  # warm both workers
        for name in args.settings:
            await _phase(coords[name], prompts[:2], args, args.method, max(args.lookahead), 1)
        ar_wall, ar_results = await _phase(ar_coord, prompts, args, "ar", 1, 1)
        ar_ids = [r.token_ids for r in ar_results]
        ar = {"wall_s": ar_wall, "tokens": sum(map(len, ar_ids)),
              "tokens_per_s": sum(map(len, ar_ids)) / ar_wall}
        runs = []
        out = {"ar": ar, "runs": runs, "machine": machine}
        for c in args.concurrency:
            for k in args.lookahead:
                for rep in range(args.repeats):
                    for name in rotated(args.settings, rep):
                        wall, results = await _phase(coords[name], prompts, args, args.method,
                                                     k, c)
                        summ = _summ(results)
                        identical = sum(r.token_ids == ids for r, ids in zip(results, ar_ids))
                        runs.append({"setting": name, "lookahead": k, "concurrency": c,
                                     "pass": rep, "wall_s": wall,
                                     "tokens_per_s": summ["tokens"] / wall,
                                     "identical_to_ar": identical, "requests": len(results),
                                     **summ})
                        print(f"c={c} k={k} pass {rep} {name:>8}: "
                              f"{summ['tokens'] / wall:7.1f} tok/s, ready {summ['ahead_ready']}"
                              f", plain {summ['ahead_plain']}, branch {summ['ahead_branch']}, "
                              f"identical {identical}/{len(results)}", flush=True)
                        _write(args, dict(out, summary=summarize(runs, args.settings[0])),
                               partial=True)
    finally:
        await pool.close()
    out["summary"] = summarize(runs, args.settings[0])
    return out


def summarize(runs: list[dict], reference: str) -> list[dict]:
    """Per (concurrency, lookahead, setting): median tokens/s over the passes and the median of
    the per-pass ratios to ``reference`` (the same pass's run of that setting)."""
    rows = []
    keys = sorted({(r["concurrency"], r["lookahead"]) for r in runs})
    for c, k in keys:
        cell = [r for r in runs if (r["concurrency"], r["lookahead"]) == (c, k)]
        ref = {r["pass"]: r["tokens_per_s"] for r in cell if r["setting"] == reference}
        for name in dict.fromkeys(r["setting"] for r in cell):
            mine = [r for r in cell if r["setting"] == name]
            ratios = [r["tokens_per_s"] / ref[r["pass"]] for r in mine if r["pass"] in ref]
            rows.append({"concurrency": c, "lookahead": k, "setting": name,
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                         "vs_" + reference: statistics.median(ratios) if ratios else None,
                         "vs_passes": ratios,
                         "identical_to_ar": sum(r["identical_to_ar"] for r in mine),
                         "requests": sum(r["requests"] for r in mine),
                         "ahead_ready": sum(r["ahead_ready"] for r in mine),
                         "ahead_branch": sum(r["ahead_branch"] for r in mine),
                         "rounds": sum(r["rounds"] for r in mine),
                         # the target's verification time over wall time: near 1 at one stream,
                         # nothing is left to hide (wall of the reference over a setting's
                         # verification time bounds what drafting ahead can gain)
                         "verify_share": sum(r["verify_s"] for r in mine)
                         / sum(r["wall_s"] for r in mine)})
    return rows


def _table(summary: list[dict], reference: str, ar_tps: float) -> str:
    lines = [f"AR through the same target process: {ar_tps:.1f} tok/s (one stream)", "",
             f"| streams | k | setting | tok/s (median) | × {reference} (median of passes) | "
             "passes | rounds | draft ready | branch used | verify / wall | identical to AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        ratio = r["vs_" + reference]
        passes = ", ".join(f"{x:.2f}" for x in r["vs_passes"])
        lines.append(f"| {r['concurrency']} | {r['lookahead']} | {r['setting']} | "
                     f"{r['tokens_per_s']:.1f} | {'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{passes} | {r['rounds']} | {r['ahead_ready']} | {r['ahead_branch']} | "
                     f"{r['verify_share']:.2f} | {r['identical_to_ar']}/{r['requests']} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    from hsd_serve.bench.cli import _csv

    p = argparse.ArgumentParser(prog="python -m hsd_serve.bench.dataplane_ab",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="bundled:target")
    p.add_argument("--drafter", default="bundled:drafter")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both workers)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--drafter-head-ids", type=int, default=0)
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--method", default="slem")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookahead", type=_csv(int), default=[2])
    p.add_argument("--concurrency", type=_csv(int), default=[1])
    p.add_argument("--settings", type=_csv(str), default=["off", "on", "branches"],
                   help="comma list of off, on, branches, wait; the first is the reference")
    p.add_argument("--branches", type=int, default=4, help="overlap_branches of 'branches'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--target-cpus", default=None, help="CPU list for the target worker (0,1)")
    p.add_argument("--drafter-cpus", default=None, help="CPU list for the drafter worker")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    p.add_argument("--worker", choices=("target", "drafter"), help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--cpus", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad or len(set(args.settings)) != len(args.settings):
        raise SystemExit(f"--settings: each of {', '.join(SETTINGS)} at most once, got "
                         f"{','.join(args.settings)}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    from hsd_serve.bench.runner import machine_info

    with tempfile.TemporaryDirectory() as tmp:  # the workers parse the same arguments
        procs = [_spawn("target", argv, tmp, args.target_cpus),
                 _spawn("drafter", argv, tmp, args.drafter_cpus)]
        try:
            t_addr, d_addr = (_wait_port(p, f, args.start_timeout) for p, f in procs)
            out = asyncio.run(run(args, t_addr, d_addr, machine_info()))
        finally:
            for proc, _ in procs:
                proc.stdin.close()
            for proc, _ in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    _write(args, out, partial=False)
    print(_table(out["summary"], args.settings[0], out["ar"]["tokens_per_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
