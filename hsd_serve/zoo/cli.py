"""``python -m hsd_serve.zoo {build,train,finalize}``.

build     train all three models (target in one process, the two drafters one after the other in a
          second process; each process uses one thread), then finalize.
train     train one or more models in this process (sequentially).
finalize  copy the trained Hugging Face folders into ``--out``, measure decode latency and the
          validation loss per token / per byte, write README.md model cards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import ALIGNED_NAMES, BUNDLED_DIR, MODEL_NAMES

DEFAULT_WORKDIR = Path("runs/zoo")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="where checkpoints/logs go (default: runs/zoo)")
    p.add_argument("--assets", type=Path, default=None,
                   help="folder with mistral-v0.1/ and gpt2/ tokenizer files "
                        "(default: $HSD_TOKENIZER_ASSETS or /work/shared/assets/tokenizers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--corpus-root", type=Path, default=None,
                   help="override the corpus root (default: this interpreter's stdlib)")


def _add_minutes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes-target", type=float, default=None, help="wall-clock budget (default 70)")
    p.add_argument("--minutes-drafter", type=float, default=None, help="default 20")
    p.add_argument("--minutes-byte", type=float, default=None, help="default 12")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (~1.5x tokens/s)")
    p.add_argument("--lr", type=float, default=None, help="override the peak learning rate")


def _minutes_for(args, name: str):
    return {"target": args.minutes_target, "drafter": args.minutes_drafter,
            "byte_drafter": args.minutes_byte}[name]


def _forward_args(args) -> list[str]:
    out = ["--workdir", str(args.workdir), "--seed", str(args.seed), "--threads", str(args.threads),
           "--ckpt-minutes", str(args.ckpt_minutes)]
    if args.assets is not None:
        out += ["--assets", str(args.assets)]
    if args.corpus_root is not None:
        out += ["--corpus-root", str(args.corpus_root)]
    for flag, v in (("--minutes-target", args.minutes_target), ("--minutes-drafter", args.minutes_drafter),
                    ("--minutes-byte", args.minutes_byte), ("--max-steps", args.max_steps),
                    ("--lr", args.lr)):
        if v is not None:
            out += [flag, str(v)]
    if args.compile:
        out.append("--compile")
    return out


def cmd_train(args) -> int:
    from .specs import SPECS
    from .train import train

    if args.init_from is not None and len(args.only) != 1:
        print("--init-from needs exactly one model in --only", file=sys.stderr)
        return 2
    for name in args.only:
        train(SPECS[name], args.workdir, minutes=_minutes_for(args, name), seed=args.seed,
              threads=args.threads, ckpt_minutes=args.ckpt_minutes, assets=args.assets,
              corpus_root=args.corpus_root, max_steps=args.max_steps, init_from=args.init_from,
              compile=args.compile, lr=args.lr)
    return 0


def cmd_finalize(args) -> int:
    from .finalize import finalize

    finalize(args.workdir, args.out, names=args.only, threads=args.bench_threads,
             assets=args.assets, corpus_root=args.corpus_root, seed=args.seed)
    return 0


def cmd_build(args) -> int:
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "hsd_serve.zoo", "train"] + _forward_args(args)
    groups = [[n for n in ("target",) if n in args.only],
              [n for n in ("drafter", "byte_drafter") if n in args.only]]
    procs = []
    for g in groups:
        if not g:
            continue
        log = open(args.workdir / f"build-{'-'.join(g)}.log", "a")
        procs.append(subprocess.Popen(base + ["--only", *g], stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}))
        print(f"started {' '.join(g)} (pid {procs[-1].pid}), log {log.name}", flush=True)
    rcs = [p.wait() for p in procs]
    if any(rcs):
        print(f"training failed: return codes {rcs}", file=sys.stderr)
        return 1
    return cmd_finalize(args)


def cmd_bundle(args: argparse.Namespace) -> int:
    from .bundle import bundle_aligned

    try:
        info = bundle_aligned(args.src, args.name, base=args.base, out_root=args.out,
                              threads=args.bench_threads, commands=tuple(args.commands))
    except (ValueError, FileNotFoundError) as exc:
        print(f"bundle: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name}: {info['val']['val_nats_per_byte']:.4f} nats/byte "
          f"({info['base_name']}: {info['base_val']['val_nats_per_byte']:.4f}), written to "
          f"{args.out / args.name}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hsd_serve.zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("build", help="train all models and write the bundled folders")
    pt = sub.add_parser("train", help="train models in this process")
    pf = sub.add_parser("finalize", help="export trained folders + model cards")
    for p in (pb, pt, pf):
        _add_common(p)
        p.add_argument("--only", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    for p in (pb, pt):
        _add_minutes(p)
    pt.add_argument("--init-from", type=Path, default=None,
                    help="continue from an exported HF folder (e.g. runs/zoo/target-stage1/hf; its "
                         "../state.json is carried into the history); only with one --only model")
    for p in (pb, pf):
        p.add_argument("--out", type=Path, default=BUNDLED_DIR,
                       help=f"output folder for the HF model folders (default: {BUNDLED_DIR})")
        p.add_argument("--bench-threads", type=int, default=1,
                       help="torch threads when measuring decode latency (default 1)")
    pa = sub.add_parser("bundle", help="bundle an `hsd-serve align` output as a zoo model "
                                       "(weights, align.json, measured model card)")
    pa.add_argument("--from", dest="src", type=Path, required=True,
                    help="the folder `hsd-serve align --out` wrote")
    pa.add_argument("--name", choices=ALIGNED_NAMES, default=ALIGNED_NAMES[0])
    pa.add_argument("--base", default="bundled:drafter",
                    help="the drafter it was aligned from (measured beside it)")
    pa.add_argument("--out", type=Path, default=BUNDLED_DIR,
                    help=f"folder of the bundled models (default: {BUNDLED_DIR})")
    pa.add_argument("--command", dest="commands", action="append", default=[],
                    help="an `align` command that made it, for the card (repeat, in order)")
    pa.add_argument("--bench-threads", type=int, default=1)
    pa.set_defaults(func=cmd_bundle)
    sub.add_parser("distill", add_help=False,
                   help="align the drafter to the target (fine-tune on its greedy outputs); "
                        "see `distill --help`")
    sub.add_parser("align", add_help=False,
                   help="fine-tune a drafter toward a target for sampling and greedy (the same "
                        "as `hsd-serve align`); see `align --help`")
    pb.set_defaults(func=cmd_build)
    pt.set_defaults(func=cmd_train)
    pf.set_defaults(func=cmd_finalize)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["distill"]:
        from hsd_serve.zoo.distill import main as distill_main

        return distill_main(argv[1:])
    if argv[:1] == ["align"]:
        from hsd_serve.zoo.align import main as align_main

        return align_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
