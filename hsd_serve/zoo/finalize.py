"""Export trained checkpoints into the bundled folders, measure them, and write model cards."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .corpus import Corpus  # noqa: E402
from .specs import SIZING_NOTES, SPECS, ModelSpec  # noqa: E402
from .train import stage_of  # noqa: E402
from .toks import doc_ids  # noqa: E402

SAMPLE_PROMPTS = [
    'def fib(n):\n    """Return the n-th Fibonacci number."""\n',
    'def is_palindrome(text: str) -> bool:\n    """Check if the given string is a palindrome."""\n',
    "def sum_list(numbers):\n    total = 0\n    for",
]

KEEP_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "LICENSE")


def fresh_copy(src: Path, dst: Path, files) -> None:
    """Replace folder ``dst`` by the ``files`` of ``src`` that exist."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in files:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)


def _load(path: Path, dtype=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    kw = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()
    return model, tok


def val_loss_per_byte(model, tok, spec, docs: list[str], seq_len: int = 256) -> dict:
    """Mean NLL over the fixed validation sample, per token and per UTF-8 byte.

    Documents are tokenized like in training and packed into non-overlapping windows of
    ``seq_len`` tokens; nats/byte = total NLL over predicted tokens / bytes those tokens cover,
    with bytes estimated as predicted_tokens * (sample bytes / sample tokens)."""
    import torch

    ids: list[int] = []
    for d in docs:
        ids.extend(doc_ids(tok, d, spec.bos_id, spec.eos_id))
    n_bytes = sum(len(d.encode()) for d in docs)
    n_tok = len(ids)
    n_win = n_tok // seq_len
    x = torch.tensor(ids[: n_win * seq_len]).view(n_win, seq_len)
    tot, cnt = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n_win, 8):
            b = x[i : i + 8]
            logits = model(b).logits.float()
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
            tot += float(lp)
            cnt += b.shape[0] * (seq_len - 1)
    per_tok = tot / cnt
    bytes_per_tok = n_bytes / n_tok
    return {"val_nats_per_token": per_tok, "val_nats_per_byte": per_tok / bytes_per_tok,
            "val_bits_per_byte": per_tok / bytes_per_tok / 0.6931471805599453,
            "val_sample_bytes": n_bytes, "val_sample_tokens": n_tok, "bytes_per_token": bytes_per_tok}


def _context_ids(tok, spec, text: str, n: int = 128) -> list[int]:
    ids = doc_ids(tok, text, spec.bos_id, None)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def decode_step_ms(models: dict, contexts: dict, rounds: int = 5, steps: int = 30) -> dict:
    """Median ms of one forward (batch 1, one new token, DynamicCache holding ``len(context)``
    tokens).  Models are measured interleaved round by round so that load changes on a shared
    machine hit all of them alike."""
    import torch
    from transformers import DynamicCache

    times: dict = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for k, m in models.items():
                ctx = torch.tensor([contexts[k]])
                cache = DynamicCache()
                m(ctx, past_key_values=cache, use_cache=True)
                nxt = ctx[:, -1:]
                for i in range(steps + 3):
                    t0 = time.perf_counter()
                    m(nxt, past_key_values=cache, use_cache=True)
                    dt = time.perf_counter() - t0
                    cache.crop(-1)
                    if i >= 3:
                        times[k].append(dt)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def greedy(model, tok, prompt: str, max_new_tokens: int = 64) -> str:
    import torch

    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def greedy_agreement(target_text: str, prompt: str, model, tok, spec) -> tuple[int, int]:
    """Rough proxy of one-token drafting acceptance: walk the target's greedy continuation; at
    each position the drafter greedily proposes one token for (prompt + text so far); count it
    accepted if its text is a prefix of the remaining target text. Returns (accepted, proposed)."""
    import torch

    acc = prop = 0
    pos = 0
    with torch.inference_mode():
        while pos < len(target_text):
            ids = doc_ids(tok, prompt + target_text[:pos], spec.bos_id, None)
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            piece = tok.decode([nxt])
            prop += 1
            if piece and "\ufffd" not in piece and target_text.startswith(piece, pos):
                acc += 1
                pos += len(piece)
            else:
                pos += 1 if not piece or "\ufffd" in piece else max(1, min(len(piece), 4))
                # skip ahead roughly one target token after a rejection
    return acc, prop


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def _stages_text(st: dict) -> str:
    """One line per training stage (a continued run starts from the previous stage's weights and
    reads on in the corpus where it stopped)."""
    stages = st.get("stages") or [stage_of(st)]
    lines = ["Stages:"]
    for i, sg in enumerate(stages, 1):
        start = "from scratch" if not sg.get("init_from") else "continued from stage " + str(i - 1)
        lines.append(f"{i}. {start}: {sg['steps']:,} steps, {sg['tokens']:,} tokens, "
                     f"{sg['wall_s'] / 60:.1f} min, peak lr {sg['lr']}, batch {sg['batch']}, "
                     f"{sg['threads']} torch thread(s){', torch.compile' if sg.get('compile') else ''}")
    if len(stages) == 1 and stages[0].get("threads") == 1:
        lines.append("(another training process ran beside it on the 2-core shared machine)")
    return "\n".join(lines)


