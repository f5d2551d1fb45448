"""``hsd-serve align``: fine-tune any drafter toward any target, for sampling and for greedy.

Speculation pays in proportion to how often the target accepts what the drafter proposes.  For
TLI at temperature T the first drafted token is accepted with probability
``α = Σ_y min(p(y), q'(y))``, where ``p`` is the target's processed distribution over target ids
and ``q'`` the drafter's distribution restricted to the vocabulary intersection ``I`` and moved
onto target ids (:func:`hsd_serve.core.vocab.project_to_target`).  ``α ≤ p(I)``, with equality
when ``q' = p|_I / p(I)``.  A drafter distilled on the target's *greedy* text is peaked where the
target is broad, so α stays low when sampling.

This module trains the drafter on text the target generates, at the temperatures users serve
(sampled from the full ``softmax(logits / T)``) plus greedily:

* **soft loss** (sampled text): at every *aligned position* of a continuation, KL (or total
  variation) between ``p̃ = p|_I / p(I)`` (the target's distribution at T, restricted to the
  intersection, top ``label_top_k`` ids kept) and ``q'`` computed from the drafter's logits with
  :func:`project_to_target` over the exact-bytes id map (:func:`build_id_map`);
* **hard loss** (greedy text): cross-entropy on the drafter's own tokenization of the target's
  greedy continuation, which is what SLEM needs (the drafter's greedy text should be the
  target's); this is exactly ``distill``, whose training loop is this one.

Aligned positions.  The two models tokenize the same text differently.  Target position ``c``
(predicting continuation token ``c`` from the text before it) is aligned with drafter position
``j`` when the text before target token ``c`` is exactly the text of the first ``j`` drafter
tokens: both tokenizations have a boundary at that byte offset (:func:`shared_boundaries`).  There
the drafter's next-token distribution is conditioned on the same text as the target's, which is
the situation TLI drafts in (the drafter re-tokenizes the committed text, which ends on a target
boundary).  ``match="token"`` keeps only boundaries where the next target token is also exactly
one drafter token (both streams advance by one shared token, as in a TLI draft).  See
``docs/align.md`` for the argument and what is left out.

The target is never changed, so every method stays lossless; only speed moves.

``hsd-serve align --target T --drafter D --out DIR [--minutes M] [--temperatures 0.6,1.0]``;
``--resume`` continues from ``DIR/checkpoint``.  ``DIR`` gets the drafter (``save_pretrained`` +
tokenizer) and ``align.json`` (settings, data, held-out metrics before/after, training).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hsd_serve.zoo import BUNDLED_PREFIX, resolve_model_path

RECORD = "align.json"
CKPT_DIR = "checkpoint"


# --------------------------------------------------------------------------- positions

def shared_boundaries(a_lens: Sequence[int], b_lens: Sequence[int]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` with ``sum(a_lens[:i]) == sum(b_lens[:j])``, in increasing order.

    ``a_lens`` / ``b_lens`` are the byte lengths of two tokenizations of one text: each pair is a
    byte offset where both have a token boundary (``(0, 0)`` first; ``(len(a), len(b))`` last when
    the totals agree).  Lengths must be positive (a token that stands for no text has no place).
    """
    if any(n <= 0 for n in a_lens) or any(n <= 0 for n in b_lens):
        raise ValueError("token byte lengths must be positive")
    na, nb = len(a_lens), len(b_lens)
    i = j = oa = ob = 0
    out = [(0, 0)]
    while i < na or j < nb:
        if j == nb or (i < na and oa <= ob):
            oa += a_lens[i]
            i += 1
        else:
            ob += b_lens[j]
            j += 1
        if oa == ob:
            out.append((i, j))
    return out


@dataclass
class Example:
    """One training sequence in the drafter's ids.

    ``hard_pos[n]``: a position whose logits must predict ``ids[hard_pos[n] + 1]`` (greedy text).
    ``soft_pos[n]``: a position whose logits are matched to the target distribution given by
    ``soft_ids[n]`` (target ids, the top ``K`` of ``p`` on the intersection) and ``soft_p[n]``
    (their probabilities under ``p``, not renormalised).
    """

    ids: list[int]
    temperature: float = 0.0
    hard_pos: list[int] = field(default_factory=list)
    soft_pos: list[int] = field(default_factory=list)
    soft_ids: object = None  # torch.IntTensor [m, K]
    soft_p: object = None  # torch.FloatTensor [m, K]


