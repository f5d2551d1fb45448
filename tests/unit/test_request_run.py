"""The round loop without models: a scripted target (its own choice at each output position) and
scripted drafters, behind the real ``Coordinator``/``RequestRun`` and a real byte-level tokenizer.

Whatever the drafter does — propose well, badly, fail, time out, lose its session — the output is
the target's script, cut exactly where AR cuts it (EOS, stop string, max_new_tokens, context).
"""

from __future__ import annotations

import asyncio

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.engine import Coordinator, TargetInfo
from hsd_serve.engine.protocol import EXACT, Branch, Draft, SessionMissing, Verdict
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.models.tokenizer import TokenizerAdapter
from tests.support.toy import build_tokenizer

PROMPT = "xy"


@pytest.fixture(scope="module")
def tok():
    hf = build_tokenizer([("a", "b")])
    return TokenizerAdapter(hf, model_vocab_size=len(hf))


def ids(tok, text: str) -> list[int]:
    return tok.encode_text(text)


class ScriptedTarget:
    """Emits ``script[position]`` as its own choice; EXACT rule only; checks every call fits."""

    def __init__(self, script: list[int], max_context: int):
        self.script, self.max_context = script, max_context
        self.calls: list[tuple[int, int, int]] = []  # (position, len(committed), len(candidates))
        self.freed: list[str] = []

    async def verify(self, rid, committed, candidates, rule, params, position, proposals=None):
        assert rule == EXACT
        assert len(committed) + len(candidates) <= self.max_context, "sequence over the context"
        self.calls.append((position, len(committed), len(candidates)))
        out = []
        for i, c in enumerate(candidates):
            if c != self.script[position + i]:
                break
            out.append(c)
        out.append(self.script[position + len(out)])
        return Verdict(accepted=len(out) - 1, tokens=out, batch_size=1)

    async def free(self, rid):
        self.freed.append(rid)


class ScriptedDrafter:
    """Proposes the next ``k`` ids of ``proposal`` (a shared vocabulary: ids mode), or misbehaves
    as ``fail`` says for the draft calls listed in ``fail_at``."""

    def __init__(self, proposal: list[int], fail=None, fail_at=(), delay_s: float = 0.0,
                 per_k: int = 1):
        self.proposal, self.fail, self.fail_at, self.delay_s = proposal, fail, set(fail_at), delay_s
        self.per_k = per_k  # ids per unit of k (SLEM's bridge may give up to 3k candidates)
        self.opens = 0
        self.attempts: list[int] = []
        self.freed: list[str] = []
        self.branch_asks: list[tuple[int, int]] = []  # (branches, span) per draft call

    async def open(self, rid, method, prompt, params, prompt_ids):
        self.opens += 1

    async def draft(self, rid, k, position, *, committed=None, generated=None, attempt=0,
                    branches=0, span=0):
        n = len(self.attempts)
        self.attempts.append(attempt)
        self.branch_asks.append((branches, span))
        if n in self.fail_at:
            if self.fail == "missing":
                raise SessionMissing(rid)
            if self.fail == "slow":
                await asyncio.sleep(self.delay_s)
            else:
                raise RuntimeError("drafter replica is gone")
        assert committed is not None, "a shared vocabulary drafts on the committed ids"
        d = self.proposal[position:position + self.per_k * k]
        return Draft(drafter_ids=list(d), target_ids=list(d))

    async def slrs_step(self, *a):
        raise AssertionError("not SLRS")

    async def free(self, rid):
        self.freed.append(rid)


def _run(tok, script, drafter, *, max_new=32, max_context=512, stop=(), lookahead=3,
         timeout=None, method="slem"):
    eos = frozenset(tok.eos_ids)
    target = ScriptedTarget(script, max_context)
    coord = Coordinator(target, TargetInfo(tok, eos, max_context), drafter, same_vocab=True,
                        draft_timeout_s=timeout, drafter_retry_rounds=2)
    req = GenerationRequest(PROMPT, max_new_tokens=max_new, method=method, lookahead=lookahead,
                            stop=tuple(stop), params=SamplingParams())
    return asyncio.run(coord.generate(req)), target


def _script(tok, text: str, pad: int = 64) -> list[int]:
    return ids(tok, text) + ids(tok, "z" * pad)


