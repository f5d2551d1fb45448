"""The CPU-fast output head (``models.hf.OutputHead``): the same logits as ``linear`` for every
number of rows, the original parameters (tied weights stay tied, state dicts keep their keys),
a transposed copy that follows every change of the weight (training), and gradients through the
plain ``linear``."""

from __future__ import annotations

import pytest
import torch

from hsd_serve.models.hf import LoadedModel, ModelSpec, OutputHead
from tests.support.numerics import assert_logits_close


@pytest.mark.parametrize("bias", [False, True])
def test_equals_linear_for_any_number_of_rows(bias):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 700, bias=bias)
    head = OutputHead(lin.weight, lin.bias)
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 5, 17):
            for shape in ((rows, 48), (2, rows, 48)):
                h = torch.randn(*shape, generator=g)
                assert_logits_close(head(h), lin(h))


def test_the_transposed_copy_follows_training_and_gradients_reach_the_weight():
    lin = torch.nn.Linear(16, 50, bias=False)
    head = OutputHead(lin.weight)
    h = torch.randn(3, 16)
    with torch.no_grad():
        before = head(h)  # builds the transposed copy
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    loss = head(h).logsumexp(-1).sum()  # with gradients: the plain linear
    loss.backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0
    opt.step()
    with torch.inference_mode():
        after = head(h)
        assert_logits_close(after, torch.nn.functional.linear(h, lin.weight))
    assert float((after - before).abs().max()) > 1e-3, "the step did not reach the copy"


def test_loaded_models_get_it_with_their_own_parameters(tiny_model_dir, families, tmp_path):
    from transformers import AutoModelForCausalLM

    path = str(tiny_model_dir(families[0], 1))
    m = LoadedModel(ModelSpec(path))
    head = m.model.get_output_embeddings()
    assert isinstance(head, OutputHead)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    assert set(m.model.state_dict()) == set(ref.state_dict())
    if ref.config.tie_word_embeddings:
        assert head.weight is m.model.get_input_embeddings().weight
    ids = m.tokenizer.encode_prompt("def fib(n):\n    return")
    ours = m.new_session().forward_from(ids, [5, 6, 7])  # 4 rows through the head
    with torch.inference_mode():
        theirs = ref(torch.tensor([ids + [5, 6, 7]])).logits[0, -4:].float()
    assert_logits_close(ours, theirs)
    m.model.save_pretrained(str(tmp_path / "saved"))  # round trip: loads as a plain model
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    with torch.inference_mode():
        assert_logits_close(again(torch.tensor([ids])).logits[0], ref(torch.tensor([ids])).logits[0])