def _valid_utf8_prefix(token_bytes: list[bytes]) -> int:
    """Number of leading tokens whose bytes form valid UTF-8 (byte-fallback tokens may split a
    character at the end of a continuation)."""
    n = len(token_bytes)
    while n > 0:
        try:
            b"".join(token_bytes[:n]).decode("utf-8")
            return n
        except UnicodeDecodeError:
            n -= 1
    return 0


def _encode(drafter_tok, text: str) -> Optional[tuple[list[int], list[bytes], int]]:
    """The drafter's ids of ``text``, each id's bytes, and how many bytes the tokenizer put in
    front of the text (1 for SentencePiece's dummy-prefix space); ``None`` when the ids do not
    spell the text exactly (unknown characters without byte fallback)."""
    ids = drafter_tok.encode_text(text)
    d_bytes = [drafter_tok.vocab.token_bytes[t] for t in ids]
    got, want = b"".join(d_bytes), text.encode("utf-8")
    if not all(d_bytes):
        return None
    if got == want:
        return ids, d_bytes, 0
    if got == b" " + want:
        return ids, d_bytes, 1
    return None


def _first_inside(d_bytes: list[bytes], start_byte: int) -> Optional[int]:
    """Index of the first token that starts at or after ``start_byte`` (``None``: none does)."""
    off = 0
    for n, b in enumerate(d_bytes):
        if off >= start_byte:
            return n
        off += len(b)
    return None


def hard_example(drafter_tok, prompt: str, cont: str, context: int = 192,
                 max_labels: Optional[int] = 64) -> Optional[Example]:
    """The drafter's tokenization of ``prompt + cont`` with a label on each drafter token that
    lies wholly in ``cont`` (the first ``max_labels``; ``None``: all), ``context`` drafter tokens
    of prompt kept."""
    enc = _encode(drafter_tok, prompt + cont)
    if enc is None:
        return None
    ids, d_bytes, shift = enc
    first = _first_inside(d_bytes, shift + len(prompt.encode("utf-8")))
    if first is None or first == 0:
        return None
    last = len(ids) if max_labels is None else min(len(ids), first + max_labels)
    s = max(0, first - context)
    return Example(ids=ids[s:last], hard_pos=list(range(first - 1 - s, last - 1 - s)))


def soft_example(drafter_tok, prompt: str, new_bytes: list[bytes], p_rows, in_inter, *,
                 temperature: float, label_top_k: int, match: str = "boundary",
                 context: int = 192, max_labels: Optional[int] = None) -> Optional[Example]:
    """Aligned positions of one sampled continuation with their soft labels, and (as for
    :func:`hard_example`) hard labels on the drafter tokens of the continuation.

    ``new_bytes``: the bytes of each generated target token; ``p_rows``: ``[n, V_target]`` the
    target's processed distribution at each of them; ``in_inter``: ``[V_target]`` bool, target ids
    some (proposable) drafter id maps to.
    """
    import torch

    n = _valid_utf8_prefix(new_bytes)
    if n == 0:
        return None
    cont = b"".join(new_bytes[:n]).decode("utf-8")
    enc = _encode(drafter_tok, prompt + cont)
    if enc is None or not prompt:
        return None  # the drafter cannot write this text exactly: no aligned positions
    ids, d_bytes, shift = enc
    start = shift + len(prompt.encode("utf-8"))
    pairs = shared_boundaries([start] + [len(b) for b in new_bytes[:n]], [len(b) for b in d_bytes])
    keep = []  # (target continuation index c, drafter index j of the next token)
    for i, j in pairs:
        c = i - 1
        if 0 <= c < n and j < len(ids):
            if match == "token" and d_bytes[j] != new_bytes[c]:
                continue
            keep.append((c, j))
    useful: list[tuple[int, int]] = []
    top_ids = top_p = torch.zeros((0, label_top_k))
    if keep:
        p = p_rows[torch.tensor([c for c, _ in keep])] * in_inter  # p on I, not renormalised
        top_p, top_ids = torch.topk(p, min(label_top_k, p.shape[-1]), dim=-1)
        mask = top_p.sum(-1) > 0  # positions where the target puts no mass on I teach nothing
        useful = [kj for kj, u in zip(keep, mask.tolist()) if u]
        top_p, top_ids = top_p[mask], top_ids[mask]
    first = _first_inside(d_bytes, start)
    last = len(ids) if max_labels is None else min(len(ids), first + max_labels) if first else 0
    hard = range(first, last) if first else range(0)
    if not useful and not hard:
        return None
    soft_js = [j for _, j in useful]
    s = max(0, min(soft_js[:1] + list(hard[:1])) - 1 - context)
    return Example(ids=ids[s:max(soft_js[-1:] + [j + 1 for j in hard[-1:]])],
                   temperature=temperature, hard_pos=[j - 1 - s for j in hard],
                   soft_pos=[j - 1 - s for j in soft_js],
                   soft_ids=top_ids.to(torch.int32), soft_p=top_p.float())


