"""Batched forwards on a model with learned absolute positions (GPT-2 ``wpe``, 32 positions).

``forward_batch`` right-pads every row's new tokens to the longest row.  The padding slots of a
row whose cache is long must not get position ids past the model's limit: they used to get
``keep + j`` for every slot ``j`` of the batch, so a request near the limit batched with one
that had more new tokens indexed ``wpe`` out of range, and the ``IndexError`` failed every
request of the batch (``INTERNAL`` through the service) although each fitted on its own.
"""

from __future__ import annotations

import pytest
import torch

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.protocol import EXACT
from hsd_serve.engine.target import TargetWorker, VerifyCall
from hsd_serve.models.hf import LoadedModel, ModelSpec, forward_batch
from tests.support.models import find_assets, load_family_tokenizer
from tests.support.numerics import assert_argmax_equal, assert_logits_close

N_POSITIONS = 32


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory):
    """A seeded random ``GPT2LMHeadModel`` (learned positions, 32 of them) on the gpt2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if find_assets() is None:
        pytest.skip("shared assets not available")
    try:
        tok = load_family_tokenizer("gpt2")
    except (FileNotFoundError, OSError, ValueError):
        pytest.skip("gpt2 tokenizer not in the shared assets")
    out = tmp_path_factory.mktemp("gpt2-32pos")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=N_POSITIONS, n_embd=32, n_layer=2,
                     n_head=4, initializer_range=0.5, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    loaded = LoadedModel(ModelSpec(str(out)))
    assert loaded.max_context == N_POSITIONS
    return loaded


def _ids(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.vocab.size, (n,), generator=g).tolist()


def test_forward_batch_near_the_position_limit_equals_each_request_alone(gpt2_model):
    model = gpt2_model
    long_ids, short_ids = _ids(model, N_POSITIONS, 1), _ids(model, 16, 2)
    # row 0: 28 cached tokens, then 1 context + 3 extra = 4 new, ending exactly at the limit (32);
    # row 1: nothing cached, 12 context + 4 extra = 16 new, so row 0 gets 12 padding slots.
    # Second round: row 0 had its last two drafts "rejected" and re-verifies two new ones.
    rounds = [([long_ids[:29], short_ids[:12]], [long_ids[29:32], short_ids[12:16]]),
              ([long_ids[:30], short_ids[:16]], [long_ids[30:32], []])]
    batched = [model.new_session() for _ in range(2)]
    alone = [model.new_session() for _ in range(2)]
    batched[0].forward_from(long_ids[:28])
    alone[0].forward_from(long_ids[:28])
    rows = checked = 0
    for contexts, extras in rounds:
        got = forward_batch(batched, contexts, extras)  # IndexError here before the fix
        want = [s.forward_from(c, e) for s, c, e in zip(alone, contexts, extras)]
        for a, b in zip(got, want):
            # batched and single forwards round differently (CPU/BLAS kernels): scaled to max|logits|
            assert_logits_close(a, b)
            checked += assert_argmax_equal(a, b, min_checked=0)
            rows += len(b)
        for sb, sa in zip(batched, alone):
            assert sb.ids == sa.ids
    assert len(batched[0]) == N_POSITIONS
    assert checked >= 0.8 * rows, (checked, rows)


def test_verify_batch_near_the_position_limit_fails_no_request(gpt2_model):
    model = gpt2_model
    long_ids, short_ids = _ids(model, N_POSITIONS, 3), _ids(model, 15, 4)
    greedy = SamplingParams()
    first = VerifyCall("near", long_ids[:26], [], EXACT, greedy, 0)  # caches 26 tokens
    calls = [VerifyCall("near", long_ids[:28], long_ids[28:31], EXACT, greedy, 2),  # 31 of 32
             VerifyCall("short", short_ids[:12], short_ids[12:15], EXACT, greedy, 0)]  # 15 new
    worker = TargetWorker(model)
    worker.verify_batch([first])
    together = worker.verify_batch(calls)
    solo = TargetWorker(model)
    solo.verify_batch([first])
    alone = [solo.verify_batch([c])[0] for c in calls]
    for v in together + alone:
        assert not isinstance(v, Exception), v
    assert [v.batch_size for v in together] == [2, 2]
    assert [(v.accepted, v.tokens) for v in together] == [(v.accepted, v.tokens) for v in alone]
