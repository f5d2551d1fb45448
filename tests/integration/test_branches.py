"""Branches of a draft made ahead (``RunPolicy.overlap_branches``, ``DrafterWorker._branch_from``).

While the target verifies candidates the drafter continues them as if all were accepted, and also
drafts *branches*: at a fork point (a candidate's position, or the bonus position after them) one
of its runner-up tokens, then a greedy continuation.  A branch must be exactly the draft the
drafter would make from the path it guesses, asking for branches must not change the draft
itself, and using them must keep the output the target's (greedy: AR's tokens; sampled SLEM: the
AR sample path of the same seed).
"""

from __future__ import annotations

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.types import GenerationRequest

PROMPTS = ["def fib(n):\n    if n < 2:\n        return n\n",
           "import os\n\ndef list_files(path):\n    \"\"\"Return every file under path.\"\"\"\n",
           "class Stack:\n    def __init__(self):\n"]


@pytest.fixture(scope="module")
def bundled():
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo import bundled_model_dir

    return (LoadedModel(ModelSpec(str(bundled_model_dir("target")))),
            LoadedModel(ModelSpec(str(bundled_model_dir("drafter")), head_ids=16384)))


def _fork_token(context, at, main_first):
    """The token the draft's own path has at fork point ``at``."""
    return context[at] if at < len(context) else main_first


def test_id_level_branches_are_the_drafts_of_the_paths_they_guess(loaded_model, families):
    """A shared vocabulary (SLEM on ids): every branch forks inside the span or at the bonus
    position, starts with a token other than the path's there, and continues exactly as a fresh
    draft from that path; the draft itself is the one asked for without branches."""
    from hsd_serve.engine.drafter import DrafterWorker

    target, drafter = loaded_model(families[0]), loaded_model(families[0], seed=1)
    worker = DrafterWorker(drafter, target.vocab)
    assert worker.same_vocab
    prompt = PROMPTS[0]
    prompt_ids = target.tokenizer.encode_prompt(prompt)
    params = SamplingParams()
    checked = 0
    for n, span in enumerate((0, 1, 3)):
        worker.open("a", "slem", prompt, params, prompt_ids)
        first = worker.draft("a", 3, 0, committed=prompt_ids)
        context = prompt_ids + first.target_ids[:span]
        worker.open("b", "slem", prompt, params, prompt_ids)
        plain = worker.draft("b", 4, span, committed=context)
        d = worker.draft("a", 4, span, committed=context, branches=4, span=span)
        assert (d.target_ids, d.drafter_ids) == (plain.target_ids, plain.drafter_ids)
        assert 1 <= len(d.branches) <= 4
        for b in d.branches:
            assert len(context) - span <= b.at <= len(context)
            alt = b.target_ids[0]
            assert alt != _fork_token(context, b.at, d.target_ids[0])
            assert b.drafter_ids == b.target_ids
            worker.open(f"c{n}", "slem", prompt, params, prompt_ids)
            fresh = worker.draft(f"c{n}", 3, 0, committed=context[:b.at] + [alt])
            assert b.target_ids[1:] == fresh.target_ids, (b, fresh)
            checked += 1
    assert checked >= 3