# --------------------------------------------------------------------------- training

def _collate(examples: list[Example], sampled_hard: bool = True):
    """Right-padded ids and mask, ``hard = (rows, cols, labels, temperature)`` (the hard labels of
    sampled text only with ``sampled_hard``) and
    ``soft = (rows, cols, temperature [m], target ids [m, K], p [m, K])`` (either may be
    ``None``)."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    hr, hc, hl, ht, sr, sc, st, sids, sps = [], [], [], [], [], [], [], [], []
    for r, e in enumerate(examples):
        ids[r, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[r, :len(e.ids)] = 1
        if e.temperature == 0 or sampled_hard:
            hr += [r] * len(e.hard_pos)
            hc += e.hard_pos
            hl += [e.ids[t + 1] for t in e.hard_pos]
            ht += [e.temperature] * len(e.hard_pos)
        if e.soft_pos:
            sr += [r] * len(e.soft_pos)
            sc += e.soft_pos
            st += [e.temperature] * len(e.soft_pos)
            sids.append(e.soft_ids.long())
            sps.append(e.soft_p)
    hard = (torch.tensor(hr), torch.tensor(hc), torch.tensor(hl), torch.tensor(ht)) if hr else None
    soft = (torch.tensor(sr), torch.tensor(sc), torch.tensor(st), torch.cat(sids), torch.cat(sps)) \
        if sr else None
    return ids, mask, hard, soft


class Trainer:
    """The drafter's training loop: hard cross-entropy and/or the soft intersection loss.

    ``id_map`` (drafter id -> target id or -1, :func:`build_id_map`) and ``target_size`` are needed
    only when some example has soft labels.  ``state`` (from :meth:`state_dict`) resumes a run.
    """

    def __init__(self, model, examples: list[Example], *, id_map=None, target_size: int = 0,
                 lr: float = 1e-3, batch: int = 8, seed: int = 0, loss: str = "kl",
                 ce_weight: float = 1.0, soft_weight: float = 1.0, sampled_ce_weight: float = 0.0,
                 head_ids: int = 0):
        import torch

        if loss not in ("kl", "tv"):
            raise ValueError(f"loss must be kl or tv, got {loss!r}")
        if not examples:
            raise ValueError("no training examples")
        self.model, self.examples = model, examples
        self.id_map, self.target_size = id_map, target_size
        self.lr, self.batch, self.seed, self.loss = lr, batch, seed, loss
        self.ce_weight, self.soft_weight, self.head_ids = ce_weight, soft_weight, head_ids
        self.sampled_ce_weight = sampled_ce_weight
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.step = self.epoch = self.cursor = 0
        self.elapsed_s = 0.0
        self.first_loss: Optional[float] = None
        self.losses: list[float] = []

    # ---- losses
    def _soft_terms(self, logits, soft):
        """Per-position ``(kl, tv, alpha)`` of the drafter (``logits``: ``[m, V_draft]`` at the
        soft positions) against the soft labels."""
        import torch

        from hsd_serve.core.vocab import project_to_target

        _, _, temps, sids, sps = soft
        # the drafter's proposal at temperature T, as TLI computes it (process_logits, no top-k/p)
        q = torch.softmax(logits.float() / temps.unsqueeze(-1), dim=-1)  # [m, V_draft]
        q_t, _ = project_to_target(q, self.id_map, self.target_size)  # [m, V_target] on I
        qk = q_t.gather(-1, sids)  # [m, K]
        pt = sps / sps.sum(-1, keepdim=True)  # p̃: p on I, renormalised over the kept ids
        kl = (pt * (torch.log(pt.clamp_min(1e-30)) - torch.log(qk.clamp_min(1e-12)))).sum(-1)
        tv = 0.5 * ((pt - qk).abs().sum(-1) + (1.0 - qk.sum(-1)).clamp_min(0.0))
        alpha = torch.minimum(sps, qk).sum(-1)  # Σ min(p, q') over the kept ids (a lower bound)
        return kl, tv, alpha

    def _hard_terms(self, logits, hard):
        """Per-position cross-entropy and greedy agreement (argmax over the served head)."""
        import torch

        labels = hard[2]
        ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        head = logits if not self.head_ids else logits[:, :self.head_ids]
        return ce, (head.argmax(-1) == labels).float()

    def _forward(self, chunk, sampled_hard: bool = True):
        """The drafter's logits at the hard and at the soft positions only (the output head over
        every position of every sequence would cost more than the rest of the model)."""
        ids, mask, hard, soft = _collate(chunk, sampled_hard)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        head = self.model.get_output_embeddings()
        h_logits = head(hidden[hard[0], hard[1]]) if hard is not None else None
        s_logits = head(hidden[soft[0], soft[1]]) if soft is not None else None
        return h_logits, hard, s_logits, soft

    def batch_loss(self, chunk):
        import torch

        h_logits, hard, s_logits, soft = self._forward(chunk, bool(self.sampled_ce_weight))
        total = 0.0
        if hard is not None:  # greedy text: ce_weight; sampled text: sampled_ce_weight
            w = torch.where(hard[3] == 0, self.ce_weight, self.sampled_ce_weight)
            if bool((w > 0).any()):
                total = total + (w * self._hard_terms(h_logits, hard)[0]).mean()
        if soft is not None and self.soft_weight:
            kl, tv, _ = self._soft_terms(s_logits, soft)
            total = total + self.soft_weight * (kl if self.loss == "kl" else tv).mean()
        return None if isinstance(total, float) else total  # None: nothing to learn here

    def evaluate(self, examples: list[Example]) -> dict:
        """Held-out metrics: soft KL/TV/α over aligned positions; agreement/CE over the hard
        positions of greedy text (``greedy_*``) and of sampled text (``sampled_*``).  Means over
        positions."""
        import torch

        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(name, values):
            sums[name] = sums.get(name, 0.0) + float(values.sum())
            counts[name] = counts.get(name, 0) + values.numel()

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(examples), self.batch):
                h_logits, hard, s_logits, soft = self._forward(examples[i:i + self.batch])
                if soft is not None:
                    for name, v in zip(("soft_kl", "soft_tv", "soft_alpha"),
                                       self._soft_terms(s_logits, soft)):
                        add(name, v)
                if hard is not None:
                    ce, agree = self._hard_terms(h_logits, hard)
                    for kind, sel in (("greedy", hard[3] == 0), ("sampled", hard[3] > 0)):
                        add(f"{kind}_ce", ce[sel])
                        add(f"{kind}_agreement", agree[sel])
        self.model.train(was_training)
        out = {"soft_positions": counts.get("soft_kl", 0),
               "greedy_positions": counts.get("greedy_ce", 0),
               "sampled_positions": counts.get("sampled_ce", 0)}
        for name in ("soft_kl", "soft_tv", "soft_alpha", "greedy_ce", "greedy_agreement",
                     "sampled_ce", "sampled_agreement"):
            n = counts.get(name, 0)
            out[name] = round(sums[name] / n, 5) if n else None
        return out

    # ---- state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "epoch": self.epoch, "cursor": self.cursor, "elapsed_s": self.elapsed_s,
                "first_loss": self.first_loss, "losses": self.losses[-200:]}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        for k in ("step", "epoch", "cursor", "elapsed_s", "first_loss", "losses"):
            setattr(self, k, state[k])

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def run(self, budget_s: float, max_steps: Optional[int] = None, checkpoint=None,
            ckpt_s: float = 120.0, progress: bool = True, desc: str = "align") -> dict:
        """Train until ``elapsed_s`` reaches ``budget_s`` (counted across resumes) or ``step``
        reaches ``max_steps``; ``checkpoint(self)`` every ``ckpt_s`` seconds and at the end.
        The learning rate decays linearly to 0.1x over the budget."""
        from tqdm import tqdm

        self.model.train()
        by_steps = max_steps is not None
        done_so_far = self.step if by_steps else min(round(self.elapsed_s), round(budget_s))
        bar = tqdm(total=max_steps if by_steps else round(budget_s), initial=done_so_far,
                   unit="step" if by_steps else "s", desc=desc, disable=not progress)

        def done() -> bool:
            return self.step >= max_steps if by_steps else self.elapsed_s >= budget_s

        try:
            self._loop(done, bar, by_steps, budget_s, max_steps, checkpoint, ckpt_s)
        except KeyboardInterrupt:
            if checkpoint is not None:
                checkpoint(self)  # --resume continues from here
            raise
        bar.close()
        self.model.eval()
        if checkpoint is not None:
            checkpoint(self)
        tail = self.losses[-20:]
        epochs = self.epoch + self.cursor / len(self.examples)
        return {"steps": self.step, "epochs": round(epochs, 2),
                "train_s": round(self.elapsed_s, 1), "first_loss": self.first_loss,
                "last_loss": sum(tail) / len(tail) if tail else None}

    def _loop(self, done, bar, by_steps, budget_s, max_steps, checkpoint, ckpt_s) -> None:
        order = self._order()
        t_last = t_ckpt = time.time()
        while not done():
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            chunk = [self.examples[i] for i in order[self.cursor:self.cursor + self.batch]]
            self.cursor += self.batch
            frac = self.step / max_steps if by_steps else self.elapsed_s / max(budget_s, 1e-9)
            for g in self.opt.param_groups:
                g["lr"] = self.lr * (1.0 - 0.9 * min(1.0, frac))
            loss = self.batch_loss(chunk)
            self.opt.zero_grad()
            if loss is not None:
                loss.backward()
                self.opt.step()
            self.step += 1
            value = float(loss.detach()) if loss is not None else 0.0
            self.first_loss = value if self.first_loss is None else self.first_loss
            self.losses = (self.losses + [value])[-200:]
            now = time.time()
            self.elapsed_s += now - t_last
            t_last = now
            bar.n = self.step if by_steps else min(round(self.elapsed_s), round(budget_s))
            bar.set_postfix(loss=f"{value:.3f}", epoch=self.epoch)
            if checkpoint is not None and now - t_ckpt >= ckpt_s:
                checkpoint(self)
                t_ckpt = time.time()
                t_last = t_ckpt  # checkpoint writes do not count as training time


# --------------------------------------------------------------------------- data

@dataclass
class AlignSettings:
    target: str = BUNDLED_PREFIX + "target"
    drafter: str = BUNDLED_PREFIX + "drafter"
    out: str = ""
    minutes: float = 10.0
    max_steps: Optional[int] = None
    temperatures: list[float] = field(default_factory=lambda: [0.6, 1.0])
    greedy: bool = True
    prompts: int = 600
    max_new_tokens: int = 64
    gen_batch: int = 32
    loss: str = "kl"
    match: str = "boundary"
    label_top_k: int = 128
    ce_weight: float = 1.0
    soft_weight: float = 1.0
    sampled_ce_weight: float = 0.0
    lr: float = 5e-4
    batch: int = 8
    context: int = 192
    heldout: float = 0.1
    drafter_head_ids: int = 0
    seed: int = 0
    threads: Optional[int] = None
    device: str = "cpu"
    corpus_root: Optional[str] = None

    #: what the generated data depends on: a resumed run must agree on these
    DATA_KEYS = ("target", "drafter", "temperatures", "greedy", "prompts", "max_new_tokens",
                 "match", "label_top_k", "context", "heldout", "drafter_head_ids", "seed",
                 "corpus_root")

    def data_key(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in self.DATA_KEYS}


def resolve_model(path: str, role: str) -> str:
    """``bundled:<name>``, a local folder, or a hub id; a missing local folder is an error."""
    if path.startswith(BUNDLED_PREFIX):
        return resolve_model_path(path)
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"--{role}: model directory not found: {path}")
        return str(local)
    return path


def build_data(s: AlignSettings, target, drafter, id_map) -> tuple[list, list, dict]:
    """Generate the target's continuations and turn them into (train, heldout, stats)."""
    import torch

    from hsd_serve.core.sampling import SamplingParams, process_logits
    from hsd_serve.zoo.distill import corpus_prompts, generate_batches

    prompts = corpus_prompts(s.prompts, seed=s.seed,
                             root=Path(s.corpus_root) if s.corpus_root else None)
    if not prompts:
        raise ValueError("the corpus gave no prompts")
    v_t = target.logit_size
    in_inter = torch.zeros(v_t, dtype=torch.bool)
    in_inter[id_map[id_map >= 0]] = True
    t_bytes = target.vocab.token_bytes
    examples: list[tuple[int, Example]] = []  # (prompt index, example)
    stats = {"prompts": len(prompts), "intersection_target_ids": int(in_inter.sum()),
             "intersection_drafter_ids": int((id_map >= 0).sum())}
    modes = ([0.0] if s.greedy else []) + [float(t) for t in s.temperatures]
    for n_mode, temp in enumerate(modes):
        made = tokens = aligned = 0
        tag = "greedy" if temp == 0 else f"T={temp:g}"
        for n_prompt, (prompt, (_, new, logits)) in enumerate(zip(prompts, generate_batches(
                target.model, target.tokenizer.hf, prompts, s.max_new_tokens, s.gen_batch,
                temperature=temp, seed=s.seed + n_mode, logits=temp > 0,
                desc=f"target continuations {tag}"))):
            nb = [t_bytes[t] if t < len(t_bytes) else b"" for t in new]
            if b"" in nb:  # a special token mid-text: keep the text before it
                nb = nb[:nb.index(b"")]
            tokens += len(nb)
            if temp == 0:
                n_ok = _valid_utf8_prefix(nb)
                ex = hard_example(drafter.tokenizer, prompt, b"".join(nb[:n_ok]).decode("utf-8"),
                                  context=s.context, max_labels=None) if n_ok else None
            else:
                p = process_logits(logits[:len(nb)], SamplingParams(temperature=temp))
                ex = soft_example(drafter.tokenizer, prompt, nb, p, in_inter, temperature=temp,
                                  label_top_k=s.label_top_k, match=s.match, context=s.context)
                aligned += len(ex.soft_pos) if ex else 0
            if ex is not None:
                examples.append((n_prompt, ex))
                made += 1
        stats[tag] = {"examples": made, "target_tokens": tokens}
        if temp > 0:
            stats[tag]["aligned_positions"] = aligned
            stats[tag]["aligned_fraction"] = round(aligned / max(tokens, 1), 4)
    # held out by prompt: no held-out prompt window is trained on in any of its continuations
    order = list(range(len(prompts)))
    random.Random(s.seed).shuffle(order)
    n_held = int(round(len(prompts) * s.heldout))
    n_held = max(1, n_held) if s.heldout > 0 and len(prompts) > 1 else n_held
    held_prompts = set(order[:n_held])
    held = [ex for n, ex in examples if n in held_prompts]
    train = [ex for n, ex in examples if n not in held_prompts]
    if not train:
        raise ValueError("no training examples: more --prompts (or a smaller --heldout) needed")
    stats.update(train_examples=len(train), heldout_examples=len(held))
    return train, held, stats


