"""`hsd-serve bench`: methods side by side against AR and transformers' assisted generation."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Optional, Sequence

from hsd_serve.bench.datasets import DATASETS

DEFAULT_METHODS = "ar,slem,tli,hf-uag"


def _on_off(value: str):
    """An ``--overlap`` value: True (on), False (off), "branches" (on, drafts made ahead with
    branches) or "wait" (on, rounds that miss wait)."""
    v = value.strip().lower()
    if v in ("wait", "branches"):
        return v
    if v not in ("on", "off", "true", "false"):
        raise SystemExit(f"--overlap: expected on, branches, wait or off, got {value!r}")
    return v in ("on", "true")


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def _datasets(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in DATASETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dataset(s) {', '.join(bad)}; choose from "
                                         f"{', '.join(DATASETS)}")
    return names


def configure_parser(b: argparse.ArgumentParser) -> argparse.ArgumentParser:
    b.add_argument("--dataset", type=_datasets, default=["humaneval"],
                   help=f"comma list of {', '.join(DATASETS)} (default: humaneval)")
    b.add_argument("--data-dir", default=None,
                   help="dataset folder (default: ../shared/assets/datasets when present)")
    b.add_argument("--limit", type=int, default=20, help="prompts per dataset (default 20)")
    b.add_argument("--methods", type=_csv(str), default=DEFAULT_METHODS.split(","),
                   help="comma list of ar,sd,slem,tli,slrs,hf-uag,hf-ar,vllm-ar,vllm-hetero,"
                        f"vllm-serve (default {DEFAULT_METHODS}); AR always runs (and vllm-ar with "
                        "--executor vllm); hf-ar = transformers' plain generate(); vllm-ar = "
                        "vLLM alone, vllm-hetero = vLLM's own heterogeneous draft_model, "
                        "vllm-serve = vLLM's own OpenAI server (`vllm serve`) on the target, "
                        "started here, over HTTP")
    b.add_argument("--temperature", type=_csv(float), default=[0.0],
                   help="comma list of temperatures (default 0 = greedy)")
    b.add_argument("--lookahead", type=_csv(int), default=[4],
                   help="comma list of lookaheads to sweep (default 4)")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--target", default=None, help="target model folder, hub id or bundled:NAME "
                                                        "(default: bundled)")
    b.add_argument("--drafter", default=None, help="drafter model folder, hub id or bundled:NAME "
                                                         "(default: bundled:drafter)")
    b.add_argument("--drafter-head-ids", type=int, default=0, metavar="N",
                   help="prune our drafter's output head to its first N ids (0: full); hf-uag "
                        "keeps the full head")
    b.add_argument("--dtype", default="auto")
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0, help="sampling seed of prompt i is seed + i")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up requests (one per configuration, and a round "
                        "of C concurrent ones before each load phase)")
    b.add_argument("--no-hf-default", action="store_true",
                   help="skip hf-uag with its own default settings (keep the matched lookahead)")
    b.add_argument("--calibration-steps", type=int, default=16)
    b.add_argument("--executor", choices=("hf", "vllm"), default="hf",
                   help="what executes the target: hf (our executor; the reference is ar) or "
                        "vllm (the reference is vllm-ar, vLLM alone; without --endpoint our "
                        "methods run in-process on the vLLM executor, at every --concurrency)")
    b.add_argument("--vllm-eager", action="store_true",
                   help="in-process vLLM engines in eager mode (start in ~15 s, slower steps)")
    b.add_argument("--vllm-options", type=json.loads, default=None, metavar="JSON",
                   help="more options for the in-process vLLM engines (serve config's `vllm`), "
                        "e.g. '{\"draft_max_batch\": 64}'")
    b.add_argument("--overlap", type=_csv(str), default=["off"],
                   help="drafting ahead while the target verifies (overlap / vllm.overlap): on "
                        "(the target never waits for a draft: overlap_miss plain), branches (on, "
                        "each draft made ahead with branches: overlap_branches > 0), wait (on, "
                        "with rounds whose draft made ahead missed waiting for a fresh one: "
                        "overlap_miss wait), off, or a comma list (on,off; on,wait,off) to "
                        "measure them side by side in one run (in-process on "
                        "the vLLM executor; with --endpoint, one --application per value: what "
                        "the service runs, recorded in results.json)")
    b.add_argument("--drafter-executor", type=_csv(str), default=["hf"],
                   help="in-process: what executes our drafter: hf (plain-torch forwards where "
                        "the architecture allows), hf-transformers (the same drafter through "
                        "transformers' modules), vllm; a comma list measures them side by side "
                        "(drafter_executor; per drafted token: drafter_step_ms_in_run)")
    b.add_argument("--endpoint", default=None,
                   help="measure a running service instead: grpc://HOST:PORT (or HOST:PORT) or "
                        "http://HOST:PORT")
    b.add_argument("--application", default="hsd",
                   help="Ray Serve application (gRPC metadata); with --overlap on,off one per "
                        "value, comma-separated (the same service deployed both ways)")
    b.add_argument("--concurrency", type=_csv(int), default=[1],
                   help="comma list of concurrent streams (endpoint only)")
    b.add_argument("--duration", type=float, default=None,
                   help="seconds of load per method and concurrency (endpoint only)")
    b.add_argument("--repeats", type=int, default=1,
                   help="load phases (--duration, or --concurrency above 1): passes over the "
                        "methods, each pass in a rotated order; aggregate tok/s is the median of "
                        "the passes and aggregate ×AR the median of the per-pass ratios "
                        "(default 1)")
    b.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (endpoint)")
    b.add_argument("--ramp", type=_csv(int), default=None,
                   help="endpoint only: a load ramp, client streams per step (e.g. 1,4,16,4,1) "
                        "of the first drafting method of --methods; writes results.json and "
                        "ramp.png (tokens/s, acceptance, replicas per deployment over time)")
    b.add_argument("--step-s", type=float, default=30.0, help="seconds per --ramp step")
    b.add_argument("--out", default="bench/results/latest", help="output folder")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)
    return b


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmark methods side by side (vs AR and transformers)",
                       description="Run AR, our speculative methods and transformers' "
                                   "heterogeneous assisted generation on the same prompts, "
                                   "interleaved, and write results.json, results.md and plots.")
    return configure_parser(b)


def _model(path):
    from hsd_serve.zoo import resolve_model_path

    return resolve_model_path(path) if path else path


def config_from_args(args: argparse.Namespace, command: str = ""):
    from hsd_serve.bench.runner import BenchConfig

    return BenchConfig(datasets=args.dataset, data_dir=args.data_dir, limit=args.limit,
                       methods=args.methods, temperatures=args.temperature,
                       lookaheads=args.lookahead, max_new_tokens=args.max_new_tokens,
                       target=_model(args.target), drafter=_model(args.drafter),
                       drafter_head_ids=args.drafter_head_ids, dtype=args.dtype,
                       device=args.device, seed=args.seed, warmup=not args.no_warmup,
                       hf_default=not args.no_hf_default,
                       calibration_steps=args.calibration_steps, threads=args.threads,
                       endpoint=args.endpoint, application=args.application,
                       concurrency=args.concurrency, duration=args.duration,
                       repeats=args.repeats, executor=args.executor,
                       vllm={**({"enforce_eager": True} if args.vllm_eager else {}),
                             **(args.vllm_options or {})} or None,
                       overlap=tuple(_on_off(v) for v in args.overlap),
                       drafter_executors=tuple(args.drafter_executor),
                       timeout_s=args.timeout, command=command)


def cmd_bench(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    from transformers.utils import logging as hf_logging

    from hsd_serve.bench.report import write_outputs
    from hsd_serve.bench.runner import run_inprocess

    hf_logging.set_verbosity_error()
    command = "hsd-serve bench " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else _bench_argv()))
    cfg = config_from_args(args, command)
    if args.ramp:
        return _ramp(cfg, args)
    if cfg.endpoint or cfg.executor == "vllm":
        from hsd_serve.bench.remote import run_endpoint

        results = run_endpoint(cfg, progress=not args.no_progress)
    else:
        os.makedirs(args.out, exist_ok=True)
        partial = os.path.join(args.out, "requests.partial.jsonl")
        if os.path.exists(partial):
            os.remove(partial)
        results = run_inprocess(cfg, progress=not args.no_progress, partial_path=partial)
        if os.path.exists(partial):
            os.remove(partial)
    paths = write_outputs(results, args.out, plots=not args.no_plots)
    _summary(results)
    if results.get("interrupted"):
        print("interrupted: results cover the prompts every method finished", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    if results["failures"]:
        print("FAILURES: outputs differ from AR where they must be identical: "
              + "; ".join(f"{f['label']} T={f['temperature']:g} ({len(f['prompts'])} prompts)"
                          for f in results["failures"]), file=sys.stderr)
        return 1
    return 0


def _ramp(cfg, args: argparse.Namespace) -> int:
    from hsd_serve.bench.ramp import run_ramp, write_ramp

    results = run_ramp(cfg, list(args.ramp), args.step_s, progress=not args.no_progress)
    paths = write_ramp(results, args.out, plots=not args.no_plots)
    r = results["ramp"]
    peak = {}
    for x in results["timeline"]:
        for name, n in (x["replicas"] or {}).items():
            peak[name] = max(peak.get(name, 0), n)
    print(f"ramp {r['schedule']} x {r['step_s']:g}s: {r['requests']} requests, "
          f"{r['tokens_per_s']:.1f} tok/s overall, acceptance "
          f"{(r['accepted'] / r['drafted']) if r['drafted'] else 0:.2f}, most replicas {peak}, "
          f"failures {len(r['failures'])}, identical to AR: {r.get('identical_to_ar')}",
          file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 1 if r["failures"] or r.get("identical_to_ar") is False else 0


def _bench_argv() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("bench") + 1:] if "bench" in argv else argv


def _summary(results: dict) -> None:
    for r in results["runs"]:
        print(f"{r['dataset']:10s} T={r['temperature']:<4g} {r['label']:28s} "
              f"{r['tokens_per_s']:8.1f} tok/s  x{(r.get('speedup_vs_ar') or 0):.2f} AR  "
              f"ideal {(r.get('ideal_speedup') or 0):.2f}  identical={r.get('identical_to_ar')}",
              file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = configure_parser(argparse.ArgumentParser(prog="hsd-serve bench",
                                                      description=__doc__))
    args = parser.parse_args(argv)
    try:
        return cmd_bench(args, list(argv) if argv is not None else sys.argv[1:])
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"hsd-serve bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
