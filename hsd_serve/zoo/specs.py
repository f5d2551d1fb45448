"""Architectures and training hyper-parameters of the three zoo models (sized by measurement on
a 2-core CPU; see the model cards for the numbers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    bos_id: int | None  # prepended to every training document (None: not)
    eos_id: int  # appended to every training document
    save_dtype: str  # "bfloat16" | "float32"
    # training
    lr: float
    minutes: float
    batch_size: int = 8
    seq_len: int = 256
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict)

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_id if self.bos_id is not None else self.eos_id,
            eos_token_id=self.eos_id,
            pad_token_id=None,
            initializer_range=0.02,
        )

    def to_dict(self) -> dict:
        return asdict(self)


SPECS: dict[str, ModelSpec] = {
    # deep + narrow: decode latency comes from depth (Python/per-layer floor) at few training FLOPs
    "target": ModelSpec(
        name="target", vocab_size=32000, hidden_size=192, num_layers=24, num_heads=3,
        num_kv_heads=3, intermediate_size=512, bos_id=1, eos_id=2, save_dtype="bfloat16",
        lr=1.5e-3, minutes=70.0,
    ),
    # full GPT-2 vocabulary, tied 50257 x 96 embedding/head dominates its cost
    "drafter": ModelSpec(
        name="drafter", vocab_size=50257, hidden_size=96, num_layers=2, num_heads=3,
        num_kv_heads=3, intermediate_size=384, bos_id=None, eos_id=50256, save_dtype="float32",
        lr=3e-3, minutes=20.0,
    ),
    "byte_drafter": ModelSpec(
        name="byte_drafter", vocab_size=257, hidden_size=128, num_layers=3, num_heads=4,
        num_kv_heads=4, intermediate_size=384, bos_id=None, eos_id=256, save_dtype="float32",
        lr=3e-3, minutes=12.0, batch_size=16,
    ),
}


SIZING_NOTES = """## Sizing (why this shape)
Measured before training on the build machine (1 torch thread, random weights, batch 1, one new
token after a 128-token `DynamicCache` context, forward only, median; other work was running):

| candidate | params | dtype | ms/step | train tok/s (bf16 autocast, 16×256) |
|---|---|---|---|---|
| target h256 × 16 layers | 21.8M | bf16 | 13.8 | 852 |
| target h256 × 24 layers | 28.7M | bf16 | 20.3 | – |
| **target h192 × 24 layers** (chosen, MLP 576 here, 512 in the final) | 17.7M | bf16 | 16.5 | 715 |
| target h128 × 24 layers | 9.2M | bf16 | 15.0 | 1011 |
| target h128 × 32 layers | 10.9M | bf16 | 16.6 | 778 |
| drafter h64 × 1 | 3.3M | fp32 / bf16 | 1.16 / 1.27 | – |
| drafter h128 × 1 | 6.7M | fp32 / bf16 | 1.81 / 2.08 | – |
| drafter h128 × 2 | 7.0M | fp32 / bf16 | 1.97 / 2.45 | 1077 |
| **drafter h96 × 2** (chosen) | 5.1M | fp32 | 1.76–1.82 | 1200 |
| byte drafter h128 × 2 | 0.56M | fp32 / bf16 | 0.87 / 1.34 | 17034 |

The per-layer cost of a narrow bf16 layer here was ~0.6–0.7 ms, so depth buys latency cheaply;
fp32 decodes faster than bf16 for the small drafters (bf16 matmuls of this size are slower on
this CPU), so they are stored in fp32. Training throughput while the models trained was only
~30% of the numbers above (the 2 cores were shared with other jobs), hence longer wall-clock
budgets than the defaults.
"""
