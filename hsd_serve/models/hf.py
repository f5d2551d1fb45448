"""Hugging Face adapters: load any causal LM + tokenizer, and per-request KV-cache sessions.

Hugging Face types stop here: the engine sees ``LoadedModel`` (logit size, context length, a
``TokenizerAdapter``) and ``Session`` (token ids in, float logits out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from hsd_serve.core.prefix import common_prefix_len
from hsd_serve.models.kv import append_rows, batch_cache, copy_cache, new_cache
from hsd_serve.models.tokenizer import TokenizerAdapter, load_tokenizer

_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(spec: "ModelSpec"):
    """The compute dtype: as asked, or for ``auto`` float32 on CPU and the checkpoint's own dtype
    elsewhere.

    Why float32 on CPU: in bfloat16 a position's logits change by up to ~3e-2 depending on how
    the tokens were split into forward passes (one at a time in AR, k+1 at once when verifying,
    padded in a batch), enough to flip a greedy near-tie, so "identical to AR" would hold only up
    to rounding.  In float32 the difference is ~2e-6.  Ask for bfloat16 explicitly to trade that
    for speed (the usual GPU trade-off, as in every serving engine).
    """
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    return torch.float32 if str(spec.device).startswith("cpu") else "auto"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded (message names the path and the reason)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to run it."""

    path: str  # local directory or hub id
    dtype: str = "auto"  # auto (float32 on CPU, checkpoint dtype elsewhere) | float32 | bfloat16 | float16
    device: str = "cpu"
    trust_remote_code: bool = False
    # drafters only: compute the output head for the first ``head_ids`` token ids (plus special
    # and end-of-sequence tokens) and give every other id logit -inf; 0 = the whole vocabulary
    head_ids: int = 0
    # run Llama-family forwards in plain torch (``models.plain``; same weights, same cache) instead
    # of through transformers' modules — for drafters, where it is several times faster on CPU;
    # architectures it does not cover keep transformers' forward
    plain_forward: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.head_ids, int) or self.head_ids < 0:
            raise ValueError(f"head_ids must be an integer >= 0, got {self.head_ids!r}")


class LoadedModel:
    """A causal LM with its tokenizer, ready to open sessions."""

    def __init__(self, spec: ModelSpec):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.spec = spec
        path = spec.path
        local = Path(path).expanduser()
        if (path.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
        try:
            hf_tok = load_tokenizer(str(local) if local.is_dir() else path,
                                    trust_remote_code=spec.trust_remote_code)
            kwargs = {"trust_remote_code": spec.trust_remote_code}
            kwargs["dtype"] = resolve_dtype(spec)
            model = AutoModelForCausalLM.from_pretrained(str(local) if local.is_dir() else path,
                                                         **kwargs)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the path named
            raise ModelLoadError(f"cannot load model {path!r}: {exc}") from exc
        model.to(spec.device)
        model.eval()
        self.model = model
        self.device = torch.device(spec.device)
        self.logit_size = int(model.get_output_embeddings().weight.shape[0])
        self.tokenizer = TokenizerAdapter(hf_tok, model_vocab_size=self.logit_size)
        cfg = model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 2**31 - 1)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = set(self.tokenizer.eos_ids)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(int(e) for e in gen_eos)
        self.eos_ids = frozenset(eos)
        self.name = path
        self.head_ids = 0  # 0: the full output head
        if spec.head_ids and spec.head_ids < self.logit_size:
            keep = set(range(spec.head_ids)) | set(self.eos_ids) | set(self.vocab.special_ids)
            prune_output_head(model, sorted(i for i in keep if i < self.logit_size))
            self.head_ids = spec.head_ids
        elif type(model.get_output_embeddings()) is torch.nn.Linear:
            head = model.get_output_embeddings()
            model.set_output_embeddings(OutputHead(head.weight, head.bias))
        self.plain = None  # models.plain.PlainDecoder when the spec asks and the model allows
        if spec.plain_forward:
            from hsd_serve.models.plain import plain_decoder

            self.plain = plain_decoder(model)

    def run(self, input_ids: torch.Tensor, cache, *, logits_to_keep: int = 0,
            attention_mask: Optional[torch.Tensor] = None,
            position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's logits for ``input_ids`` after ``cache`` (which gets their keys/values):
        through the plain decoder where there is one, else transformers' forward."""
        if self.plain is not None:
            return self.plain.forward(input_ids, cache, position_ids=position_ids,
                                      attention_mask=attention_mask,
                                      logits_to_keep=logits_to_keep)
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                          logits_to_keep=logits_to_keep, **kwargs).logits

    @property
    def vocab(self):
        return self.tokenizer.vocab

    def new_session(self) -> "Session":
        return Session(self)