# --------------------------------------------------------------------------- the command

def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def align(s: AlignSettings, resume: bool = False, progress: bool = True) -> dict:
    """Run the whole alignment (see the module docstring); returns the record written to
    ``<out>/align.json``."""
    import torch

    from hsd_serve.core.vocab import build_id_map
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    if not s.out:
        raise ValueError("--out is required")
    if not s.greedy and not s.temperatures:
        raise ValueError("nothing to train on: give --temperatures or keep the greedy data")
    if any(t <= 0 for t in s.temperatures):
        raise ValueError(f"--temperatures must be > 0 (greedy data is added by default), "
                         f"got {s.temperatures}")
    if s.minutes <= 0 and s.max_steps is None:
        raise ValueError("--minutes must be > 0")
    out = Path(s.out)
    ckpt = out / CKPT_DIR
    if resume and not (ckpt / "data.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}")
    if not resume and (ckpt / "data.pt").is_file():
        raise ValueError(f"{out} already holds an alignment checkpoint: pass --resume to "
                         "continue it, or choose another --out")
    target_dir = resolve_model(s.target, "target")
    drafter_dir = resolve_model(s.drafter, "drafter")
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.time()
    target = LoadedModel(ModelSpec(target_dir, dtype="float32", device=s.device))
    drafter = LoadedModel(ModelSpec(drafter_dir, dtype="float32", device=s.device))
    id_map = build_id_map(drafter.vocab, target.vocab)
    if s.drafter_head_ids:  # ids the pruned head cannot propose are outside the intersection
        id_map[s.drafter_head_ids:] = -1
    if s.temperatures and not bool((id_map >= 0).any()):
        raise ValueError("the drafter and target vocabularies share no token: the soft loss has "
                         "nothing to match (greedy-only: --temperatures '')")

    if resume:
        data = torch.load(ckpt / "data.pt", weights_only=False)
        if data["settings"] != s.data_key():
            diff = {k: (data["settings"].get(k), v) for k, v in s.data_key().items()
                    if data["settings"].get(k) != v}
            raise ValueError(f"--resume: settings differ from the checkpoint's (was, now): {diff}")
        train, held, stats = data["train"], data["heldout"], data["stats"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.mkdir(exist_ok=True)
        target.model.eval()
        train, held, stats = build_data(s, target, drafter, id_map)
        stats["generate_s"] = round(time.time() - t0, 1)
        _atomic_save({"settings": s.data_key(), "train": train, "heldout": held, "stats": stats},
                     ckpt / "data.pt")
    del target.model  # the target is not needed for training

    torch.manual_seed(s.seed)
    trainer = Trainer(drafter.model, train, id_map=id_map, target_size=target.logit_size,
                      lr=s.lr, batch=s.batch, seed=s.seed, loss=s.loss, ce_weight=s.ce_weight,
                      soft_weight=s.soft_weight, sampled_ce_weight=s.sampled_ce_weight,
                      head_ids=s.drafter_head_ids)
    state_path = ckpt / "state.pt"
    before = None
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        trainer.load_state_dict(state)
        before = state.get("heldout_before")
    if before is None:
        before = trainer.evaluate(held) if held else {}

    def checkpoint(tr: Trainer) -> None:
        _atomic_save({**tr.state_dict(), "heldout_before": before}, state_path)

    info = trainer.run(s.minutes * 60, max_steps=s.max_steps, checkpoint=checkpoint,
                       progress=progress)
    after = trainer.evaluate(held) if held else {}
    drafter.model.save_pretrained(str(out))
    drafter.tokenizer.hf.save_pretrained(str(out))
    record = {"settings": {k: v for k, v in asdict(s).items()},
              "target_path": target_dir, "drafter_path": drafter_dir,
              "data": stats, "training": info,
              "heldout_before": before, "heldout_after": after,
              "resumed": resume, "total_s": round(time.time() - t0, 1)}
    (out / RECORD).write_text(json.dumps(record, indent=1))
    return record


HELP = "fine-tune a drafter toward a target (sampling and greedy)"
DESCRIPTION = ("Fine-tune any drafter toward any target on text the target generates: a soft-label "
               "loss on the shared vocabulary at the given temperatures plus cross-entropy on "
               "greedy text. See docs/align.md.")


def _temps(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--temperatures: {exc}") from exc


def configure_parser(a: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = AlignSettings()
    a.add_argument("--target", default=d.target, help="target: folder, hub id or bundled:NAME")
    a.add_argument("--drafter", default=d.drafter, help="drafter: folder, hub id or bundled:NAME")
    a.add_argument("--out", required=True, help="output folder (weights, tokenizer, align.json, "
                                                "checkpoint/)")
    a.add_argument("--minutes", type=float, default=d.minutes,
                   help=f"training time budget, counted across --resume (default {d.minutes:g})")
    a.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps instead (smoke tests)")
    a.add_argument("--temperatures", type=_temps, default=d.temperatures,
                   help="comma list of sampling temperatures for the soft loss (default 0.6,1.0); "
                        "'' for greedy data only")
    a.add_argument("--no-greedy", action="store_true",
                   help="no greedy continuations (no hard loss; SLEM may get worse)")
    a.add_argument("--prompts", type=int, default=d.prompts,
                   help=f"corpus prompts; each is continued greedily and once per temperature "
                        f"(default {d.prompts})")
    a.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    a.add_argument("--gen-batch", type=int, default=d.gen_batch,
                   help="prompts per batched target generate()")
    a.add_argument("--loss", choices=("kl", "tv"), default=d.loss,
                   help="soft loss on the intersection: KL(p̃ || q') or total variation")
    a.add_argument("--match", choices=("boundary", "token"), default=d.match,
                   help="aligned positions: every shared token boundary, or only those where the "
                        "next target token is exactly one drafter token")
    a.add_argument("--label-top-k", type=int, default=d.label_top_k,
                   help="target ids kept per soft label (top of p on the intersection)")
    a.add_argument("--ce-weight", type=float, default=d.ce_weight, help="weight of the greedy loss")
    a.add_argument("--soft-weight", type=float, default=d.soft_weight,
                   help="weight of the soft loss")
    a.add_argument("--sampled-ce-weight", type=float, default=d.sampled_ce_weight,
                   help="weight of cross-entropy on the drafter's tokens of the *sampled* text "
                        "(sequence-level distillation: what byte drafters for SLRS need; "
                        "default 0)")
    a.add_argument("--lr", type=float, default=d.lr)
    a.add_argument("--batch", type=int, default=d.batch, help="sequences per optimizer step")
    a.add_argument("--context", type=int, default=d.context, help="drafter tokens of prompt kept")
    a.add_argument("--heldout", type=float, default=d.heldout,
                   help="fraction of examples held out for the before/after metrics")
    a.add_argument("--drafter-head-ids", type=int, default=0, metavar="N",
                   help="the drafter will be served with its head pruned to its first N ids: "
                        "train its intersection on those ids only (0: full head)")
    a.add_argument("--seed", type=int, default=d.seed)
    a.add_argument("--threads", type=int, default=None, help="torch threads")
    a.add_argument("--device", default=d.device)
    a.add_argument("--corpus-root", default=None,
                   help="folder of .py files for the prompts (default: this Python's stdlib)")
    a.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_align)
    return a


def add_align_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``hsd-serve align``."""
    return configure_parser(sub.add_parser("align", help=HELP, description=DESCRIPTION))


def settings_from_args(args: argparse.Namespace) -> AlignSettings:
    for name in ("prompts", "max_new_tokens", "gen_batch", "label_top_k", "batch", "context"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.heldout < 1:
        raise ValueError(f"--heldout must be in [0, 1), got {args.heldout}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps must be > 0, got {args.max_steps}")
    return AlignSettings(
        target=args.target, drafter=args.drafter, out=args.out, minutes=args.minutes,
        max_steps=args.max_steps, temperatures=args.temperatures, greedy=not args.no_greedy,
        prompts=args.prompts, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
        loss=args.loss, match=args.match, label_top_k=args.label_top_k, ce_weight=args.ce_weight,
        soft_weight=args.soft_weight, sampled_ce_weight=args.sampled_ce_weight, lr=args.lr,
        batch=args.batch, context=args.context,
        heldout=args.heldout, drafter_head_ids=args.drafter_head_ids, seed=args.seed,
        threads=args.threads, device=args.device, corpus_root=args.corpus_root)


def cmd_align(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    record = align(settings_from_args(args), resume=args.resume, progress=not args.no_progress)
    b, a = record["heldout_before"], record["heldout_after"]
    for key in ("soft_alpha", "soft_kl", "greedy_agreement", "sampled_ce"):
        if b.get(key) is not None:
            print(f"held-out {key}: {b[key]:.4f} -> {a[key]:.4f}", file=sys.stderr)
    print(f"wrote {Path(args.out) / RECORD} and the drafter in {args.out}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = configure_parser(argparse.ArgumentParser(
        prog="python -m hsd_serve.zoo align", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"align: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