def test_a_good_drafter_changes_nothing_but_the_rounds(tok):
    script = _script(tok, "hello world")
    ar, _ = _run(tok, script, None, method="ar", max_new=11)
    good, target = _run(tok, script, ScriptedDrafter(script), max_new=11)
    bad, _ = _run(tok, script, ScriptedDrafter(ids(tok, "q" * 80)), max_new=11)
    assert ar.text == good.text == bad.text == "hello world"
    assert ar.token_ids == good.token_ids == bad.token_ids
    assert good.stats.rounds < ar.stats.rounds == 11
    assert good.stats.accepted == good.stats.drafted > 0
    assert bad.stats.accepted == 0 < bad.stats.drafted
    assert target.freed, "the target's cache was not freed"


def test_drafter_failure_falls_back_and_retries_later(tok):
    script = _script(tok, "klmnopqrst")
    drafter = ScriptedDrafter(script, fail="error", fail_at={0})
    res, _ = _run(tok, script, drafter, max_new=10, lookahead=2)
    assert res.text == "klmnopqrst"
    assert res.stats.fallback_rounds >= 1
    # failed at round 0; tried again at round 0 + drafter_retry_rounds (2), reopening first
    assert len(drafter.attempts) >= 2 and drafter.opens == 2
    assert len(set(drafter.attempts)) == len(drafter.attempts), "an attempt key was reused"


def test_a_lost_session_is_reopened_in_the_same_round(tok):
    script = _script(tok, "klmnop")
    drafter = ScriptedDrafter(script, fail="missing", fail_at={0})
    res, _ = _run(tok, script, drafter, max_new=6, lookahead=2)
    assert res.text == "klmnop"
    assert drafter.opens == 2 and res.stats.fallback_rounds == 0
    assert drafter.attempts[:2] == [0, 1], "the retried call must get a fresh attempt"


def test_a_slow_drafter_times_out_into_a_target_step(tok):
    script = _script(tok, "klmnop")
    drafter = ScriptedDrafter(script, fail="slow", fail_at={0}, delay_s=5.0)
    res, _ = _run(tok, script, drafter, max_new=6, lookahead=2, timeout=0.05)
    assert res.text == "klmnop"
    assert res.stats.fallback_rounds >= 1


def test_eos_ends_with_stop_and_is_not_emitted(tok):
    eos = sorted(tok.eos_ids)[0]
    script = ids(tok, "cde") + [eos] + ids(tok, "never")
    for drafter in (None, ScriptedDrafter(script)):
        res, _ = _run(tok, script, drafter, method="ar" if drafter is None else "slem")
        assert res.finish_reason == "stop" and res.text == "cde"
        assert eos not in res.token_ids and len(res.token_ids) == 3


def test_stop_string_cuts_text_at_the_same_token_as_ar(tok):
    script = _script(tok, "one two STOP three")
    ar, _ = _run(tok, script, None, method="ar", stop=("STOP",))
    sp, _ = _run(tok, script, ScriptedDrafter(script), stop=("STOP",), lookahead=5)
    assert ar.finish_reason == sp.finish_reason == "stop"
    assert ar.text == sp.text == "one two "
    assert ar.token_ids == sp.token_ids


@pytest.mark.parametrize("lookahead", [1, 2, 5])
def test_length_and_context_limits_end_exactly_as_ar(tok, lookahead):
    script = _script(tok, "0123456789abcdefghij")
    for kw in ({"max_new": 7}, {"max_context": len(ids(tok, PROMPT)) + 7}):
        ar, _ = _run(tok, script, None, method="ar", **kw)
        sp, target = _run(tok, script, ScriptedDrafter(script, per_k=3), lookahead=lookahead,
                          **kw)
        assert ar.finish_reason == sp.finish_reason == "length"
        assert ar.token_ids == sp.token_ids and len(sp.token_ids) == 7
        assert all(n_cands <= 7 - pos - 1 for pos, _, n_cands in target.calls)


