"""Per drafted token: the drafter on our HF executor against the drafter on vLLM, at batch sizes.

The drafter replica drafts for every request it serves at once (``DrafterWorker.draft_batch``:
one forward per step for the HF executor, one engine step for vLLM), so what a backend costs per
drafted token depends on how many requests draft together.  For each batch size N this opens N
sessions on HumanEval prompts in each backend and runs the same rounds in both, interleaved round
by round (machines here are noisy): every request drafts k drafter tokens, and the committed text
then grows by the draft (as if every draft were accepted), so the contexts grow as in serving.

    python bench/drafter_backends.py --batch 1,4,16 --out bench/results/drafter-backends-batch-cpu

Writes ``results.json`` and ``results.md``; checks that both backends drafted the same tokens
(the HF drafter with a pruned head, ``--head-ids``, is a third column: it may draft otherwise).
Each HF drafter runs twice: through transformers' modules and in plain torch (``plain``,
``models.plain``, what drafter replicas run by default).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _workers(target_vocab, eager: bool, head_ids: int, threads: int):
    from hsd_serve.engine.drafter import DrafterWorker
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.serve.config import VllmDrafterOptions
    from hsd_serve.serve.vllm.drafter import VllmDraftModel, VllmDrafterWorker
    from hsd_serve.zoo import bundled_model_dir

    path = str(bundled_model_dir("drafter"))
    out = {}
    # each HF drafter through transformers' modules and in plain torch (models.plain)
    for plain in (False, True):
        tag = " plain" if plain else ""
        out["hf" + tag] = DrafterWorker(LoadedModel(ModelSpec(path, plain_forward=plain)),
                                        target_vocab)
        if head_ids:
            out[f"hf head {head_ids}{tag}"] = DrafterWorker(
                LoadedModel(ModelSpec(path, head_ids=head_ids, plain_forward=plain)), target_vocab)
    vd = VllmDraftModel(path, VllmDrafterOptions(enforce_eager=eager), threads=threads)
    out["vllm"] = VllmDrafterWorker(vd, target_vocab)
    return out, vd


def run(batches, methods, k: int, rounds: int, eager: bool, head_ids: int, threads: int) -> dict:
    import torch

    from hsd_serve.bench.datasets import load_prompts
    from hsd_serve.core.sampling import SamplingParams
    from hsd_serve.engine.drafter import DraftCall
    from hsd_serve.models.hf import ModelSpec, describe_model
    from hsd_serve.zoo import bundled_model_dir

    torch.set_num_threads(threads)
    target_vocab = describe_model(ModelSpec(str(bundled_model_dir("target")))).tokenizer.vocab
    prompts = [p.text for p in load_prompts("humaneval")]
    workers, vd = _workers(target_vocab, eager, head_ids, threads)
    rows, mismatched = [], []
    try:
        for method in methods:
            for n in batches:
                texts = {b: [b""] * n for b in workers}
                time_s = {b: 0.0 for b in workers}
                tokens = {b: 0 for b in workers}
                drafts = {b: [] for b in workers}
                for b, w in workers.items():
                    for i in range(n):
                        w.open(f"{method}{n}-{i}", method, prompts[i % len(prompts)],
                               SamplingParams())
                for r in range(rounds + 1):  # round 0 warms up (prefill), not timed
                    for b, w in workers.items():
                        calls = [DraftCall(f"{method}{n}-{i}", k, r, generated=texts[b][i])
                                 for i in range(n)]
                        t0 = time.perf_counter()
                        out = w.draft_batch(calls)
                        dt = time.perf_counter() - t0
                        for i, d in enumerate(out):
                            if isinstance(d, Exception):
                                raise d
                            texts[b][i] += d.text or b" "
                            drafts[b].append(list(d.drafter_ids))
                            tokens[b] += len(d.drafter_ids) if r else 0
                        time_s[b] += dt if r else 0.0
                for b, w in workers.items():
                    for i in range(n):
                        w.free(f"{method}{n}-{i}")
                    rows.append({"method": method, "batch": n, "backend": b, "k": k,
                                 "rounds": rounds, "drafted_tokens": tokens[b],
                                 "seconds": time_s[b],
                                 "ms_per_drafted_token": time_s[b] / max(1, tokens[b]) * 1e3})
                    # the same model, the same drafts: vLLM against HF, plain against transformers
                    same_as = "hf" if b == "vllm" else b[:-len(" plain")] if b.endswith(
                        " plain") else None
                    if same_as is not None and drafts[b] != drafts[same_as]:
                        mismatched.append((method, n, b))
                print(" | ".join(f"{method} N={n} {b}: {r['ms_per_drafted_token']:.2f} ms/token"
                                 for b, r in zip(workers, rows[-len(workers):])), flush=True)
    finally:
        vd.close()
    return {"rows": rows, "same_drafts": not mismatched, "mismatched": mismatched,
            "k": k, "rounds": rounds, "vllm_enforce_eager": eager, "threads": threads,
            "cpus": os.cpu_count(), "loadavg_end": list(os.getloadavg())}


def markdown(res: dict) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in res["rows"]))
    lines = [f"k = {res['k']}, {res['rounds']} timed rounds, vLLM eager = "
             f"{res['vllm_enforce_eager']}, same drafts in every backend: {res['same_drafts']}",
             "", "| method | batch | " + " | ".join(f"{b} ms/token" for b in backends)
             + " | vllm ÷ hf |", "|---|---|" + "---|" * (len(backends) + 1)]
    keyed = {(r["method"], r["batch"], r["backend"]): r["ms_per_drafted_token"]
             for r in res["rows"]}
    for m, n in dict.fromkeys((r["method"], r["batch"]) for r in res["rows"]):
        vals = [keyed[m, n, b] for b in backends]
        lines.append(f"| {m} | {n} | " + " | ".join(f"{v:.2f}" for v in vals)
                     + f" | {keyed[m, n, 'vllm'] / keyed[m, n, 'hf']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,4,16", help="comma list of batch sizes")
    ap.add_argument("--methods", default="slem,tli")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--eager", action="store_true", help="vLLM in eager mode (default compiled)")
    ap.add_argument("--head-ids", type=int, default=16384,
                    help="also the HF drafter with its head pruned to N ids (0: not)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/drafter-backends-batch-cpu")
    a = ap.parse_args()
    res = run([int(x) for x in a.batch.split(",")], a.methods.split(","), a.k, a.rounds,
              a.eager, a.head_ids, a.threads)
    res["command"] = "python bench/drafter_backends.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not False)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    if not res["same_drafts"]:
        raise SystemExit(f"backends drafted differently: {res['mismatched']}")


if __name__ == "__main__":
    main()
