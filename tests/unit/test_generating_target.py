"""The coordinator over a target that runs whole requests itself (the vLLM executor's shape),
without vLLM: a scripted generating target behind the real ``Coordinator``/``RequestRun``.

Whatever steps the target streams (one token or several at a time, a broken stream), the output
is cut exactly where AR over the same script cuts it, and the stream is closed there.
"""

from __future__ import annotations

import asyncio

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.engine import Coordinator, TargetInfo
from hsd_serve.engine.protocol import DraftSpec, Step
from hsd_serve.engine.types import GenerationRequest, RequestError
from hsd_serve.models.tokenizer import TokenizerAdapter
from hsd_serve.serve.vllm.local import DrafterAt
from tests.support.toy import build_tokenizer
from tests.unit.test_request_run import PROMPT, ScriptedTarget, ids

MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def tok():
    hf = build_tokenizer([("a", "b")])
    return TokenizerAdapter(hf, model_vocab_size=len(hf))


class ScriptedGeneratingTarget:
    """Streams ``script`` after the prompt in steps of ``sizes`` tokens (cycled), finishing with
    "length" at ``max_new_tokens`` like vLLM; ``break_after``: steps before the first stream
    breaks off with ConnectionError (a lost replica)."""

    def __init__(self, script, sizes=(1,), break_after=None, eos=()):
        self.script, self.sizes, self.break_after, self.eos = script, sizes, break_after, set(eos)
        self.calls: list[dict] = []
        self.closed_early = 0  # streams the coordinator closed before they finished

    async def generate(self, rid, prompt_ids, params, max_new_tokens, spec=None):
        call = {"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "spec": spec}
        self.calls.append(call)
        pos = len(prompt_ids) - len(self.calls[0]["prompt_ids"])  # resumed: where it left off
        emitted, n, finished = 0, 0, False
        drafted, accepted = (4, 2) if spec is not None else (0, 0)  # totals at the end
        per_pos = ([2, 1, 1], [1, 1, 0]) if spec is not None else ([], [])
        try:
            while emitted < max_new_tokens:
                if self.break_after is not None and len(self.calls) == 1 and n == self.break_after:
                    raise ConnectionError("replica lost")
                size = min(self.sizes[n % len(self.sizes)], max_new_tokens - emitted)
                toks = self.script[pos:pos + size]
                if any(t in self.eos for t in toks):
                    toks = toks[:next(i for i, t in enumerate(toks) if t in self.eos) + 1]
                    finished = True
                    yield Step(toks, True, "stop", drafted=drafted, accepted=accepted,
                               drafted_per_position=per_pos[0], accepted_per_position=per_pos[1])
                    return
                pos, emitted, n = pos + len(toks), emitted + len(toks), n + 1
                finished = emitted >= max_new_tokens
                yield Step(toks, finished, "length" if finished else None,
                           drafted=drafted if finished else 0,
                           accepted=accepted if finished else 0,
                           drafted_per_position=per_pos[0] if finished else [],
                           accepted_per_position=per_pos[1] if finished else [])
        finally:
            if not finished:
                self.closed_early += 1

    async def free(self, rid):
        return None


def _coordinator(tok, target, drafter=None):
    return Coordinator(target, TargetInfo(tok, frozenset(tok.eos_ids), MAX_CONTEXT), drafter,
                       same_vocab=True, target_generates=True)


def _ar(tok, script, **kw):
    coord = Coordinator(ScriptedTarget(script, MAX_CONTEXT),
                        TargetInfo(tok, frozenset(tok.eos_ids), MAX_CONTEXT))
    return asyncio.run(coord.generate(_req(method="ar", **kw)))


def _req(max_new=32, stop=(), method="slem", lookahead=3, temperature=0.0):
    return GenerationRequest(PROMPT, max_new_tokens=max_new, method=method, lookahead=lookahead,
                             stop=tuple(stop), params=SamplingParams(temperature=temperature))


def _script(tok, text):
    return ids(tok, text) + ids(tok, "z" * 64)


@pytest.mark.parametrize("sizes", [(1,), (3,), (1, 4, 2)])
def test_steps_of_any_size_end_exactly_where_ar_ends(tok, sizes):
    eos = sorted(tok.eos_ids)[0]
    cases = [(_script(tok, "one two STOP three"), {"stop": ("STOP",)}),
             (_script(tok, "0123456789abcdef"), {"max_new": 7}),
             (ids(tok, "cde") + [eos] + ids(tok, "never"), {})]
    for script, kw in cases:
        want = _ar(tok, script, **kw)
        target = ScriptedGeneratingTarget(script, sizes, eos={eos})
        got = asyncio.run(_coordinator(tok, target, DrafterAt("d:1")).generate(_req(**kw)))
        assert (got.token_ids, got.text, got.finish_reason) == \
            (want.token_ids, want.text, want.finish_reason)
        assert len(target.calls) == 1
        if "stop" in kw and max(sizes) == 1:
            assert target.closed_early == 1, "the stream ran on after the stop string"


def test_the_draft_spec_names_the_drafter_method_and_k(tok):
    script = _script(tok, "hello")
    target = ScriptedGeneratingTarget(script, (2,))
    res = asyncio.run(_coordinator(tok, target, DrafterAt("10.0.0.7:4100")).generate(
        _req(max_new=5, lookahead=3)))
    spec = target.calls[0]["spec"]
    assert spec == DraftSpec(spec.request_id, "slem", "10.0.0.7:4100", PROMPT, 3, True)
    assert (res.stats.drafted, res.stats.accepted) == (4, 2)  # the target's totals
    assert res.stats.drafted_per_position == [2, 1, 1]  # and per position
    assert res.stats.accepted_per_position == [1, 1, 0]
    ar = asyncio.run(_coordinator(tok, ScriptedGeneratingTarget(script)).generate(
        _req(max_new=5, method="ar")))
    assert ar.token_ids == res.token_ids and ar.stats.drafted == 0


def test_no_drafter_address_means_plain_decoding(tok):
    class NoDrafter(DrafterAt):
        async def address(self):
            raise ConnectionError("no drafter replica")

    script = _script(tok, "hello")
    target = ScriptedGeneratingTarget(script)
    res = asyncio.run(_coordinator(tok, target, NoDrafter("")).generate(_req(max_new=5)))
    assert target.calls[0]["spec"] is None
    assert res.token_ids == script[:5] and res.stats.fallback_rounds == 1


def test_a_drafter_that_appears_mid_request_starts_drafting_there(tok):
    """No drafter at the start (the drafters scaled to zero): the request decodes plainly and
    asks between steps; once one is leased it resumes from the committed tokens with drafts (not
    counted as a broken stream), and the output is AR's."""
    class ScaledToZero(DrafterAt):
        def __init__(self, after):
            super().__init__("")
            self.asked, self.after = 0, after

        async def address(self):
            raise ConnectionError("no drafter replica leased yet")

        def ready_address(self):
            self.asked += 1
            return "10.0.0.9:4200" if self.asked > self.after else None

    script = _script(tok, "0123456789abcdef")
    want = _ar(tok, script, max_new=12)
    drafter = ScaledToZero(after=2)
    target = ScriptedGeneratingTarget(script, (2,))
    res = asyncio.run(_coordinator(tok, target, drafter).generate(_req(max_new=12)))
    assert res.token_ids == want.token_ids == script[:12] and res.finish_reason == "length"
    assert len(target.calls) == 2 and drafter.asked == 3
    assert target.calls[0]["spec"] is None
    spec = target.calls[1]["spec"]
    assert spec.drafter == "10.0.0.9:4200" and spec.method == "slem"
    assert target.calls[1]["prompt_ids"] == target.calls[0]["prompt_ids"] + script[:6]
    assert spec.prompt == PROMPT + tok.decode_text(script[:6])  # the drafts continue that
    assert res.stats.drafted == 4  # the drafting stream's totals
    # a drafter that never appears: plain to the end, asked every step
    never = ScaledToZero(after=10**9)
    target = ScriptedGeneratingTarget(script, (2,))
    res = asyncio.run(_coordinator(tok, target, never).generate(_req(max_new=12)))
    assert res.token_ids == want.token_ids and len(target.calls) == 1 and never.asked == 5


def test_each_step_splits_its_round_into_draft_verify_and_transport(tok):
    """What the target measured (``step_s``, of it ``draft_s``) splits each round as an HF round
    is split: draft, verify = the rest of the target's time, transport = the coordinator's wall
    time beyond it; unmeasured steps count whole as verify time."""
    import time

    class Timed(ScriptedGeneratingTarget):
        async def generate(self, *args, **kwargs):
            async for step in super().generate(*args, **kwargs):
                await asyncio.sleep(0.01)  # the wire: the coordinator waits longer than step_s
                yield Step(step.token_ids, step.finished, step.finish_reason, step.drafted,
                           step.accepted, step.drafted_per_position,
                           step.accepted_per_position, step_s=0.004, draft_s=0.001)

    script = _script(tok, "0123456789")
    t0 = time.perf_counter()
    res = asyncio.run(_coordinator(tok, Timed(script, (2,)), DrafterAt("d:1")).generate(
        _req(max_new=8)))
    wall = time.perf_counter() - t0
    st = res.stats
    assert res.token_ids == script[:8] and len(st.round_draft_s) == 4 == st.rounds
    assert st.round_draft_s == [0.001] * 4 and st.round_verify_s == [0.003] * 4
    assert all(0.005 <= t <= wall for t in st.round_transport_s)
    assert abs(st.draft_s - 0.004) < 1e-9 and abs(st.verify_s - 0.012) < 1e-9
    assert abs(st.transport_s - sum(st.round_transport_s)) < 1e-9
    # a target that does not measure: whole steps are verify time, no per-round split
    plain = asyncio.run(_coordinator(tok, ScriptedGeneratingTarget(script, (2,)),
                                     DrafterAt("d:1")).generate(_req(max_new=8)))
    assert plain.stats.round_draft_s == [] and plain.stats.verify_s > 0


def test_a_broken_stream_resumes_from_the_committed_tokens(tok):
    script = _script(tok, "0123456789abcdef")
    target = ScriptedGeneratingTarget(script, (2,), break_after=3)
    res = asyncio.run(_coordinator(tok, target, DrafterAt("d:1")).generate(_req(max_new=12)))
    assert res.token_ids == script[:12] and res.finish_reason == "length"
    assert len(target.calls) == 2
    prompt = target.calls[0]["prompt_ids"]
    assert target.calls[1]["prompt_ids"] == prompt + script[:6]
    assert target.calls[1]["max_new_tokens"] == 6
    # the drafts of the resumed stream continue the new prompt: the old one and the output so far
    assert target.calls[1]["spec"].prompt == PROMPT + tok.decode_text(script[:6])
    assert target.calls[0]["spec"].prompt == PROMPT


def test_slrs_is_refused_naming_the_method(tok):
    coord = _coordinator(tok, ScriptedGeneratingTarget([]), DrafterAt("d:1"))
    with pytest.raises(RequestError) as err:
        coord.prepare(_req(method="slrs"))
    assert err.value.field == "method" and "vLLM" in err.value.message


def test_wire_round_trip_and_refusals():
    from hsd_serve.pb import hsd_pb2 as pb
    from hsd_serve.serve.vllm import wire

    spec = DraftSpec("r1", "tli", "h:1", "p", 3, True)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=11)
    msg = wire.generate_request("r1", [5, 6, 7], params, 9, spec)
    back = pb.TargetGenerateRequest.FromString(msg.SerializeToString())
    assert wire.generate_args(back) == dict(rid="r1", prompt_ids=[5, 6, 7], params=params,
                                            max_new_tokens=9, spec=spec)
    assert wire.generate_args(wire.generate_request("r1", [1], params, 1, None))["spec"] is None
    for step in (Step([3, 4], True, "stop", 7, 5),
                 Step([3], False, None, 0, 0, [], [], step_s=0.0125, draft_s=0.004)):
        assert wire.step_from_proto(pb.TargetStep.FromString(
            wire.step_to_proto(step).SerializeToString())) == step
    for bad, field in ((wire.generate_request("r1", [], params, 9, spec), "prompt_ids"),
                       (wire.generate_request("r1", [1], params, 0, spec), "max_new_tokens"),
                       (wire.generate_request("r1", [1], params, 9,
                                              DraftSpec("r1", "slrs", "h:1", "p", 3)),
                        "drafts.method")):
        with pytest.raises(ValueError, match=field):
            wire.generate_args(bad)


