"""Single-model trainer (one process, one thread): time-budgeted AdamW + warmup/cosine, bf16
autocast, packed fixed-length sequences from the stdlib corpus, periodic checkpoints exported as
Hugging Face folders so that partial results are usable."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from .corpus import Corpus  # noqa: E402
from .specs import ModelSpec  # noqa: E402
from .toks import doc_ids, install_tokenizer, load_tokenizer  # noqa: E402


def _log(logf, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if logf is not None:
        with open(logf, "a") as fh:
            fh.write(line + "\n")


def token_stream(corpus: Corpus, files: list[str], tok, spec: ModelSpec) -> Iterator[int]:
    """Endless stream of token ids over ``files`` (documents in the given order, repeated)."""
    while True:
        n = 0
        for text in corpus.texts(files):
            ids = doc_ids(tok, text, spec.bos_id, spec.eos_id)
            n += len(ids)
            yield from ids
        if n == 0:
            raise RuntimeError("empty corpus")


def batches(corpus: Corpus, tok, spec: ModelSpec):
    """Yield int64 tensors [B, T]. Row i reads the train files i, i+B, i+2B, ... so that the rows
    of a batch come from different documents."""
    import torch

    B, T = spec.batch_size, spec.seq_len
    streams = [token_stream(corpus, corpus.train[i::B], tok, spec) for i in range(B)]
    while True:
        rows = [[next(s) for _ in range(T)] for s in streams]
        yield torch.tensor(rows, dtype=torch.long)


def val_chunks(corpus: Corpus, tok, spec: ModelSpec, n_chunks: int = 16):
    import torch

    T = spec.seq_len
    buf: list[int] = []
    for text in corpus.texts(corpus.val):
        buf.extend(doc_ids(tok, text, spec.bos_id, spec.eos_id))
        if len(buf) >= n_chunks * T:
            break
    buf = buf[: (len(buf) // T) * T][: n_chunks * T]
    return torch.tensor(buf, dtype=torch.long).view(-1, T)


def eval_loss(model, chunks, batch: int = 8) -> float:
    import torch

    model.eval()
    tot, n = 0.0, 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, chunks.shape[0], batch):
            x = chunks[i : i + batch]
            out = model(x, labels=x)
            k = x.shape[0] * (x.shape[1] - 1)
            tot += float(out.loss) * k
            n += k
    model.train()
    return tot / n


def lr_at(spec: ModelSpec, step: int, frac: float) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = min(max(frac, 0.0), 1.0)
    cos = 0.5 * (1 + math.cos(math.pi * frac))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cos)


def export_hf(model, spec: ModelSpec, out_dir: Path, assets: Path | None) -> None:
    import copy

    import torch
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(getattr(torch, spec.save_dtype)).eval()
    m.config.dtype = spec.save_dtype
    m.generation_config = GenerationConfig(
        bos_token_id=spec.bos_id if spec.bos_id is not None else spec.eos_id,
        eos_token_id=spec.eos_id,
        pad_token_id=spec.eos_id,
        do_sample=False,
    )
    m.save_pretrained(str(out_dir))
    install_tokenizer(spec.name, out_dir, assets)


def stage_of(state: dict) -> dict:
    """A stage record for a state written before stages were tracked."""
    return {"init_from": None, "steps": state.get("steps"), "tokens": state.get("tokens_seen"),
            "wall_s": state.get("train_wall_s"), "threads": state.get("threads"), "compile": False,
            "lr": state.get("spec", {}).get("lr"),
            "batch": f"{state.get('spec', {}).get('batch_size')}x{state.get('spec', {}).get('seq_len')}"}


def train(
    spec: ModelSpec,
    workdir: Path,
    *,
    minutes: float | None = None,
    seed: int = 0,
    threads: int = 1,
    ckpt_minutes: float = 4.0,
    assets: Path | None = None,
    corpus_root: Path | None = None,
    max_steps: int | None = None,
    init_from: Path | None = None,
    compile: bool = False,
    lr: float | None = None,
) -> dict:
    """Train ``spec`` for a wall-clock budget. ``init_from`` continues from an exported HF folder
    (a previous stage: its ``../state.json`` is carried into the history and totals), ``compile``
    wraps the model in ``torch.compile`` (≈1.5× tokens/s on CPU), ``lr`` overrides the peak lr."""

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    budget_s = 60.0 * (minutes if minutes is not None else spec.minutes)
    wd = Path(workdir) / spec.name
    wd.mkdir(parents=True, exist_ok=True)
    logf = wd / "train.log"
    corpus = Corpus.build(corpus_root, seed=seed)
    tok = load_tokenizer(spec.name, assets)
    prior: dict = {}
    if init_from is not None:
        model = LlamaForCausalLM.from_pretrained(str(init_from), dtype=torch.float32)
        prior_state = Path(init_from).parent / "state.json"
        if prior_state.is_file():
            prior = json.loads(prior_state.read_text())
    else:
        model = LlamaForCausalLM(spec.llama_config())
    if lr is not None:
        import dataclasses

        spec = dataclasses.replace(spec, lr=lr)
    fwd = torch.compile(model) if compile else model
    n_params = sum(p.numel() for p in model.parameters())
    _log(logf, f"{spec.name}: {n_params/1e6:.2f}M params, budget {budget_s/60:.1f} min, "
               f"{len(corpus.train)} train / {len(corpus.val)} val files, spec={spec.to_dict()}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    vchunks = val_chunks(corpus, tok, spec)
    history: list[dict] = list(prior.get("history", []))
    base_steps, base_tokens = prior.get("steps", 0), prior.get("tokens_seen", 0)
    base_wall = prior.get("train_wall_s", 0.0)
    stages: list[dict] = list(prior.get("stages") or ([stage_of(prior)] if prior else []))
    t0 = time.time()
    last_ckpt = t0
    tokens = 0
    step = 0
    loss_ema = None
    state: dict = {}

    def checkpoint(final: bool) -> None:
        nonlocal state
        vl = eval_loss(model, vchunks)
        elapsed = time.time() - t0
        history.append({"step": base_steps + step, "tokens": base_tokens + tokens,
                        "elapsed_s": round(base_wall + elapsed, 1),
                        "val_loss": round(vl, 4), "train_loss_ema": loss_ema and round(loss_ema, 4)})
        export_hf(model, spec, wd / "hf", assets)
        stage = {"init_from": str(init_from) if init_from else None, "steps": step, "tokens": tokens,
                 "wall_s": round(elapsed, 1), "threads": threads, "compile": compile,
                 "lr": spec.lr, "batch": f"{spec.batch_size}x{spec.seq_len}"}
        state = {"name": spec.name, "spec": spec.to_dict(), "params": n_params,
                 "steps": base_steps + step, "tokens_seen": base_tokens + tokens,
                 "train_wall_s": round(base_wall + elapsed, 1), "seed": seed,
                 "threads": threads, "final": final, "history": history,
                 "stages": stages + [stage],
                 "train_files": len(corpus.train), "val_files": len(corpus.val),
                 "torch": torch.__version__}
        (wd / "state.json").write_text(json.dumps(state, indent=1))
        _log(logf, f"ckpt step {step} tokens {tokens} val_loss {vl:.4f} elapsed {elapsed/60:.1f} min"
                   + (" (final)" if final else ""))

    model.train()
    stream = batches(corpus, tok, spec)
    for _ in range(base_steps):  # a continued stage reads on from where the previous one stopped
        next(stream)
    for x in stream:
        elapsed = time.time() - t0
        if elapsed >= budget_s or (max_steps is not None and step >= max_steps):
            break
        lr = lr_at(spec, step, elapsed / budget_s)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fwd(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        lv = loss.item()
        loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        if step % 25 == 0 or step == 1:
            _log(logf, f"step {step} loss {lv:.4f} ema {loss_ema:.4f} lr {lr:.2e} tokens {tokens} "
                       f"{tokens/max(elapsed,1e-9):.0f} tok/s")
        if time.time() - last_ckpt >= ckpt_minutes * 60:
            checkpoint(final=False)
            last_ckpt = time.time()
    checkpoint(final=True)
    return state