def test_text_level_branches_are_the_drafts_of_the_paths_they_guess(bundled):
    """Another vocabulary (SLEM on text, the bundled pair): every branch forks at a byte offset
    inside the candidates' bytes or at their end, its first token differs from the path's there,
    and where the drafter spells the guessed text with the same ids, a fresh draft from it is the
    branch's continuation."""
    from hsd_serve.engine.drafter import DrafterWorker

    target, drafter = bundled
    worker = DrafterWorker(drafter, target.vocab)
    token_bytes = drafter.vocab.token_bytes
    params = SamplingParams()
    compared = 0
    for i, prompt in enumerate(PROMPTS):
        worker.open("a", "slem", prompt, params)
        first = worker.draft("a", 3, 0, generated=b"")
        span = len(first.text)
        d = worker.draft("a", 4, 1, generated=first.text, branches=4, span=span)
        context = list(worker.sessions["a"].text.ids)  # synced to first.text, as the call was
        worker.open("b", "slem", prompt, params)
        plain = worker.draft("b", 4, 1, generated=first.text)
        assert d.text == plain.text
        assert d.branches
        for j, b in enumerate(d.branches):
            assert 0 <= b.at <= span and b.text.startswith(token_bytes[b.drafter_ids[0]])
            if b.at == span:  # the bonus position: another token than the draft's first
                assert b.drafter_ids[0] != d.drafter_ids[0]
            rid = f"c{i}-{j}"
            worker.open(rid, "slem", prompt, params)
            guess = first.text[:b.at] + token_bytes[b.drafter_ids[0]]
            fresh = worker.draft(rid, 3, 0, generated=guess)
            spelled = worker.sessions[rid].text.ids
            if spelled[-1] == b.drafter_ids[0] and spelled[:-1] == context[:len(spelled) - 1]:
                assert b.text[len(token_bytes[b.drafter_ids[0]]):] == fresh.text, (b, fresh)
                compared += 1
    assert compared >= 3


@pytest.mark.parametrize("k", [2, 3])
def test_branches_keep_the_output_the_targets(bundled, k):
    """The bundled pair with overlap: greedy SLEM is AR's token for token with and without
    branches, and with branches some rounds take a branch and fewer rounds are plain steps."""
    from hsd_serve.engine.local import Engine

    target, drafter = bundled
    ar = Engine(target)
    counts = {}
    for n_branches in (0, 4):
        engine = Engine(target, drafter, overlap=True, overlap_branches=n_branches)
        plain = branch = 0
        for prompt in PROMPTS:
            want = ar.generate(GenerationRequest(prompt, max_new_tokens=48, method="ar"))
            got = engine.generate(GenerationRequest(prompt, max_new_tokens=48, method="slem",
                                                    lookahead=k))
            assert got.token_ids == want.token_ids, (n_branches, prompt)
            plain += got.stats.ahead_plain
            branch += got.stats.ahead_branch
        counts[n_branches] = (plain, branch)
    assert counts[0][1] == 0 and counts[4][1] > 0, counts
    assert counts[4][0] < counts[0][0], counts


def test_sampled_slem_with_branches_is_the_ar_sample_path(bundled):
    """Sampled SLEM drafts greedily and its branches too; the target's draws are keyed by
    (seed, position), so with overlap and branches the output is AR's sample for the seed."""
    from hsd_serve.engine.local import Engine

    target, drafter = bundled
    ar = Engine(target)
    engine = Engine(target, drafter, overlap=True, overlap_branches=4)
    branch = 0
    for seed in range(4):
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        want = ar.generate(GenerationRequest(PROMPTS[seed % 3], max_new_tokens=32,
                                             params=params, method="ar"))
        got = engine.generate(GenerationRequest(PROMPTS[seed % 3], max_new_tokens=32,
                                                params=params, method="slem", lookahead=2))
        assert got.token_ids == want.token_ids, seed
        branch += got.stats.ahead_branch
    assert branch > 0


def test_a_forked_session_is_a_copy_up_to_its_fork(bundled):
    """``Session.fork(n)``: the fork holds the first ``n`` cached tokens and computes what a
    fresh session would; the original is untouched by the fork's forwards and vice versa."""
    import torch

    _, drafter = bundled
    ctx = drafter.tokenizer.encode_prompt(PROMPTS[1])
    s = drafter.new_session()
    s.forward_from(ctx)
    fork = s.fork(6)
    assert fork.ids == ctx[:6] and s.ids == ctx
    def same(a, b):  # pruned-head rows are -inf outside the kept ids: compare the rest
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite) and finite.any()
        scale = float(b[finite].abs().max())
        assert torch.allclose(a[finite], b[finite], rtol=0, atol=1e-4 * scale)

    same(fork.forward_from(ctx[:6] + [ctx[9]], [ctx[10]]),
         drafter.new_session().forward_from(ctx[:6] + [ctx[9]], [ctx[10]]))
    assert s.ids == ctx  # the fork's forwards wrote its own cache only
    same(s.forward_from(ctx, [ctx[3]]), drafter.new_session().forward_from(ctx, [ctx[3]]))
