"""A plain-torch forward for Llama-family decoders (drafters): the same weights, fewer layers.

transformers' modules cost far more than their arithmetic for a small drafter on CPU: the bundled
2-layer drafter spends ~3 ms per forward of which ~0.5 ms is tensor work (output capturing,
config lookups, mask builders and kwargs plumbing per module call).  ``PlainDecoder`` runs the
same computation — embedding, per layer RMSNorm → attention with RoPE → RMSNorm → gated MLP, final
norm, output head — as a dozen torch calls per layer on the model's own parameters and its own
rotary-embedding module, writing keys/values into the session's cache exactly where transformers
would (``cache.update``), so sessions, ``forward_batch``'s batch caches and cropping are shared
with the transformers path.

Only architectures whose math is exactly that are taken (``PlainDecoder.supports``): Llama,
Mistral and Qwen2 (biases come with the projection modules) with SiLU, full attention, one
pretraining tensor-parallel slice and no per-head norms; anything else keeps transformers' forward.
Drafters only by default (``ModelSpec.plain_forward``): a draft changes speed, never the output,
and the targets of the HF executor stay on transformers' own forward, the reference.
``tests/unit/test_plain_forward.py`` checks the logits against transformers' forward (prefill,
decode, crop, padded batches, grouped-query attention, biases).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _rms_norm(h: torch.Tensor, norm) -> torch.Tensor:
    """transformers' Llama RMSNorm: in float32, scaled by the weight in the input dtype."""
    dtype = h.dtype
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Fused:
    """Several linear layers over the same input as one matmul: their weights (and biases)
    concatenated, rebuilt whenever one of them changes (version counters, as ``OutputHead``)."""

    def __init__(self, *linears):
        self.linears = linears
        self.sizes = [int(m.weight.shape[0]) for m in linears]
        self._key: tuple = ()
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for m in self.linears for p in (m.weight, m.bias) if p is not None]
        key = tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in params)
        if key != self._key:
            with torch.no_grad():
                self.weight = torch.cat([m.weight.detach() for m in self.linears])
                biases = [m.bias for m in self.linears]
                self.bias = (None if all(b is None for b in biases) else torch.cat(
                    [b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0])
                     for m, b in zip(self.linears, biases)]))
            self._key = key
        return F.linear(x, self.weight, self.bias)


class PlainDecoder:
    """``model``'s forward in plain torch (``supports(model)`` must hold)."""

    def __init__(self, model):
        self.model = model
        self.core = model.model
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        # per layer: (input norm, fused q|k|v, o_proj, post-attention norm, fused gate|up,
        # down_proj, attention scale)
        self.layers = [(layer.input_layernorm,
                        _Fused(layer.self_attn.q_proj, layer.self_attn.k_proj,
                               layer.self_attn.v_proj),
                        layer.self_attn.o_proj, layer.post_attention_layernorm,
                        _Fused(layer.mlp.gate_proj, layer.mlp.up_proj), layer.mlp.down_proj,
                        float(layer.self_attn.scaling))
                       for layer in self.core.layers]
        self.head = model.get_output_embeddings()  # after any pruning (LoadedModel)

    @staticmethod
    def supports(model) -> bool:
        cfg = getattr(model, "config", None)
        if cfg is None or type(model).__name__ not in ARCHITECTURES:
            return False
        from hsd_serve.models.kv import supports_slab

        if getattr(cfg, "hidden_act", None) != "silu" or not supports_slab(cfg):
            return False
        if int(getattr(cfg, "pretraining_tp", 1) or 1) != 1:
            return False
        core = getattr(model, "model", None)
        layers = getattr(core, "layers", None)
        if core is None or not layers or getattr(core, "rotary_emb", None) is None:
            return False
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
                return False
            if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                   "scaling")):
                return False
        return True

    def forward(self, input_ids: torch.Tensor, cache, *, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``[b, n or logits_to_keep, V]`` for ``input_ids`` ``[b, n]`` after what
        ``cache`` holds (``past`` positions, the same for every row); the new keys/values are
        appended to ``cache``.  ``attention_mask`` ``[b, past + n]`` (1: attend) as in
        transformers; None: every cached position is valid.  ``position_ids`` default to
        ``past, past + 1, …``."""
        b, n = input_ids.shape
        past = cache.get_seq_length()
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=dev).unsqueeze(0).expand(b, n)
        h = self.core.embed_tokens(input_ids)
        cos, sin = self.core.rotary_emb(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = self._mask(attention_mask, b, n, past, dev)
        gqa = self.kv_heads != self.heads
        qk = self.heads + self.kv_heads  # heads of q and k: rotated together
        for idx, (norm1, qkv, o_proj, norm2, gate_up, down, scale) in enumerate(self.layers):
            x = _rms_norm(h, norm1)
            # [b, heads + 2·kv_heads, n, head_dim]: q's heads, then k's, then v's
            y = qkv(x).view(b, n, -1, self.head_dim).transpose(1, 2)
            rot = _rotate(y[:, :qk], cos, sin)
            k, v = cache.update(rot[:, self.heads:], y[:, qk:], idx)
            o = F.scaled_dot_product_attention(rot[:, :self.heads], k, v, attn_mask=mask,
                                               scale=scale, enable_gqa=gqa)
            h = h + o_proj(o.transpose(1, 2).reshape(b, n, -1))
            g, u = gate_up(_rms_norm(h, norm2)).chunk(2, dim=-1)
            h = h + down(F.silu(g) * u)
        h = _rms_norm(h, self.core.norm)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h)

    @staticmethod
    def _mask(attention_mask: Optional[torch.Tensor], b: int, n: int, past: int,
              dev) -> Optional[torch.Tensor]:
        """SDPA's boolean mask ``[b, 1, n, past + n]``: query ``i`` sees key ``j`` when
        ``j <= past + i`` and the key is not padding; None when nothing is masked."""
        if attention_mask is None and n == 1:
            return None
        total = past + n
        causal = (torch.arange(total, device=dev)[None, :]
                  <= torch.arange(past, total, device=dev)[:, None])
        if attention_mask is None:
            return causal[None, None]
        return causal[None, None] & attention_mask[:, None, None, :total].bool()


def plain_decoder(model) -> Optional[PlainDecoder]:
    """A ``PlainDecoder`` for ``model``, or None where it keeps transformers' forward."""
    return PlainDecoder(model) if PlainDecoder.supports(model) else None