def _card(name: str, spec, info: dict) -> str:
    st = info["state"]
    hist = "\n".join(
        f"| {h['step']} | {h['tokens']:,} | {h['elapsed_s']/60:.1f} | {h['val_loss']:.3f} |"
        for h in st["history"])
    lat = info["latency_ms"]
    lat_rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in lat.items())
    samples = "\n\n".join(f"Prompt:\n```python\n{p}```\nGreedy continuation ({info['sample_tokens']} "
                          f"new tokens):\n```python\n{s}\n```" for p, s in info["samples"])
    tok_desc = {
        "target": "Mistral-7B-v0.1 SentencePiece BPE with byte fallback, 32000 tokens (Apache-2.0, see LICENSE); `<s>`=1 is prepended and `</s>`=2 appended to every training document",
        "drafter": "GPT-2 byte-level BPE, full 50257-token vocabulary (MIT, see LICENSE); `<|endoftext|>`=50256 appended to every training document",
        "byte_drafter": "byte-level: 256 tokens, id = byte value, spelled in the GPT-2 byte-to-unicode alphabet, no merges, plus `<|endoftext|>`=256 (bos/eos), appended to every training document",
    }[name]
    agree = info.get("agreement")
    agree_txt = ""
    if agree:
        agree_txt = (f"\nGreedy one-token agreement with the bundled target on the sample prompts (proxy for "
                     f"drafting acceptance; see `hsd_serve/zoo/finalize.py:greedy_agreement`): "
                     f"**{agree['rate']:.2f}** ({agree['accepted']}/{agree['proposed']}).\n")
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---
# hsd_serve zoo: `{name}`

A tiny `LlamaForCausalLM` trained from scratch, on CPU, offline, by
`python -m hsd_serve.zoo build` (hsd_serve/zoo). It is a test/benchmark fixture for speculative
decoding across vocabularies, not a useful code model.

## Model
- architecture: LlamaForCausalLM, hidden {spec.hidden_size}, {spec.num_layers} layers, {spec.num_heads} heads
  ({spec.num_kv_heads} kv), MLP {spec.intermediate_size}, tied embeddings, RoPE, context used in training {spec.seq_len}
- parameters: **{st['params']:,}** ({st['params']/1e6:.2f}M; weights stored as {spec.save_dtype},
  model.safetensors = {info['weights_bytes']/1e6:.1f} MB)
- tokenizer: {tok_desc}

## Data
The `*.py` files of the CPython {platform.python_version()} standard library of the training interpreter
(`sysconfig.get_paths()["stdlib"]`, {st['train_files']} training files, {st['val_files']} validation files ≈1%,
chosen by a hash of the relative path; `site-packages` excluded; files that are not valid UTF-8 skipped).
No HumanEval/MBPP text is in it. Training order: seeded hash shuffle of the file list (seed {st['seed']}).