def test_every_registered_method_is_named_once_everywhere():
    """A new method is its module plus a registry line; the request schema and the wire enum must
    follow, or this fails."""
    from hsd_serve.engine.methods import METHODS as REGISTRY
    from hsd_serve.engine.types import METHODS as REQUESTABLE
    from hsd_serve.serve.convert import METHOD, RESOLVED_METHOD

    assert set(REQUESTABLE) == set(REGISTRY) | {"auto"}
    assert all(REGISTRY[name].name == name for name in REGISTRY)
    for name in REQUESTABLE:  # a client's GenerateRequest.method
        assert METHOD.from_proto(METHOD.to_proto(name)) == name
    for name in REGISTRY:  # a data-plane OpenRequest.method
        assert RESOLVED_METHOD.from_proto(RESOLVED_METHOD.to_proto(name)) == name


def test_load_aware_lookahead_caps_k_and_reports_it(tok):
    """A target that verified 32 requests per forward caps k at 1 (after the first round) and
    the stats say so; at load 1 k stays."""
    script = _script(tok, "klmnopqrstuvw")
    for load, k_final in ((32, 1), (1, 4)):
        target = ScriptedTarget(script, 512)
        verify = target.verify

        async def loaded(*a, **kw):
            v = await verify(*a, **kw)
            v.batch_size = load
            return v

        target.verify = loaded
        coord = Coordinator(target, TargetInfo(tok, frozenset(tok.eos_ids), 512),
                            ScriptedDrafter(script), same_vocab=True, load_aware_lookahead=True)
        res = asyncio.run(coord.generate(GenerationRequest(PROMPT, max_new_tokens=12,
                                                           method="slem", lookahead=4)))
        assert res.text == "klmnopqrstuv"
        assert res.stats.lookahead_final == k_final
        assert max(n for _, _, n in target.calls[1:]) == k_final


def test_a_failing_target_is_not_mistaken_for_a_failing_drafter(tok):
    """A target error in a speculative verify fails the request (as under AR); it must not be
    swallowed as a drafter failure and turned into target-only rounds."""
    script = _script(tok, "klmnop")
    target = ScriptedTarget(script, 512)

    async def broken(rid, committed, candidates, *a, **kw):
        if candidates:
            raise IndexError("index out of range in self")
        return await ScriptedTarget.verify(target, rid, committed, candidates, *a, **kw)

    target.verify = broken
    coord = Coordinator(target, TargetInfo(tok, frozenset(tok.eos_ids), 512),
                        ScriptedDrafter(script), same_vocab=True)
    with pytest.raises(IndexError):
        asyncio.run(coord.generate(GenerationRequest(PROMPT, max_new_tokens=6, method="slem")))
    assert target.freed, "caches are freed on failure too"


class PausingTarget(ScriptedTarget):
    """Yields to the event loop while it verifies, as a remote target does."""

    async def verify(self, *a, **kw):
        await asyncio.sleep(0.01)
        return await super().verify(*a, **kw)


class AheadFailingDrafter(ScriptedDrafter):
    """Drafts what is asked, except the longer calls that draft ahead (k + 1): those fail."""

    def __init__(self, proposal, lookahead: int):
        super().__init__(proposal)
        self.lookahead, self.ahead_calls = lookahead, 0

    async def draft(self, rid, k, position, **kw):
        if k > self.lookahead:
            self.ahead_calls += 1
            raise RuntimeError("drafter replica is gone")
        return await super().draft(rid, k, position, **kw)


def test_drafting_ahead_that_fails_leaves_no_unretrieved_error(tok):
    """With overlap, every draft made ahead fails while the target verifies, the last one after
    the request's last round; the output is the script and no failed call is left unretrieved
    (asyncio reports those when the task is collected)."""
    import gc

    script = _script(tok, "abcdefgh")
    drafter = AheadFailingDrafter(script, lookahead=2)
    reported = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        coord = Coordinator(PausingTarget(script, 512), TargetInfo(tok, frozenset(tok.eos_ids), 512),
                            drafter, same_vocab=True, drafter_retry_rounds=1, overlap=True)
        req = GenerationRequest(PROMPT, max_new_tokens=len(ids(tok, "abcdefgh")), method="slem",
                                lookahead=2,
                                params=SamplingParams())
        res = await coord.generate(req)
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0)
        return res

    res = asyncio.run(main())
    assert res.text == "abcdefgh"
    assert drafter.ahead_calls >= 2, "drafting ahead never ran"
    assert res.stats.ahead_waited == drafter.ahead_calls - 1  # the last one: after the end
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported


class SlowDrafter(ScriptedDrafter):
    """Proposes the script, taking ``delay_s`` per call (a drafter replica elsewhere)."""

    async def draft(self, rid, k, position, **kw):
        await asyncio.sleep(self.delay_s)
        return await super().draft(rid, k, position, **kw)


@pytest.mark.parametrize("overlap,miss", [(True, "wait"), (True, "plain"), (False, "plain")])
def test_a_traced_request_records_its_timeline(tok, overlap, miss):
    """``trace``: every round's verify span, and with overlap the drafts made ahead, which run
    while the target verifies the round before; untraced requests record nothing.  With
    ``overlap_miss="plain"`` the target never waits for a draft: the first round is a plain
    step during which the drafter drafts ahead, and no round has a ``draft`` span."""
    script = _script(tok, "abcdefghijkl")
    n = len(ids(tok, "abcdefghijkl"))

    async def main(trace):
        coord = Coordinator(PausingTarget(script, 512), TargetInfo(tok, frozenset(tok.eos_ids), 512),
                            SlowDrafter(script, delay_s=0.004), same_vocab=True, overlap=overlap,
                            overlap_miss=miss)
        return await coord.generate(GenerationRequest(PROMPT, max_new_tokens=n, method="slem",
                                                      lookahead=2, trace=trace))

    res = asyncio.run(main(True))
    assert res.text == "abcdefghijkl"
    timeline = [(s.lane, s.round, s.start_s, s.end_s) for s in res.stats.timeline]
    lanes = {lane for lane, *_ in timeline}
    verify = [s for s in timeline if s[0] == "verify"]
    assert len(verify) == res.stats.rounds == len({s[1] for s in verify})
    assert all(0 <= a < b <= res.stats.wall_s for _, _, a, b in timeline)
    if overlap:  # the script is always right, so every round after the first drafted ahead
        ahead = [s for s in timeline if s[0] == "draft ahead"]
        assert len(ahead) >= res.stats.ahead_ready
        by_round = {s[1]: s for s in verify}
        for _, r, a, b in ahead:  # asked for as round r's verify began, drafted during it
            assert a < by_round[r][3] and b > by_round[r][2]
        if miss == "wait":
            assert res.stats.ahead_ready == res.stats.rounds - 1 > 0
            assert [s[1] for s in timeline if s[0] == "draft"] == [0]
            assert res.stats.ahead_plain == 0
        else:  # round 0: a plain step (drafting ahead under it); the last: 1 token of room
            assert res.stats.ahead_plain == 1 and res.stats.ahead_waited == 0
            assert res.stats.ahead_ready == res.stats.rounds - 2 > 0
            assert 0 in {s[1] for s in ahead} and "draft" not in lanes
            assert res.stats.drafted == res.stats.accepted == n - res.stats.rounds
    else:
        assert lanes == {"draft", "verify"}
        for lane_draft in (s for s in timeline if s[0] == "draft"):
            assert lane_draft[3] <= by_round_start(verify, lane_draft[1])
    assert asyncio.run(main(False)).stats.timeline == []
    assert "timeline" not in asyncio.run(main(False)).stats.as_dict()


def by_round_start(verify, r):
    return next(s[2] for s in verify if s[1] == r)


def test_overlap_miss_takes_plain_or_wait_only(tok):
    """``overlap_miss`` is ``plain`` (the default: the target never waits for a draft) or
    ``wait``; anything else is refused where it is set, in the coordinator and in the serve
    config (both executors)."""
    from pydantic import ValidationError

    from hsd_serve.serve.config import AppConfig

    info = TargetInfo(tok, frozenset(tok.eos_ids), 512)
    script = _script(tok, "ab")
    assert Coordinator(PausingTarget(script, 512), info, overlap=True).policy.overlap_miss == \
        "plain"
    with pytest.raises(ValueError, match="overlap_miss must be one of plain, wait"):
        Coordinator(PausingTarget(script, 512), info, overlap=True, overlap_miss="sometimes")
    assert AppConfig().overlap_miss == AppConfig().vllm.overlap_miss == "plain"
    assert AppConfig(overlap=True, overlap_miss="wait").overlap_miss == "wait"
    with pytest.raises(ValidationError, match="overlap_miss"):
        AppConfig(overlap_miss="never")
    with pytest.raises(ValidationError, match="overlap_miss"):
        AppConfig(vllm={"overlap_miss": "later"})