def test_draft_spec_survives_vllm_extra_args():
    spec = DraftSpec("r9", "sd", "h:2", "déf f():", 4, True)
    assert DraftSpec.from_extra_args(spec.to_extra_args()) == spec
    assert DraftSpec.from_extra_args(None) is None and DraftSpec.from_extra_args({}) is None


def test_draft_clock_is_shared_between_mappings_and_removed_on_close():
    """The proposer (vLLM's worker process) adds to the counter, the replica reads it: two
    mappings of one shared-memory file see the same value."""
    import multiprocessing as mp
    import os

    from hsd_serve.serve.vllm.clock import ENV, DraftClock

    clock = DraftClock.create()
    try:
        ctx = mp.get_context("spawn")  # a process of its own, as vLLM's worker is
        p = ctx.Process(target=_add_to_clock, args=(clock.path, 0.25, 4))
        p.start()
        p.join(60)
        assert p.exitcode == 0 and abs(clock.value() - 1.0) < 1e-12
        os.environ[ENV] = clock.path
        writer = DraftClock.from_env()
        writer.add(0.5)
        writer.close()
        assert abs(clock.value() - 1.5) < 1e-12
    finally:
        os.environ.pop(ENV, None)
        clock.close(remove=True)
    assert not os.path.exists(clock.path) and DraftClock.from_env() is None


def _add_to_clock(path, seconds, times):
    from hsd_serve.serve.vllm.clock import DraftClock

    c = DraftClock(path)
    for _ in range(times):
        c.add(seconds)
    c.close()