## Training
AdamW (β=0.9/0.95, weight decay {spec.weight_decay}, grad clip 1.0), {spec.warmup_steps} warmup
steps then cosine to {spec.min_lr_ratio}× the peak lr over each stage's wall-clock budget, bf16 autocast.
{_stages_text(st)}

- steps: **{st['steps']:,}**, tokens seen: **{st['tokens_seen']:,}**
- training wall time: **{st['train_wall_s']/60:.1f} min**

| step | tokens | minutes | val loss (16×{spec.seq_len} tokens) |
|---|---|---|---|
{hist}

## Evaluation (fixed validation sample: first {info['val']['val_sample_bytes']:,} bytes of the validation files)
- validation loss: **{info['val']['val_nats_per_token']:.4f} nats/token**, **{info['val']['val_nats_per_byte']:.4f} nats/byte**
  ({info['val']['val_bits_per_byte']:.4f} bits/byte; {info['val']['bytes_per_token']:.2f} bytes/token)
{agree_txt}
## Decode latency on the build machine
One forward of batch 1 with a `DynamicCache` holding a 128-token context, one new token, model
forward only (no sampling / generate overhead), median of {info['latency_rounds']} interleaved rounds,
{info['bench_threads']} torch thread(s), {info['machine']}, measured {info['measured_at']}. Expect ±20–30% noise on a shared machine.

| model (dtype) | ms per step |
|---|---|
{lat_rows}

