"""Align a drafter to the target: fine-tune it on the target's own greedy continuations.

Speculation pays in proportion to how often the drafter predicts what the *target* will say, not
how good a language model the drafter is.  This is the usual drafter-alignment step (distillation
on target outputs): prompts are windows of the training corpus (the stdlib; never the benchmark
prompts), the target continues each greedily, and the drafter — with its own tokenizer — is
trained on prompt + continuation text with the loss on the continuation only.  The target is not
touched, so losslessness and the target's outputs are unchanged.

``python -m hsd_serve.zoo distill --prompts 300 --minutes 6`` (after ``build``).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path


def corpus_prompts(n: int, seed: int = 0, min_chars: int = 80, max_chars: int = 400) -> list[str]:
    """``n`` prompt windows from the training files, each starting and ending at a line start."""
    from hsd_serve.zoo.corpus import Corpus

    corpus = Corpus.build()
    rng = random.Random(seed)
    files = list(corpus.train)
    rng.shuffle(files)
    out: list[str] = []
    for text in corpus.texts(files):
        lines = text.splitlines(keepends=True)
        if len(lines) < 8:
            continue
        start = rng.randrange(0, max(1, len(lines) - 8))
        window = ""
        for line in lines[start:]:
            if len(window) + len(line) > max_chars:
                break
            window += line
        if len(window) >= min_chars:
            out.append(window)
        if len(out) >= n:
            break
    return out


def target_continuations(target_dir: Path, prompts: list[str], max_new_tokens: int,
                         batch: int = 1) -> list[str]:
    """The target's greedy continuation of each prompt (text after the prompt).

    ``batch`` > 1 runs ``transformers`` ``generate`` on left-padded batches: padding can move
    logits by float rounding, so a near-tie may resolve differently than in the engine.  That is
    harmless here (these are training examples, not outputs), and it is 5-10x faster on CPU.
    """
    from tqdm import tqdm

    if batch <= 1:
        from hsd_serve.engine.local import Engine
        from hsd_serve.engine.types import GenerationRequest
        from hsd_serve.models.hf import LoadedModel, ModelSpec

        engine = Engine(LoadedModel(ModelSpec(str(target_dir))))
        return [engine.generate(GenerationRequest(p, max_new_tokens=max_new_tokens, method="ar")).text
                for p in tqdm(prompts, desc="target continuations")]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if tok.pad_token_id is None:
        tok.pad_token_id = eos
    tok.padding_side = "left"
    out: list[str] = []
    for i in tqdm(range(0, len(prompts), batch), desc=f"target continuations (batch {batch})"):
        chunk = prompts[i:i + batch]
        enc = tok(chunk, return_tensors="pt", padding=True)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        for r, prompt in enumerate(chunk):
            p_ids = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()
            new = gen[r, width:].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            full = tok.decode(p_ids + new, skip_special_tokens=True)
            head = tok.decode(p_ids, skip_special_tokens=True)
            out.append(full[len(head):] if full.startswith(head) else tok.decode(new, skip_special_tokens=True))
    return out


def finetune(drafter_dir: Path, pairs: list[tuple[str, str]], out_dir: Path, minutes: float,
             lr: float = 1e-3, batch: int = 8, seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(drafter_dir))
    model = AutoModelForCausalLM.from_pretrained(str(drafter_dir), dtype=torch.float32)
    model.train()
    examples = []
    for prompt, cont in pairs:
        p_ids = tok.encode(prompt, add_special_tokens=False)
        c_ids = tok.encode(prompt + cont, add_special_tokens=False)[len(p_ids):]
        if c_ids:
            examples.append((p_ids[-192:], c_ids[:64]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    t_start = time.time()
    t_end = t_start + minutes * 60
    steps, losses = 0, []
    while time.time() < t_end:
        rng.shuffle(examples)
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (p, c) in enumerate(chunk):
                seq = p + c
                ids[r, :len(seq)] = torch.tensor(seq)
                labels[r, len(p):len(seq)] = torch.tensor(c)
                mask[r, :len(seq)] = 1
            frac = min(1.0, (time.time() - t_start) / max(t_end - t_start, 1e-9))
            for g in opt.param_groups:  # linear decay to 0.1x over the time budget
                g["lr"] = lr * (1.0 - 0.9 * frac)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
            if time.time() >= t_end:
                break
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if Path(out_dir).resolve() != Path(drafter_dir).resolve():  # same folder: keep its files as they are
        tok.save_pretrained(str(out_dir))
    return {"steps": steps, "examples": len(examples), "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}


def main(argv=None) -> int:
    from hsd_serve.zoo import bundled_model_dir

    ap = argparse.ArgumentParser(prog="python -m hsd_serve.zoo distill", description=__doc__)
    ap.add_argument("--target", default=None)
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--out", default=None, help="default: overwrite the drafter folder")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-batch", type=int, default=32,
                    help="prompts per batched target generate() (1: one by one through the engine)")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    target = Path(args.target or bundled_model_dir("target"))
    drafter = Path(args.drafter or bundled_model_dir("drafter"))
    out = Path(args.out or drafter)
    t0 = time.time()
    prompts = corpus_prompts(args.prompts, seed=args.seed)
    conts = target_continuations(target, prompts, args.max_new_tokens, batch=args.gen_batch)
    t_gen = time.time() - t0
    info = finetune(drafter, list(zip(prompts, conts)), out, args.minutes, lr=args.lr, seed=args.seed)
    info.update(prompts=len(prompts), generate_s=round(t_gen, 1),
                total_s=round(time.time() - t0, 1), target=str(target), drafter=str(drafter),
                max_new_tokens=args.max_new_tokens, minutes=args.minutes, lr=args.lr,
                threads=args.threads, gen_batch=args.gen_batch, seed=args.seed)
    import json

    (out / "distill.json").write_text(json.dumps(info, indent=1))
    print(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
