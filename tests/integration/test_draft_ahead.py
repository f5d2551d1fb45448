"""The vLLM executor's draft broker, drafting ahead (``vllm.overlap``), without vLLM: a greedy
target replayed from our HF executor's AR output verifies the broker's drafts step by step as
vLLM would (accept the longest matching prefix, then one target token).  The drafter is the
bundled one behind a real data-plane gRPC server.

With overlap the drafter continues each draft while it is "verified" (the test lets it finish,
as a target forward would), so steps after a fully accepted draft whose bonus token the drafter
guessed find their draft ready; every other step drops the drafted-ahead ids.  Without overlap no
step finds a draft ready.  Either way drafts are just candidates: the output is the reference's.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.protocol import DraftSpec
from hsd_serve.engine.types import GenerationRequest

PROMPTS = ["def fib(n):\n    if n < 2:\n        return n\n",
           "import os\n\ndef list_files(path):\n    \"\"\"Return every file under path.\"\"\"\n",
           "class Stack:\n    def __init__(self):\n"]
MAX_NEW = 48


@pytest.fixture(scope="module")
def pair():
    from hsd_serve.engine.drafter import DrafterWorker
    from hsd_serve.engine.local import Engine
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.serve.dataplane import start_dataplane_server, stop_dataplane_server
    from hsd_serve.zoo import bundled_model_dir

    target_dir = str(bundled_model_dir("target"))
    target = LoadedModel(ModelSpec(target_dir, dtype="float32"))
    drafter = LoadedModel(ModelSpec(str(bundled_model_dir("drafter")), head_ids=16384))
    engine = Engine(target)
    refs = []
    for p in PROMPTS:
        r = engine.generate(GenerationRequest(p, max_new_tokens=MAX_NEW, method="ar",
                                              params=SamplingParams()))
        refs.append((target.tokenizer.encode_prompt(p), list(r.token_ids)))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    worker = DrafterWorker(drafter, target.vocab)
    server, port = asyncio.run_coroutine_threadsafe(
        start_dataplane_server("drafter", worker, "127.0.0.1", 0), loop).result(30)
    yield target_dir, f"127.0.0.1:{port}", refs, worker
    asyncio.run_coroutine_threadsafe(stop_dataplane_server(server), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)


def _replay(broker, address, prompt, prompt_ids, out, k, rid):
    """Steps until the reference output is complete; (drafted, accepted, steps)."""
    full = prompt_ids + out
    spec = DraftSpec(rid, "slem", address, prompt, k)
    ids = full[:len(prompt_ids) + 1]  # vLLM's prefill step samples the first token
    drafted = accepted = steps = 0
    while len(ids) < len(full):
        room = len(full) - len(ids)
        fut = broker.submit(rid, spec, ids, len(prompt_ids), min(k, room - 1) or 1, len(full))
        draft = fut.result(timeout=30) if fut is not None else []
        assert all(isinstance(t, int) for t in draft) and len(draft) <= k
        acc = 0
        while acc < len(draft) and len(ids) + acc < len(full) and draft[acc] == full[len(ids) + acc]:
            acc += 1
        drafted, accepted, steps = drafted + len(draft), accepted + acc, steps + 1
        ids = full[:min(len(full), len(ids) + acc + 1)]
        s = broker.sessions[rid]  # the target's forward: the drafter drafts ahead meanwhile

        async def settle():
            if s.task is not None:
                await asyncio.shield(s.task)

        asyncio.run_coroutine_threadsafe(settle(), broker.loop).result(30)
    assert ids == full
    broker.retire(set())
    return drafted, accepted, steps


@pytest.mark.parametrize("k", [1, 3])
def test_drafts_ahead_only_with_overlap(pair, k):
    from hsd_serve.serve.vllm.proposer import DraftBroker

    target_dir, address, refs, worker = pair
    results = {}
    for mode, overlap, plain in (("wait", True, False), ("plain", True, True),
                                 ("off", False, True)):
        broker = DraftBroker(target_dir, overlap=overlap, plain_on_miss=plain)
        totals = [0, 0, 0]
        for i, (p, (prompt_ids, out)) in enumerate(zip(PROMPTS, refs)):
            for j, v in enumerate(_replay(broker, address, p, prompt_ids, out, k,
                                          f"r{mode}{k}{i}")):
                totals[j] += v
        results[mode] = (totals, dict(broker.stats))
    (d_on, a_on, steps_on), on = results["wait"]
    (d_pl, a_pl, steps_pl), pl = results["plain"]
    (d_off, a_off, steps_off), off = results["off"]
    assert on["failed"] == pl["failed"] == off["failed"] == 0
    # overlap: some steps found their draft drafted during the previous verification
    assert on["ready"] > 0 and on["ready"] + on["waited"] == steps_on and on["plain"] == 0
    assert on["stale"] > 0  # and steps after a partial acceptance dropped drafted-ahead ids
    assert off["ready"] == off["stale"] == off["plain"] == 0 and off["waited"] == steps_off
    # overlap_miss plain: no step waited; those with no draft ready took what was drafted
    assert pl["waited"] == 0 and pl["ready"] > 0 and pl["plain"] > 0
    assert pl["ready"] + pl["plain"] == steps_pl and pl["stale"] > 0
    # drafts of the same quality either way: acceptance per drafted token within a wide band
    assert a_on > 0 and a_off > 0 and a_pl > 0
    assert abs(a_on / d_on - a_off / d_off) < 0.25
    assert abs(a_pl / d_pl - a_off / d_off) < 0.25
    # overlap cost drafter work (drafted-ahead ids) but never more steps than 1.25x; a plain
    # step emits one token, so not waiting takes more (cheaper) steps, never more than 2x
    assert steps_on <= 1.25 * steps_off
    assert steps_off < steps_pl <= 2 * steps_off


class GatedDrafter:
    """A token-level drafter (shared vocabulary) that proposes ``script`` after the committed ids,
    each call held until ``gate`` is set: a drafter slower than the target's steps."""

    def __init__(self, script: list[int]):
        self.script, self.calls, self.gate = script, 0, asyncio.Event()

    async def open(self, rid, method, prompt, params, prompt_ids):
        return None

    async def draft(self, rid, k, position, *, committed=None, generated=None, attempt=0):
        from hsd_serve.engine.protocol import Draft

        self.calls += 1
        n = len(committed)  # the run's list: read it before waiting
        await self.gate.wait()
        return Draft(target_ids=list(self.script[n:n + k]))

    async def free(self, rid):
        return None


