"""The incumbent: Hugging Face transformers' own heterogeneous assisted generation.

``target.generate(assistant_model=drafter, tokenizer=…, assistant_tokenizer=…)``, batch 1, on the
same pair and prompt ids as our engine.  Greedy routes to transformers'
``AssistedCandidateGeneratorDifferentTokenizers``; sampling to ``UniversalSpeculativeDecodingGenerator``
(which rewrites the drafter's LM head in place and, in transformers 5.x, maps it back to target ids
in the wrong order — see ``shared/FACTS.md``).  So the baseline drives its *own copies* of the
drafter (one for greedy, one for sampling: the pruned head and transformers' translator cache must
stay consistent), never the one our engine uses, and the benchmark checks its outputs.

Its lookahead is the drafter's ``generation_config.num_assistant_tokens`` (transformers reads it
from the assistant, not from ``generate`` arguments): ``None`` keeps its defaults (20 tokens,
constant schedule, a confidence threshold that stops drafting early), an integer sets it with a
constant schedule.  Rounds are counted with a forward hook on the target (one target forward per
round; the prompt is processed in the first one).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

ASSISTANT_KEYS = ("num_assistant_tokens", "num_assistant_tokens_schedule",
                  "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind")


@dataclass
class HFResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    wall_s: float
    ttft_s: float
    target_forwards: int
    drafter_forwards: int
    settings: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        """Target forwards (transformers folds the prefill into its first verification)."""
        return max(1, self.target_forwards)


class _FirstTokenClock:
    """A ``generate`` streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.calls = 0
        self.first: Optional[float] = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, *_args) -> None:
        self.n += 1


class HFAssisted:
    """Runs transformers' heterogeneous assisted generation for one target/drafter pair."""

    def __init__(self, target, drafter):
        self.target = target  # hsd_serve LoadedModel
        self.drafter = drafter
        self._copies: dict[str, torch.nn.Module] = {}
        self._original: dict[str, dict] = {}

    def _assistant(self, sampling: bool) -> torch.nn.Module:
        key = "sample" if sampling else "greedy"
        if key not in self._copies:
            if getattr(self.drafter, "head_ids", 0):  # ours has a pruned head: give it the original
                from transformers import AutoModelForCausalLM

                m = AutoModelForCausalLM.from_pretrained(self.drafter.spec.path,
                                                         dtype=self.drafter.model.dtype)
            else:
                m = copy.deepcopy(self.drafter.model)
            m.eval()
            self._copies[key] = m
            self._original[key] = {k: getattr(m.generation_config, k, None) for k in ASSISTANT_KEYS}
        return self._copies[key]

    def effective_settings(self, num_assistant_tokens: Optional[int], sampling: bool) -> dict:
        """The assistant settings transformers will use (its defaults filled in)."""
        from transformers import GenerationConfig

        m = self._assistant(sampling)
        gc = copy.deepcopy(m.generation_config)
        if num_assistant_tokens is not None:
            gc.num_assistant_tokens = num_assistant_tokens
            gc.num_assistant_tokens_schedule = "constant"
        defaults = getattr(GenerationConfig(), "_get_default_generation_params", lambda: {})()
        out = {}
        for k in ASSISTANT_KEYS:
            v = getattr(gc, k, None)
            out[k] = defaults.get(k) if v is None else v
        out["generator"] = ("UniversalSpeculativeDecodingGenerator" if sampling
                            else "AssistedCandidateGeneratorDifferentTokenizers")
        return out

    def _configure(self, m: torch.nn.Module, key: str, num_assistant_tokens: Optional[int]) -> None:
        for k, v in self._original[key].items():  # back to the model's own settings
            setattr(m.generation_config, k, v)
        if num_assistant_tokens is not None:
            m.generation_config.num_assistant_tokens = int(num_assistant_tokens)
            m.generation_config.num_assistant_tokens_schedule = "constant"

    @torch.inference_mode()
    def generate_plain(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
                       temperature: float = 0.0, seed: int = 0) -> HFResult:
        """transformers' own plain decoding (``generate`` without an assistant): the reference
        for its assisted path's overhead, and for our AR's."""
        return self.generate(prompt_ids, max_new_tokens, temperature=temperature, seed=seed,
                             plain=True)

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int = 0, num_assistant_tokens: Optional[int] = None,
                 plain: bool = False) -> HFResult:
        sampling = temperature > 0
        eos = sorted(self.target.eos_ids)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.target.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      max_new_tokens=max_new_tokens, min_new_tokens=0,
                      eos_token_id=eos, pad_token_id=eos[0] if eos else None)
        m = None
        if not plain:
            m = self._assistant(sampling)
            self._configure(m, "sample" if sampling else "greedy", num_assistant_tokens)
            kwargs.update(assistant_model=m, tokenizer=self.target.tokenizer.hf,
                          assistant_tokenizer=self.drafter.tokenizer.hf)
        if sampling:
            kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            torch.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        clock = _FirstTokenClock()
        t_count, d_count = _Counter(), _Counter()
        hooks = [self.target.model.register_forward_hook(lambda *a: t_count())]
        if m is not None:
            hooks.append(m.register_forward_hook(lambda *a: d_count()))
        try:
            t0 = time.perf_counter()
            out = self.target.model.generate(streamer=clock, **kwargs)
            wall = time.perf_counter() - t0
        finally:
            for h in hooks:
                h.remove()
        new = out[0, len(prompt_ids):].tolist()
        finish = "length"
        for i, t in enumerate(new):
            if t in self.target.eos_ids:
                new, finish = new[:i], "stop"
                break
        new = new[:max_new_tokens]
        text = self.target.tokenizer.decode_text(new)
        ttft = (clock.first - t0) if clock.first is not None else wall
        return HFResult(token_ids=new, text=text, finish_reason=finish, wall_s=wall, ttft_s=ttft,
                        target_forwards=t_count.n, drafter_forwards=d_count.n,
                        settings=({"generator": "plain generate()"} if plain
                                  else self.effective_settings(num_assistant_tokens, sampling)))