class OutputHead(torch.nn.Module):
    """A model's linear output head, ``hidden @ weightᵀ (+ bias)``, computed fast on CPU.

    On CPU in float32, ``linear`` over the ``[V, H]`` head weight with a few rows of input (a
    decode step, a verification of 1–3 candidates) is 3–4× slower than the same product with
    the weight stored transposed, ``[H, V]`` contiguous, and 2 or 3 rows cost 2× or 3× one row
    (measured on the bundled target's 32000 × 192 head: 3.1 ms against 0.7 ms for one row, 9.7
    against 2.2 ms for three, 24.0 against 22.3 ms for a 150-token prefill).  So inference
    without gradients uses a transposed copy (one more copy of the head in memory), rebuilt
    whenever the weight changes (its version counter: an optimizer step; inference tensors have
    none and are not trained); with gradients, on other devices and in other dtypes it is the
    plain ``linear``.  The parameters are the original head's (tied weights stay tied, state
    dicts keep their keys).  Results equal ``linear``'s up to float rounding (another kernel).
    """

    def __init__(self, weight: torch.nn.Parameter, bias: Optional[torch.nn.Parameter] = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self._t: Optional[torch.Tensor] = None
        self._t_key: tuple = ()

    def _transposed(self) -> Optional[torch.Tensor]:
        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or \
                (torch.is_grad_enabled() and w.requires_grad):
            return None
        key = (id(w), w.data_ptr(), -1 if w.is_inference() else w._version)
        if self._t is None or self._t_key != key:
            with torch.no_grad():
                self._t = w.detach().t().contiguous()
            self._t_key = key
        return self._t

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self._transposed()
        if t is None or hidden.dtype != t.dtype:
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        out = hidden @ t
        return out + self.bias if self.bias is not None else out


class PrunedHead(torch.nn.Module):
    """An output head computed for ``keep`` ids only; every other logit is -inf.

    For drafters (the FR-Spec observation: a drafter's head over a large vocabulary dominates its
    step, and the rarest ids are seldom its best guess).  Still lossless: the drafter's
    distribution simply has zeros there, and every method verifies against the distribution the
    drafter actually proposed from (TLI/SD proposal rows, SLRS ψ) or only against the target
    (SLEM).  Never used for a target.  The kept rows are an :class:`OutputHead`.
    """

    def __init__(self, head: torch.nn.Module, keep: list[int]):
        super().__init__()
        idx = torch.tensor(keep, dtype=torch.long, device=head.weight.device)
        self.register_buffer("keep", idx, persistent=False)
        bias = getattr(head, "bias", None)
        self.part = OutputHead(
            torch.nn.Parameter(head.weight.detach().index_select(0, idx).clone(),
                               requires_grad=False),
            torch.nn.Parameter(bias.detach().index_select(0, idx).clone(), requires_grad=False)
            if bias is not None else None)
        self.full_size = int(head.weight.shape[0])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        part = self.part(hidden)
        out = part.new_full(part.shape[:-1] + (self.full_size,), float("-inf"))
        out.index_copy_(out.dim() - 1, self.keep, part)
        return out


def prune_output_head(model, keep: list[int]) -> None:
    """Replace ``model``'s output head by a :class:`PrunedHead` over ``keep``."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelLoadError("this model has no output head that can be pruned (head_ids)")
    model.set_output_embeddings(PrunedHead(head, keep))


class Session:
    """One request's KV cache on one model.

    ``ids`` are the tokens whose keys/values are in the cache.  ``forward_from(context, extra)``
    makes the cache hold ``context + extra`` (cropping to the longest common prefix first, so
    only new tokens are computed) and returns the logits after ``context`` and after each extra
    token: ``[len(extra) + 1, V]`` float32 on the CPU, whatever device ran the model (the rules,
    the keyed randomness and the wire work on CPU rows).
    """

    def __init__(self, owner: LoadedModel):
        self.owner = owner
        self._cache = new_cache(owner.model.config)
        self.ids: list[int] = []
        self.forwards = 0  # model calls made by this session
        self.tokens_computed = 0  # tokens pushed through the model by this session

    def __len__(self) -> int:
        return len(self.ids)

    def crop(self, n: int) -> None:
        """Keep only the first ``n`` cached tokens."""
        drop = len(self.ids) - n
        if drop > 0:
            self._cache.crop(-drop)
            del self.ids[n:]

    def fork(self, n: int) -> "Session":
        """A new session holding a copy of this one's first ``n`` cached tokens."""
        n = min(n, len(self.ids))
        out = Session(self.owner)
        out._cache = copy_cache(self._cache, n) if n else out._cache
        out.ids = self.ids[:n]
        return out

    def common_prefix(self, context: list[int]) -> int:
        return common_prefix_len(self.ids, context)

    def _prepare(self, context: list[int], extra: list[int]) -> list[int]:
        """Crop the cache to what ``context + extra`` can reuse; return the tokens to compute."""
        if not context:
            raise ValueError("forward_from needs a non-empty context")
        keep = self.common_prefix(context)
        if keep == len(context):
            keep -= 1  # the logits after the last context token are not stored: recompute it
        self.crop(keep)
        new = context[keep:] + extra
        total = keep + len(new)
        if total > self.owner.max_context:
            raise ValueError(f"sequence of {total} tokens exceeds the model context of "
                             f"{self.owner.max_context}")
        return new

    @torch.inference_mode()
    def forward_from(self, context: list[int], extra: list[int] = ()) -> torch.Tensor:
        extra = list(extra)
        new = self._prepare(context, extra)
        input_ids = torch.tensor([new], dtype=torch.long, device=self.owner.device)
        logits = self.owner.run(input_ids, self._cache, logits_to_keep=len(extra) + 1)
        self.ids.extend(new)
        self.forwards += 1
        self.tokens_computed += len(new)
        return logits[0, -(len(extra) + 1):].float().cpu()

    def free(self) -> None:
        self._cache = new_cache(self.owner.model.config)
        self.ids = []


@torch.inference_mode()
def forward_batch(sessions: list[Session], contexts: list[list[int]],
                  extras: list[list[int]]) -> list[torch.Tensor]:
    """``Session.forward_from`` for several sessions of one model in a single forward pass.

    Row ``i`` is laid out as ``[cache padding | cached tokens of i | new tokens of i | input
    padding]``: cached keys are left-padded to the longest cache and masked out; new tokens are
    right-padded, and the padding tokens are real (unmasked) inputs that come *after* every valid
    token, so causal attention never lets a valid token see them and no query row is fully masked.
    Each new token gets its own absolute position; padding slots repeat the position of the row's
    last new token, so no position id exceeds what the row itself uses (a row near the context
    limit next to a row with more new tokens must not index learned position embeddings, GPT-2's
    ``wpe``, past ``max_position_embeddings``; what pads compute is discarded).  Afterwards each
    session's cache gets exactly its own new keys/values appended, so a session's state is as if
    it had run alone.  Returns, per session, the logits after its context and after each extra
    token (``[len(extra)+1, V]``, float32 on the CPU, as ``Session.forward_from``).
    """
    if len(sessions) == 1:
        return [sessions[0].forward_from(contexts[0], extras[0])]
    owner = sessions[0].owner
    if any(s.owner is not owner for s in sessions) or len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("forward_batch needs distinct sessions of one model")
    news = [s._prepare(list(c), list(e)) for s, c, e in zip(sessions, contexts, extras)]
    keeps = [len(s.ids) for s in sessions]
    b, lc, n = len(sessions), max(keeps), max(len(x) for x in news)
    dev = owner.device
    pad_id = news[0][0]
    input_ids = torch.full((b, n), pad_id, dtype=torch.long, device=dev)
    position_ids = torch.zeros((b, n), dtype=torch.long, device=dev)
    mask = torch.zeros((b, lc + n), dtype=torch.long, device=dev)
    for i, (new, keep) in enumerate(zip(news, keeps)):
        input_ids[i, :len(new)] = torch.tensor(new, dtype=torch.long)
        position_ids[i, :len(new)] = torch.arange(keep, keep + len(new))
        position_ids[i, len(new):] = keep + len(new) - 1  # pads: never past the row's own end
        mask[i, lc - keep:] = 1
    cache = batch_cache([s._cache for s in sessions], lc, n)
    logits = owner.run(input_ids, cache, attention_mask=mask, position_ids=position_ids)
    results = []
    for i, (s, new, extra) in enumerate(zip(sessions, news, extras)):
        append_rows(s._cache, cache, i, lc, len(new))
        s.ids.extend(new)
        s.forwards += 1
        s.tokens_computed += len(new)
        results.append(logits[i, len(new) - len(extra) - 1:len(new)].float().cpu())
    return results


@dataclass(frozen=True)
class ModelDescription:
    """What other processes need to know about a model without loading its weights."""

    tokenizer: TokenizerAdapter
    eos_ids: frozenset[int]
    max_context: int
    logit_size: int


def describe_model(spec: ModelSpec) -> ModelDescription:
    """Tokenizer, EOS ids, context length and logit size from the config files only."""
    from transformers import AutoConfig, GenerationConfig

    try:
        cfg = AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
        hf_tok = load_tokenizer(spec.path, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot read model {spec.path!r}: {exc}") from exc
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    logit_size = int(text_cfg.vocab_size)
    tok = TokenizerAdapter(hf_tok, model_vocab_size=max(logit_size, len(hf_tok)))
    eos = set(tok.eos_ids)
    try:
        gen_eos = GenerationConfig.from_pretrained(spec.path).eos_token_id
    except Exception:  # noqa: BLE001 - no generation_config.json
        gen_eos = getattr(text_cfg, "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        eos.update(int(e) for e in gen_eos)
    max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 2**31 - 1)
    return ModelDescription(tok, frozenset(eos), max_context, logit_size)