@pytest.mark.parametrize("guessed", [True, False])
def test_plain_steps_keep_the_extension_that_is_out(pair, guessed):
    """``overlap_miss: plain`` with a drafter slower than the target's steps: while the one
    extension is out, plain steps commit ids along the chain without dropping it and without
    asking the drafter again (each call would come back too late in turn); when it is back, its
    ids after the ones committed meanwhile are the next draft — or, when the plain step took
    another token than the extension's first, they are stale and the next step drafts afresh."""
    from hsd_serve.core.sampling import SamplingParams
    from hsd_serve.engine.run import RequestRun, RunPolicy
    from hsd_serve.engine.types import RequestStats
    from hsd_serve.serve.vllm.proposer import DraftBroker

    target_dir, address, refs, _ = pair
    prompt_ids, out = refs[0]
    full = prompt_ids + out
    drafter = GatedDrafter(full)

    class Broker(DraftBroker):
        def _run(self, spec, ids, prompt_len):
            req = GenerationRequest(spec.prompt, params=SamplingParams(), method="sd",
                                    lookahead=spec.k)
            return RequestRun(req, "sd", ids[:prompt_len], spec.request_id, self.info, None,
                              drafter, RunPolicy(same_vocab=True, draft_timeout_s=30),
                              RequestStats())

    broker = Broker(target_dir, overlap=True, plain_on_miss=True)
    spec = DraftSpec("g", "sd", address, PROMPTS[0], 2, same_vocab=True)
    p = len(prompt_ids)

    def step(n_ids, ids=None):
        ids = list(full[:n_ids]) if ids is None else ids
        return broker.submit("g", spec, ids, p, 2, len(full)).result(timeout=30)

    assert step(p + 1) == []  # nothing drafted yet: a plain step; the extension (3 ids) goes out
    took = full[p + 1] if guessed else (full[p + 1] + 1) % broker.info.tokenizer.vocab.size
    assert step(p + 2, full[:p + 1] + [took]) == []  # still out: another plain step
    assert drafter.calls == 1  # ... which did not ask the drafter again
    broker.loop.call_soon_threadsafe(drafter.gate.set)
    s = broker.sessions["g"]

    async def settle():
        await asyncio.shield(s.task)

    asyncio.run_coroutine_threadsafe(settle(), broker.loop).result(30)
    if guessed:  # its first id was the plain step's token: after the next one, what is left
        assert step(p + 3) == [full[p + 3]]  # verified as far as it goes
        assert broker.stats["stale"] == 0
    else:
        assert broker.stats["stale"] == 3  # none of it continues what was committed
        assert step(p + 3, full[:p + 1] + [took, full[p + 2]]) == []
    assert broker.stats["plain"] == 3 and broker.stats["ready"] == 0
    assert broker.stats["waited"] == 0 and broker.stats["failed"] == 0
    broker.retire(set())
