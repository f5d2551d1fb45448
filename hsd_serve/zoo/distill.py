"""Align a drafter to the target: fine-tune it on the target's own greedy continuations.

Speculation pays in proportion to how often the drafter predicts what the *target* will say, not
how good a language model the drafter is.  This is the usual drafter-alignment step (distillation
on target outputs): prompts are windows of the training corpus (the stdlib; never the benchmark
prompts), the target continues each greedily, and the drafter — with its own tokenizer — is
trained on prompt + continuation text with the loss on the continuation only.  The target is not
touched, so losslessness and the target's outputs are unchanged.

``python -m hsd_serve.zoo distill --prompts 300 --minutes 6`` (after ``build``).  This is the
greedy-only case of ``hsd-serve align`` (:mod:`hsd_serve.zoo.align`, whose training loop it uses),
which adds the target's sampled text and a soft-label loss on the shared vocabulary.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path


def corpus_prompts(n: int, seed: int = 0, min_chars: int = 80, max_chars: int = 400,
                   root: Path | None = None) -> list[str]:
    """``n`` prompt windows from the training files (of ``root``, default the stdlib), each
    starting and ending at a line start."""
    from hsd_serve.zoo.corpus import Corpus

    corpus = Corpus.build(root)
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


def generate_batches(model, tok, prompts: list[str], max_new_tokens: int, batch: int, *,
                     temperature: float = 0.0, seed: int = 0, logits: bool = False,
                     desc: str = "target continuations"):
    """Continue ``prompts`` with ``transformers`` ``generate`` on left-padded batches.

    Yields ``(prompt_ids, new_ids, step_logits)`` per prompt, in order: the prompt's ids as the
    model saw them, the generated ids up to (not including) the first end-of-sequence id, and with
    ``logits`` the raw logits of each generated position (``[len(new_ids), V]``, else ``None``).
    ``temperature`` 0 is greedy; otherwise the full distribution softmax(logits / T) is sampled
    (no top-k / top-p), seeded per batch from ``seed``.  Padding can move logits by float
    rounding, so a near-tie may resolve differently than in the engine: harmless for training
    examples, and 5-10x faster on CPU than one prompt at a time.
    """
    import torch
    from tqdm import tqdm

    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if tok.pad_token_id is None:
        tok.pad_token_id = eos
    tok.padding_side = "left"
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) \
        if temperature > 0 else dict(do_sample=False)
    for i in tqdm(range(0, len(prompts), batch), desc=f"{desc} (batch {batch})"):
        chunk = prompts[i:i + batch]
        enc = tok(chunk, return_tensors="pt", padding=True)
        torch.manual_seed(seed * 1_000_003 + i)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 return_dict_in_generate=True, output_logits=logits, **sampling)
        width = enc["input_ids"].shape[1]
        step_logits = torch.stack(out.logits, dim=1) if logits else None  # [B, steps, V]
        for r in range(len(chunk)):
            p_ids = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()
            new = out.sequences[r, width:].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            yield p_ids, new, (step_logits[r, :len(new)].float() if logits else None)


def target_continuations(target_dir: Path, prompts: list[str], max_new_tokens: int,
                         batch: int = 1) -> list[str]:
    """The target's greedy continuation of each prompt (text after the prompt).

    ``batch`` > 1 runs :func:`generate_batches` (left-padded ``generate``); 1 runs the engine.
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
    out: list[str] = []
    for p_ids, new, _ in generate_batches(model, tok, prompts, max_new_tokens, batch):
        full = tok.decode(p_ids + new, skip_special_tokens=True)
        head = tok.decode(p_ids, skip_special_tokens=True)
        out.append(full[len(head):] if full.startswith(head) else tok.decode(new, skip_special_tokens=True))
    return out


def finetune(drafter_dir: Path, pairs: list[tuple[str, str]], out_dir: Path, minutes: float,
             lr: float = 1e-3, batch: int = 8, seed: int = 0) -> dict:
    """Cross-entropy on the drafter's tokenization of each continuation (``pairs``: prompt,
    continuation text); the greedy-only case of :mod:`hsd_serve.zoo.align`'s training loop."""
    import torch

    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo.align import Trainer, hard_example

    torch.manual_seed(seed)
    drafter = LoadedModel(ModelSpec(str(drafter_dir), dtype="float32"))
    examples = [ex for ex in (hard_example(drafter.tokenizer, p, c) for p, c in pairs) if ex]
    trainer = Trainer(drafter.model, examples, lr=lr, batch=batch, seed=seed)
    info = trainer.run(minutes * 60, desc="distill")
    out_dir.mkdir(parents=True, exist_ok=True)
    drafter.model.save_pretrained(str(out_dir))
    if Path(out_dir).resolve() != Path(drafter_dir).resolve():  # same folder: keep its files as they are
        drafter.tokenizer.hf.save_pretrained(str(out_dir))
    return {"steps": info["steps"], "examples": len(examples), "first_loss": info["first_loss"],
            "last_loss": info["last_loss"]}


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