{SIZING_NOTES if name == "target" else ""}
## Samples
{samples}
"""


def finalize(workdir: Path, out: Path, names=None, threads: int = 1, assets=None,
             corpus_root=None, seed: int = 0) -> dict:
    import torch

    torch.set_num_threads(threads)
    names = list(names or SPECS)
    workdir, out = Path(workdir), Path(out)
    corpus = Corpus.build(corpus_root, seed=seed)
    docs = corpus.val_text_sample()
    infos: dict = {}
    # 1. copy folders
    for name in names:
        src = workdir / name / "hf"
        state = json.loads((workdir / name / "state.json").read_text())
        dst = out / name
        fresh_copy(src, dst, KEEP_FILES)
        infos[name] = {"state": state, "dir": dst, "spec": ModelSpec(**state["spec"])}
    # 2. load + measure
    loaded = {n: _load(infos[n]["dir"]) for n in names}
    bench_models, contexts = {}, {}
    ctx_text = docs[0]
    for n in names:
        m, tok = loaded[n]
        spec = infos[n]["spec"]
        bench_models[f"{n} ({spec.save_dtype})"] = m
        contexts[f"{n} ({spec.save_dtype})"] = _context_ids(tok, spec, ctx_text)
        if n != "target":  # the alternative dtype, to justify the stored one
            alt = "bfloat16" if spec.save_dtype == "float32" else "float32"
            k = f"{n} ({alt})"
            bench_models[k] = _load(infos[n]["dir"], getattr(torch, alt))[0]
            contexts[k] = contexts[f"{n} ({spec.save_dtype})"]
    rounds = 5
    lat = decode_step_ms(bench_models, contexts, rounds=rounds)
    measured_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, load avg {load:.1f}"
    target_key = "target (bfloat16)"
    for n in names:
        m, tok = loaded[n]
        spec = infos[n]["spec"]
        info = infos[n]
        t0 = time.time()
        info["val"] = val_loss_per_byte(m, tok, spec, docs)
        info["samples"] = [(p, greedy(m, tok, p)) for p in SAMPLE_PROMPTS]
        info["sample_tokens"] = 64
        info["latency_ms"] = {k: v for k, v in lat.items() if k.startswith(n + " ")}
        if target_key in lat and n != "target":
            info["latency_ms"]["target (bfloat16), same run"] = lat[target_key]
            info["step_ratio_target_over_this"] = lat[target_key] / lat[f"{n} ({spec.save_dtype})"]
        info["latency_rounds"] = rounds
        info["bench_threads"] = threads
        info["machine"] = machine
        info["measured_at"] = measured_at
        info["weights_bytes"] = (info["dir"] / "model.safetensors").stat().st_size
        print(f"{n}: val {info['val']['val_nats_per_token']:.4f} nats/tok "
              f"{info['val']['val_nats_per_byte']:.4f} nats/byte ({time.time()-t0:.0f}s)", flush=True)
    if "target" in names:
        for n in names:
            if n == "target":
                continue
            acc = prop = 0
            m, tok = loaded[n]
            for p, s in infos["target"]["samples"]:
                a, b = greedy_agreement(s, p, m, tok, infos[n]["spec"])
                acc, prop = acc + a, prop + b
            infos[n]["agreement"] = {"accepted": acc, "proposed": prop, "rate": acc / max(prop, 1)}
    summary = {}
    for n in names:
        info = infos[n]
        (info["dir"] / "README.md").write_text(_card(n, info["spec"], info))
        rec = {k: v for k, v in info.items() if k not in ("dir", "spec")}
        rec["state"] = {k: v for k, v in info["state"].items()}
        (info["dir"] / "zoo_card.json").write_text(json.dumps(rec, indent=1, default=str))
        summary[n] = {"params": info["state"]["params"], "latency_ms": info["latency_ms"],
                      "val": info["val"], "steps": info["state"]["steps"],
                      "tokens_seen": info["state"]["tokens_seen"],
                      "train_wall_min": info["state"]["train_wall_s"] / 60,
                      "agreement": info.get("agreement"),
                      "ratio": info.get("step_ratio_target_over_this")}
        print(f"\n=== {n} ===\n" + json.dumps(summary[n], indent=1, default=str))
        for p, s in info["samples"]:
            print(f"--- prompt ---\n{p}--- greedy ---\n{s}\n")
    _write_index(out, infos)
    total = sum(_dir_bytes(out / n, "*.safetensors") for n in MODEL_DIRS(out))
    print(f"total bundled weights: {total/1e6:.1f} MB")
    return summary


def MODEL_DIRS(out: Path) -> list[str]:
    return [p.name for p in Path(out).iterdir() if p.is_dir() and (p / "config.json").exists()]


def _write_index(out: Path, infos: dict) -> None:
    rows = []
    for n, info in infos.items():
        st, v = info["state"], info["val"]
        main_lat = info["latency_ms"].get(f"{n} ({info['spec'].save_dtype})", float("nan"))
        ratio = info.get("step_ratio_target_over_this")
        agree = info.get("agreement")
        ratio_s = f"{ratio:.1f}x" if ratio else "-"
        agree_s = f"{agree['rate']:.2f}" if agree else "-"
        rows.append(
            f"| `{n}` | {st['params']/1e6:.2f}M | {info['spec'].save_dtype} | {main_lat:.2f} | {ratio_s} | "
            f"{v['val_nats_per_token']:.3f} | {v['val_nats_per_byte']:.3f} | {st['tokens_seen']:,} | "
            f"{st['train_wall_s']/60:.1f} | {agree_s} |")
    mins = {n: max(1, round(info["state"]["train_wall_s"] / 60)) for n, info in infos.items()}
    cmd = "python -m hsd_serve.zoo build"
    for n, flag in (("target", "--minutes-target"), ("drafter", "--minutes-drafter"),
                    ("byte_drafter", "--minutes-byte")):
        if n in mins:
            cmd += f" {flag} {mins[n]}"
    text = f"""# Bundled zoo models

Built by `{cmd}` (see each folder's README.md for details; the
timings depend on the machine and on what else ran on it).

| model | params | dtype | decode ms/step | target step ÷ this | val nats/token | val nats/byte | tokens seen | train min | greedy agreement with target |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    (Path(out) / "README.md").write_text(text)
