"""The preallocated KV cache (``models.kv``) is numerically the cache transformers would keep:
sessions on slabs give the logits of a fresh full forward, through growth past the initial
capacity, crops and re-forwards, and batched forwards; models it does not cover keep theirs."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig

from hsd_serve.models.hf import forward_batch
from hsd_serve.models.kv import MIN_CAPACITY, SlabCache, SlabLayer, new_cache, supports_slab
from tests.support.numerics import assert_argmax_equal, assert_logits_close, assert_scaled_close


def full_logits(model, ids):
    with torch.inference_mode():
        return model.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_session_logits_equal_a_full_forward_through_growth_and_crops(loaded_model, families):
    model = loaded_model(families[0])
    s = model.new_session()
    assert isinstance(s._cache, SlabCache)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.vocab.size, (3 * MIN_CAPACITY,), generator=g).tolist()
    ctx = ids[:5]
    s.forward_from(ctx)
    step, rows, checked = 1, 0, 0
    while len(ctx) < len(ids) - 8:  # grow one to eight tokens at a time, crop back now and then
        extra = ids[len(ctx):len(ctx) + 1 + step % 8]
        got = s.forward_from(ctx, extra)
        want = full_logits(model, ctx + extra)[len(ctx) - 1:]
        assert got.shape == want.shape
        # scaled to max|logits| (float32 rounding differs by CPU/BLAS kernel): tests/support/numerics.py
        assert_logits_close(got, want)
        checked += assert_argmax_equal(got, want, min_checked=0)  # near-ties skipped ...
        rows += len(want)
        keep = len(extra) if step % 3 else max(1, len(extra) // 2)  # the rest is "rejected"
        ctx = ctx + extra[:keep]
        step += 1
    assert checked >= 0.9 * rows, (checked, rows)  # ... but nearly every position is checked
    layer = s._cache.layers[0]
    assert layer._k.shape[-2] >= len(s) > MIN_CAPACITY  # it grew, in place of concatenation
    assert layer.keys.shape[-2] == len(s) == s._cache.get_seq_length()


def test_slab_layer_matches_dynamic_layer_on_the_same_updates():
    g = torch.Generator().manual_seed(0)
    slab, dyn = SlabCache(), DynamicCache()
    for n, drop in [(5, 0), (70, 3), (1, 0), (130, 40), (2, 1)]:
        k = torch.randn(1, 2, n, 4, generator=g)
        v = torch.randn(1, 2, n, 4, generator=g)
        ks, vs = slab.update(k, v, 0)
        kd, vd = dyn.update(k, v, 0)
        assert torch.equal(ks, kd) and torch.equal(vs, vd)
        if drop:
            slab.crop(-drop)
            dyn.crop(-drop)
        assert slab.get_seq_length() == dyn.get_seq_length()
        assert torch.equal(slab.layers[0].keys, dyn.layers[0].keys)


def test_forward_batch_on_slabs_equals_each_session_alone(loaded_model, families):
    model = loaded_model(families[-1])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.vocab.size, (n,), generator=g).tolist() for n in (7, 70, 1, 33)]
    extras = [torch.randint(3, model.vocab.size, (n,), generator=g).tolist() for n in (3, 0, 5, 1)]
    batched = [model.new_session() for _ in prompts]
    alone = [model.new_session() for _ in prompts]
    for s, p in zip(batched[:2], prompts[:2]):  # two rows start with a cache, two without
        s.forward_from(p[:-2])
    rows = checked = 0
    for _ in range(2):  # the second round reuses what the first appended
        got = forward_batch(batched, prompts, extras)
        want = [s.forward_from(p, e) for s, p, e in zip(alone, prompts, extras)]
        for a, b in zip(got, want):
            # batched and single GEMMs round differently, by CPU/BLAS kernel: scaled to max|logits|
            assert_logits_close(a, b)
            checked += assert_argmax_equal(a, b, min_checked=0)  # near-ties skipped ...
            rows += len(b)
        for sb, sa in zip(batched, alone):
            assert sb.ids == sa.ids
            for lb, la in zip(sb._cache.layers, sa._cache.layers):
                # cached keys: the same float32 rounding, scaled to max|keys|
                assert_scaled_close(lb.keys, la.keys, what="cached keys")
        prompts = [p + e for p, e in zip(prompts, extras)]
    assert checked >= 0.9 * rows, (checked, rows)  # ... but nearly every row is checked


def test_models_with_other_layer_types_keep_transformers_cache():
    plain = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                        intermediate_size=32, vocab_size=50)
    assert supports_slab(plain) and isinstance(new_cache(plain), SlabCache)
    sliding = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                          intermediate_size=32, vocab_size=50)
    sliding.layer_types = ["sliding_attention", "full_attention"]
    assert not supports_slab(sliding)
    cache = new_cache(sliding)
    assert isinstance(cache, DynamicCache) and not isinstance(cache, SlabCache)
    windowed = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                           intermediate_size=32, vocab_size=50)
    windowed.sliding_window = 16
    assert not supports_slab(windowed)


def test_slab_crop_refuses_a_positive_count():
    layer = SlabLayer()
    layer.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    try:
        layer.crop(2)
    except ValueError:
        pass
    else:
        raise AssertionError("a positive crop must be refused")
    layer.crop(-5)
    assert layer.get_seq_length() == 0