class BranchingDrafter(ScriptedDrafter):
    """Proposes ``proposal`` (wrong where it differs from the script) and, when asked to draft
    branches, guesses each fork point of the span: a branch with the script's token there (right
    where the proposal is wrong) and one with a token the script never has (always wrong)."""

    def __init__(self, proposal, script, wrong):
        super().__init__(proposal)
        self.script, self.wrong = script, wrong

    async def draft(self, rid, k, position, *, committed=None, **kw):
        d = await super().draft(rid, k, position, committed=committed, **kw)
        branches, span = kw.get("branches", 0), kw.get("span", 0)
        start = len(committed) - position  # the prompt's length
        for at in range(len(committed) - span, len(committed) + 1)[:branches]:
            out = at - start
            right = self.script[out:out + k]
            d.branches += [Branch(at, drafter_ids=right, target_ids=right),
                           Branch(at, drafter_ids=[self.wrong] * k, target_ids=[self.wrong] * k)]
        if branches:  # past the end: ignored
            d.branches.append(Branch(len(committed) + 5, target_ids=self.script[:k]))
        return d


@pytest.mark.parametrize("branches", [0, 4])
def test_a_round_after_a_rejection_takes_the_branch_that_guessed_it(tok, branches):
    """Drafting ahead with branches (``overlap_branches``): when the target rejects a candidate,
    the next round's draft is the branch made ahead at that fork point whose first token is the
    target's, if there is one — never a branch the committed tokens did not take.  The output is
    the script whatever the drafter guesses, and with branches fewer rounds are plain steps."""
    script = _script(tok, "abcdefghijklmnop")
    proposal = list(script)
    for i in range(2, len(proposal), 5):  # the drafter is wrong every fifth token
        proposal[i] = ids(tok, "q")[0]
    n = len(ids(tok, "abcdefghijklmnop"))
    drafter = BranchingDrafter(proposal, script, wrong=ids(tok, "w")[0])

    async def main():
        coord = Coordinator(PausingTarget(script, 512), TargetInfo(tok, frozenset(tok.eos_ids), 512),
                            drafter, same_vocab=True, overlap=True, overlap_branches=branches)
        return await coord.generate(GenerationRequest(PROMPT, max_new_tokens=n, method="slem",
                                                      lookahead=3))

    res = asyncio.run(main())
    assert res.token_ids == script[:n]
    asks = [a for a in drafter.branch_asks if a[0]]
    if not branches:  # every rejection is followed by a plain step
        assert not asks and res.stats.ahead_branch == 0 and res.stats.ahead_plain >= 3
        return
    assert asks and all(b == branches for b, _ in asks)
    assert {span for _, span in asks} > {0}  # ahead of a verification: its candidates
    assert res.stats.ahead_branch >= 2, res.stats
    assert res.stats.ahead_plain == 1  # only the first round: every rejection was guessed
    assert res.stats.ahead_ready == res.stats.rounds - 1


class SlowBranchingDrafter(BranchingDrafter):
    """A ``BranchingDrafter`` slower than the target's verification: every draft made ahead is
    still out at the verdict."""

    async def draft(self, rid, k, position, **kw):
        await asyncio.sleep(0.03)
        return await super().draft(rid, k, position, **kw)


def test_branches_back_off_while_drafts_made_ahead_are_late(tok):
    """A draft made ahead still out at the verdict makes the target wait: the next ones ask for
    half the branches, down to none (``RequestRun._pace_branches``); the output is unchanged."""
    script = _script(tok, "abcdefghijklmnopqrstuvwx")
    n = len(ids(tok, "abcdefghijklmnopqrstuvwx"))
    drafter = SlowBranchingDrafter(list(script), script, wrong=ids(tok, "w")[0])

    async def main():
        coord = Coordinator(PausingTarget(script, 512), TargetInfo(tok, frozenset(tok.eos_ids), 512),
                            drafter, same_vocab=True, overlap=True, overlap_branches=4)
        return await coord.generate(GenerationRequest(PROMPT, max_new_tokens=n, method="slem",
                                                      lookahead=2))

    res = asyncio.run(main())
    assert res.token_ids == script[:n]
    asked = [b for b, _ in drafter.branch_asks]
    assert asked[:4] == [4, 2, 1, 0] and not any(asked[4:]), asked
