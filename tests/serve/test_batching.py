"""Batched verification across requests changes nothing: each request's output is the same as
when it runs alone, whatever shares its batch (mixed prompt lengths, methods, sampling params)."""

from __future__ import annotations

import asyncio

import torch

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.protocol import EXACT, SPECULATIVE
from hsd_serve.engine.target import TargetWorker, VerifyCall
from hsd_serve.engine.types import GenerationRequest
from tests.serve.test_dataplane import key, served

PROMPTS = ["def fib(n):\n    if n < 2:\n        return n\n", "x", "import os\nimport sys\n" * 6,
           "The quick brown fox", "class A:\n    pass\n\n\nclass B(A):"]
MIXED = [("ar", 0.0, 0), ("slem", 0.0, 0), ("tli", 0.0, 0), ("tli", 0.9, 3), ("slem", 0.8, 5),
         ("ar", 1.0, 9), ("tli", 1.1, 4), ("slem", 0.0, 0)]


def requests():
    out = []
    for i, (method, temp, seed) in enumerate(MIXED):
        out.append(GenerationRequest(PROMPTS[i % len(PROMPTS)], max_new_tokens=10 + i % 3,
                                     method=method, lookahead=2 + i % 3,
                                     params=SamplingParams(temperature=temp, seed=seed,
                                                           top_p=0.95 if temp else 1.0)))
    return out


def test_verify_batch_equals_verify_alone(loaded_model, families):
    target = loaded_model(families[1])
    tok = target.tokenizer
    g = torch.Generator().manual_seed(0)
    calls = []
    for i, prompt in enumerate(PROMPTS * 2):
        ids = tok.encode_prompt(prompt)
        cands = torch.randint(0, target.vocab.size, (i % 4,), generator=g).tolist()
        params = SamplingParams(temperature=[0.0, 0.7, 1.3][i % 3], seed=i)
        if i % 2:
            q = torch.softmax(torch.randn(len(cands), target.vocab.size, generator=g), -1)
            for j, t in enumerate(cands):
                q[j, t] += 0.5
            q = q / q.sum(-1, keepdim=True)
            calls.append(VerifyCall(f"r{i}", ids, cands, SPECULATIVE, params, 3, q))
        else:
            calls.append(VerifyCall(f"r{i}", ids, cands, EXACT, params, 3))
    alone = [TargetWorker(target).verify_batch([c])[0] for c in calls]
    worker = TargetWorker(target)
    together = worker.verify_batch(calls)
    assert all(v.batch_size == len(calls) for v in together)
    assert [(v.accepted, v.tokens) for v in together] == [(v.accepted, v.tokens) for v in alone]
    # the caches left behind are each request's own: a second round agrees as well
    nxt = [VerifyCall(c.rid, c.committed + a.tokens, [], EXACT, c.params, 9) for c, a in
           zip(calls, alone)]
    again = worker.verify_batch(nxt[::-1])[::-1]
    assert [v.tokens for v in again] == [TargetWorker(target).verify_batch([c])[0].tokens
                                         for c in nxt]


def test_bad_call_in_a_batch_fails_alone(loaded_model, families):
    target = loaded_model(families[1])
    ids = target.tokenizer.encode_prompt("hello")
    good = VerifyCall("a", ids, [], EXACT, SamplingParams(), 0)
    bad = VerifyCall("b", ids, [1, 2], SPECULATIVE, SamplingParams(), 0)  # no proposals
    out = TargetWorker(target).verify_batch([good, bad, good])
    assert isinstance(out[1], ValueError)
    assert out[0].tokens == TargetWorker(target).verify_batch([good])[0].tokens
    assert out[2].tokens == out[0].tokens


def test_concurrent_requests_batch_and_stay_exact(loaded_model, families):
    target, drafter = loaded_model(families[1]), loaded_model(families[0], seed=1)

    async def main():
        async with served(target, drafter) as srv:
            alone = [await srv.run(r) for r in requests()]
            servicers = [srv.target_server.hsd_servicer, srv.drafter_server.hsd_servicer]
            before = [(s.batches, s.batched_calls) for s in servicers]
            together = await asyncio.gather(*(srv.run(r) for r in requests()))
            after = [(s.batches, s.batched_calls) for s in servicers]
            return alone, together, before, after

    alone, together, before, after = asyncio.run(asyncio.wait_for(main(), 300))
    assert [key(r)[:3] for r in together] == [key(r)[:3] for r in alone]
    for name, (b0, c0), (b1, c1) in zip(("target", "drafter"), before, after):
        assert c1 - c0 > b1 - b0, f"no two {name} calls ever shared a forward pass"
