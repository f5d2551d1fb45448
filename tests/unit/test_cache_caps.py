"""Per-replica cache bounds: a cap on cached tokens evicts least recently used sessions, which
are rebuilt on demand with the same output (target: prefill from the committed tokens it is sent
every round; drafter: ``SessionMissing`` → the coordinator opens the session again)."""

from __future__ import annotations

import asyncio

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.drafter import DrafterWorker
from hsd_serve.engine.engine import Coordinator, TargetInfo
from hsd_serve.engine.local import Engine, LocalDrafter, LocalTarget
from hsd_serve.engine.protocol import EXACT, SessionMissing
from hsd_serve.engine.target import TargetWorker
from hsd_serve.engine.types import GenerationRequest

PROMPTS = ["def fib(n):\n    ", "Once upon a time", "import numpy as np\n", "SELECT * FROM t"]


@pytest.fixture(scope="module")
def pair(loaded_model):
    return loaded_model("mistral-v0.1"), loaded_model("gpt2", seed=1)


class Watch:
    """Records the largest cached-token total a worker held after each of its calls."""

    def __init__(self, worker, method: str):
        self.worker = worker
        self.peak = 0
        self.peak_over = 0  # largest total minus the cap, beyond the session just served
        inner = getattr(worker, method)

        def wrapped(rid, *args, **kwargs):
            out = inner(rid, *args, **kwargs)
            total = worker.cached_tokens()
            own = len(worker.sessions[rid]) if method == "verify" else \
                len(worker.sessions[rid].session) if rid in worker.sessions else 0
            self.peak = max(self.peak, total)
            self.peak_over = max(self.peak_over, total - max(worker.max_cached_tokens, own))
            return out

        setattr(worker, method, wrapped)


def interleave(coordinator: Coordinator, reqs: list[GenerationRequest]):
    """Run the requests' rounds round-robin (so their caches compete) and return the results."""

    async def run():
        streams = [coordinator.stream(r, rid=f"r{i}") for i, r in enumerate(reqs)]
        results = [None] * len(streams)
        live = set(range(len(streams)))
        while live:
            for i in sorted(live):
                try:
                    chunk = await streams[i].__anext__()
                except StopAsyncIteration:
                    live.discard(i)
                    continue
                if chunk.result is not None:
                    results[i] = chunk.result
        return results

    return asyncio.run(asyncio.wait_for(run(), 300))


@pytest.mark.parametrize("method,temperature", [("slem", 0.0), ("tli", 0.8), ("ar", 0.0)])
def test_token_cap_evicts_and_rebuilds_with_identical_output(pair, method, temperature):
    target_model, drafter_model = pair
    reqs = [GenerationRequest(p, max_new_tokens=24, method=method,
                              params=SamplingParams(temperature=temperature, seed=11 + i))
            for i, p in enumerate(PROMPTS)]
    reference = Engine(target_model, drafter_model)
    want = [reference.generate(r) for r in reqs]

    cap = 40  # about one request's worth: the four requests keep evicting each other
    target = TargetWorker(target_model, max_cached_tokens=cap)
    drafter = DrafterWorker(drafter_model, target_model.vocab, max_cached_tokens=cap)
    tw, dw = Watch(target, "verify"), Watch(drafter, "draft")
    coordinator = Coordinator(LocalTarget(target),
                              TargetInfo(target_model.tokenizer, target_model.eos_ids,
                                         target_model.max_context),
                              LocalDrafter(drafter))
    got = interleave(coordinator, reqs)

    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert g.text == w.text
        assert g.finish_reason == w.finish_reason
    assert target.evictions > 0
    assert tw.peak_over <= 0, (tw.peak, cap)  # never above the cap (bar one oversized session)
    if method != "ar":
        assert drafter.evictions > 0
        assert dw.peak_over <= 0, (dw.peak, cap)
    # every request freed its sessions at the end
    assert not target.sessions and not drafter.sessions
    assert target.cached_tokens() == 0 and drafter.cached_tokens() == 0


def test_target_token_cap_keeps_the_session_in_use(pair):
    target_model, _ = pair
    ids = target_model.tokenizer.encode_prompt("hello world, this is a longer prompt " * 3)
    w = TargetWorker(target_model, max_cached_tokens=8)
    w.verify("a", ids[:5], [], EXACT, SamplingParams(), 0)
    assert w.cached_tokens() == 5
    v = w.verify("b", ids, [], EXACT, SamplingParams(), 0)  # longer than the cap on its own
    assert list(w.sessions) == ["b"] and w.evictions == 1  # "a" went, "b" stays and runs
    assert w.cached_tokens() == len(ids)
    again = TargetWorker(target_model).verify("b", ids, [], EXACT, SamplingParams(), 0)
    assert v.tokens == again.tokens
    w.verify("a", ids[:5], [], EXACT, SamplingParams(), 0)  # rebuilt from what it is sent
    assert list(w.sessions) == ["a"] and w.evictions == 2


def test_drafter_eviction_reports_session_missing(pair):
    target_model, drafter_model = pair
    w = DrafterWorker(drafter_model, target_model.vocab, max_cached_tokens=6)
    w.open("a", "slem", "def fib(n):", SamplingParams())
    w.draft("a", 3, 0, generated=b"")
    w.open("b", "slem", "import numpy as np", SamplingParams())
    w.draft("b", 3, 0, generated=b"")
    assert "a" not in w.sessions and w.evictions >= 1
    with pytest.raises(SessionMissing):
        w.draft("a", 3, 0, generated=b"")


def test_caps_are_validated(pair):
    target_model, drafter_model = pair
    with pytest.raises(ValueError):
        TargetWorker(target_model, max_cached_tokens=0)
    with pytest.raises(ValueError):
        DrafterWorker(drafter_model, target_model.vocab, max_cached_tokens=0)
    from hsd_serve.serve.config import load_config

    assert load_config({}).max_cached_tokens_per_replica is None
    assert load_config({"max_cached_tokens_per_replica": 4096}).max_cached_tokens_per_replica \
        == 4096
    with pytest.raises(Exception):
        load_config({"max_cached_tokens_per_replica": 0})


def test_queue_bound_zero_is_refused_when_read():
    from hsd_serve.serve.config import load_config

    with pytest.raises(Exception, match="max_queued_requests"):
        load_config({"target_deployment": {"max_queued_requests": 0}})
    assert load_config({"target_deployment": {"max_queued_requests": -1}}) \
        .target_deployment.max_queued_requests == -1
