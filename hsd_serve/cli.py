"""`hsd-serve`: generate (in-process), serve (Ray Serve), client (gRPC), zoo (bundled models)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from hsd_serve.engine.types import METHODS


def _bundled(name: str) -> Optional[str]:
    from hsd_serve.zoo import bundled_model_dir

    try:
        return str(bundled_model_dir(name))
    except FileNotFoundError:
        return None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate in-process with a target and a drafter",
                       description="Lossless speculative generation in this process. Without "
                                   "--target/--drafter the bundled pair is used.")
    g.add_argument("prompt", help="prompt text ('-' reads standard input)")
    g.add_argument("--target", help="target model: local directory, Hugging Face hub id or "
                                    "bundled:NAME (default: the bundled target)")
    g.add_argument("--drafter", help="drafter model: local directory, hub id or bundled:NAME "
                                     "(default: the bundled drafter; bundled:drafter_aligned "
                                     "for sampled traffic; 'none' for AR only)")
    g.add_argument("--drafter-head-ids", type=int, default=0, metavar="N",
                   help="compute the drafter's output head for its first N token ids only (plus "
                        "special tokens): a cheaper drafter step, still lossless (default 0: all)")
    g.add_argument("--drafter-forward", choices=("plain", "transformers"), default="plain",
                   help="how the HF drafter's forwards run: plain (Llama/Mistral/Qwen2 in plain "
                        "torch, models.plain; other architectures fall back) or transformers")
    g.add_argument("--drafter-executor", choices=("hf", "vllm"), default="hf",
                   help="what runs the drafter: hf (every method) or vllm (slem, greedy tli/sd; "
                        "docs/vllm.md \"The drafter on vLLM\")")
    g.add_argument("--method", default="auto", choices=METHODS)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lookahead", type=int, default=4)
    g.add_argument("--adaptive-lookahead", action="store_true",
                   help="grow/shrink the lookahead per round from the acceptance (max = --lookahead)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--slrs-max-forwards", type=int, default=64,
                   help="refuse SLRS when its estimated drafter forwards per round exceed this")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model repositories to run their own code (off by default)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics (hsd_*) on http://127.0.0.1:PORT/metrics while "
                        "running (0: any free port, printed on stderr)")
    g.add_argument("--metrics-hold-s", type=float, default=0.0, metavar="S",
                   help="with --metrics-port: keep serving S seconds after generating, for a "
                        "scraper (default 0)")
    g.add_argument("--print-metrics", action="store_true",
                   help="print the Prometheus text exposition (hsd_*) to stderr at the end")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from hsd_serve.core.sampling import SamplingParams
    from hsd_serve.engine.local import Engine
    from hsd_serve.engine.types import GenerationRequest
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)
    from hsd_serve.zoo import resolve_model_path

    target_path = resolve_model_path(args.target) if args.target else _bundled("target")
    if target_path is None:
        raise ValueError("no --target given and the bundled target is missing "
                         "(build it with `hsd-serve zoo build`)")
    drafter_path = (resolve_model_path(args.drafter) if args.drafter is not None
                    else _bundled("drafter"))
    if args.method == "ar" or (drafter_path or "").lower() == "none":
        drafter_path = None
    req = GenerationRequest(prompt=prompt, max_new_tokens=args.max_new_tokens, params=params,
                            method=args.method, lookahead=args.lookahead,
                            adaptive_lookahead=args.adaptive_lookahead, stop=tuple(args.stop))
    req.validate()
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ValueError(f"--metrics-port must be in [0, 65535], got {args.metrics_port}")
    target = LoadedModel(ModelSpec(target_path, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code))
    drafter = None
    if drafter_path is not None and args.drafter_executor == "vllm":
        if args.drafter_head_ids:
            raise ValueError("--drafter-head-ids prunes the HF drafter's head; with "
                             "--drafter-executor vllm leave it 0")
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the output
        from hsd_serve.serve.config import VllmDrafterOptions
        from hsd_serve.serve.vllm.drafter import VllmDraftModel

        drafter = VllmDraftModel(drafter_path, VllmDrafterOptions(
            dtype="float32" if args.dtype == "auto" else args.dtype),
            trust_remote_code=args.trust_remote_code)
    elif drafter_path is not None:
        drafter = LoadedModel(ModelSpec(drafter_path, dtype=args.dtype, device=args.device,
                                        trust_remote_code=args.trust_remote_code,
                                        head_ids=args.drafter_head_ids,
                                        plain_forward=args.drafter_forward == "plain"))
    sink, server = _metrics_sink(args)
    try:
        engine = Engine(target, drafter, slrs_max_forwards=args.slrs_max_forwards, sink=sink)
        return _generate(engine, req, args)
    finally:
        _finish_metrics(args, sink, server)
        getattr(drafter, "close", lambda: None)()  # a drafter on vLLM: its engine


def _metrics_sink(args: argparse.Namespace):
    """(PrometheusSink or None, HTTP server or None) for --metrics-port / --print-metrics."""
    if args.metrics_port is None and not args.print_metrics:
        return None, None
    from hsd_serve.metrics import PrometheusSink

    if args.metrics_hold_s < 0:
        raise ValueError(f"--metrics-hold-s must be >= 0, got {args.metrics_hold_s}")
    sink = PrometheusSink()
    server = None
    if args.metrics_port is not None:
        server = sink.serve(args.metrics_port)  # ValueError/OSError: exit 2 with the reason
        print(f"hsd-serve: metrics on http://127.0.0.1:{server.server_port}/metrics",
              file=sys.stderr, flush=True)
    return sink, server


def _finish_metrics(args: argparse.Namespace, sink, server) -> None:
    import time

    try:
        if server is not None and args.metrics_hold_s > 0:
            time.sleep(args.metrics_hold_s)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if sink is not None and args.print_metrics:
            sys.stderr.write(sink.render())
            sys.stderr.flush()


def _generate(engine, req, args: argparse.Namespace) -> int:
    if args.json:
        result = engine.generate(req)
        print(json.dumps(result.as_dict()))
        return 0
    result = None
    for chunk in engine.stream(req):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        result = chunk.result
    s = result.stats
    print(f"\n[{s.method}] {s.emitted} tokens in {s.wall_s:.2f}s ({s.tokens_per_s:.1f} tok/s), "
          f"acceptance {s.acceptance_rate:.2f}, {s.tokens_per_round:.2f} tokens/round, "
          f"finish={result.finish_reason}", file=sys.stderr)
    return 0


def _add_zoo(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zoo", help="build the bundled demo models (trains on this CPU)")
    z.add_argument("zoo_args", nargs=argparse.REMAINDER,
                   help="arguments for `python -m hsd_serve.zoo` (e.g. build --help)")
    z.set_defaults(func=cmd_zoo)


def cmd_zoo(args: argparse.Namespace) -> int:
    from hsd_serve.zoo.cli import main as zoo_main

    return int(zoo_main(args.zoo_args) or 0)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="deploy the service on Ray Serve (local Ray, or --address)",
                       description="Start (or join) Ray, deploy the applications of a Serve "
                                   "config and block until interrupted.")
    s.add_argument("config", nargs="?", default="serve_config.yaml",
                   help="Serve config YAML (default: ./serve_config.yaml)")
    s.add_argument("--address", default=None,
                   help="Ray cluster to join (default: start a local Ray instance)")
    s.add_argument("--num-cpus", type=float, default=None, help="CPUs for a local Ray instance")
    s.add_argument("--host", default=None,
                   help="override http_options.host (serve_config.yaml: 127.0.0.1, loopback); "
                        "0.0.0.0 opens HTTP to the network: configure API keys first")
    s.add_argument("--http-port", type=int, default=None, help="override http_options.port")
    s.add_argument("--grpc-port", type=int, default=None, help="override grpc_options.port")
    s.add_argument("--once", metavar="PROMPT", default=None,
                   help="send one request over gRPC and HTTP once deployed, print it, shut down")
    s.add_argument("--max-tokens", type=int, default=32, help="max tokens for --once")
    s.add_argument("--metrics-export-port", type=int, default=8080,
                   help="Prometheus export port of the local Ray node (default 8080, as on "
                        "KubeRay; 0: any); http://127.0.0.1:HTTP_PORT/metrics serves it too")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from hsd_serve.serve.launch import serve_from_config

    return serve_from_config(args.config, address=args.address, num_cpus=args.num_cpus,
                             http_port=args.http_port, grpc_port=args.grpc_port, host=args.host,
                             once=args.once, once_max_tokens=args.max_tokens,
                             metrics_export_port=args.metrics_export_port)


def _add_client(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("client", help="send a prompt to a running service over gRPC")
    c.add_argument("prompt", help="prompt text ('-' reads standard input)")
    c.add_argument("--address", default="127.0.0.1:9000", help="gRPC address (host:port)")
    c.add_argument("--application", default="hsd", help="Ray Serve application name")
    c.add_argument("--method", default="", choices=("",) + METHODS)
    c.add_argument("--max-tokens", type=int, default=0, help="0: server default")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--seed", type=int, default=None,
                   help="default: a fresh random seed when sampling (echoed in the stats)")
    c.add_argument("--lookahead", type=int, default=0, help="0: server default")
    c.add_argument("--stop", action="append", default=[])
    c.add_argument("--no-stream", action="store_true", help="unary Generate instead of streaming")
    c.add_argument("--trace", action="store_true",
                   help="ask for the per-round timeline (stats.timeline: draft, draft ahead and "
                        "verify spans; shown with --json)")
    c.add_argument("--json", action="store_true", help="print the final response as JSON")
    c.add_argument("--timeout", type=float, default=300.0)
    c.add_argument("--api-key", default=None,
                   help="API key to send (default: $HSD_API_KEY; the variable keeps it out of "
                        "the process list)")
    c.set_defaults(func=cmd_client)


def cmd_client(args: argparse.Namespace) -> int:
    from hsd_serve.serve.client import run_client

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return run_client(args, prompt)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hsd-serve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_client(sub)
    _add_zoo(sub)
    from hsd_serve.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from hsd_serve.zoo.align import add_align_parser
    add_align_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"hsd-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
