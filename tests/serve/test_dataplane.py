"""The gRPC data plane changes nothing: a coordinator talking to drafter/target replicas over real
grpc.aio servers (loopback, tiny real models) emits exactly what the in-process engine emits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.drafter import DrafterWorker
from hsd_serve.engine.engine import Coordinator, TargetInfo
from hsd_serve.engine.local import Engine
from hsd_serve.engine.protocol import EXACT, Draft, SessionMissing, Verdict
from hsd_serve.engine.target import TargetWorker
from hsd_serve.engine.types import GenerationRequest, RequestError
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.pb import hsd_pb2_grpc as pb_grpc
from hsd_serve.serve.dataplane import (DRAFTER_SERVICE, TARGET_SERVICE, ChannelPool, GrpcDrafter,
                                       GrpcTarget, RequestEnded, start_dataplane_server,
                                       stop_dataplane_server)

PROMPT = "def fib(n):\n    if n < 2:\n        return n\n"
STORY = "Once upon a time, there was a"
SAMPLED = dict(temperature=0.9, top_p=0.95)


@dataclass
class Served:
    coordinator: Coordinator
    pool: ChannelPool
    target_addr: str
    drafter_addr: str
    width: int
    drafter_server: grpc.aio.Server
    target_server: grpc.aio.Server

    def ports(self):
        return (GrpcTarget(self.target_addr, pool=self.pool),
                GrpcDrafter(self.drafter_addr, target_vocab_size=self.width, pool=self.pool))

    async def run(self, req: GenerationRequest, drafter=None):
        target, default_drafter = self.ports()
        result = None
        async for chunk in self.coordinator.stream(req, target=target,
                                                   drafter=drafter or default_drafter):
            result = chunk.result
        return result


@contextlib.asynccontextmanager
async def served(target_model, drafter_model, security=None, **drafter_kw):
    """Drafter and target workers behind their own grpc.aio servers, and a coordinator built
    like ``engine.local.Engine`` builds one, but over gRPC ports (``security``: the data plane's
    token and TLS, on both ends)."""
    tw = TargetWorker(target_model)
    dw = DrafterWorker(drafter_model, target_model.vocab, **drafter_kw)
    tserver, tport = await start_dataplane_server("target", tw, host="127.0.0.1",
                                                  security=security)
    dserver, dport = await start_dataplane_server("drafter", dw, host="127.0.0.1",
                                                  security=security)
    pool = ChannelPool(security=security)
    width = target_model.vocab.size
    t_addr, d_addr = f"127.0.0.1:{tport}", f"127.0.0.1:{dport}"
    coord = Coordinator(GrpcTarget(t_addr, pool=pool),
                        TargetInfo(target_model.tokenizer, target_model.eos_ids,
                                   target_model.max_context),
                        GrpcDrafter(d_addr, target_vocab_size=width, pool=pool),
                        same_vocab=dw.same_vocab)
    try:
        yield Served(coord, pool, t_addr, d_addr, width, dserver, tserver)
    finally:
        await pool.close()
        await stop_dataplane_server(dserver, grace=None)
        await stop_dataplane_server(tserver, grace=None)


def key(res):
    s = res.stats
    return (res.token_ids, res.text, res.finish_reason, s.rounds, s.drafted, s.accepted,
            s.emitted)


class Forgetful:
    """A drafter port whose replica loses the request's session before every other round."""

    def __init__(self, port, servicer):
        self.port, self.servicer = port, servicer
        self.rounds = self.opens = self.forgot = 0

    async def _maybe_forget(self, rid):
        self.rounds += 1
        if self.rounds % 2 == 0:
            self.forgot += int(await self.servicer.run(self.servicer.worker.free, rid))

    async def open(self, *args):
        self.opens += 1
        await self.port.open(*args)

    async def draft(self, rid, *args, **kwargs):
        await self._maybe_forget(rid)
        return await self.port.draft(rid, *args, **kwargs)

    async def slrs_step(self, rid, *args):
        await self._maybe_forget(rid)
        return await self.port.slrs_step(rid, *args)

    async def free(self, rid):
        await self.port.free(rid)


def spy_proposals(srv):
    """Record the proposal rows the drafter worker produced and those the target worker got."""
    sent, received = [], []
    dw = srv.drafter_server.hsd_servicer.worker
    tw = srv.target_server.hsd_servicer.worker
    draft_batch, verify_batch = dw.draft_batch, tw.verify_batch

    def spy_draft_batch(calls):
        out = draft_batch(calls)
        sent.extend(d.proposals.clone() for d in out if getattr(d, "proposals", None) is not None)
        return out

    def spy_verify_batch(calls):
        for c in calls:
            if c.proposals is not None:
                received.append(c.proposals.clone())
        return verify_batch(calls)

    dw.draft_batch, tw.verify_batch = spy_draft_batch, spy_verify_batch
    return sent, received


def spy_rows(srv):
    """Record the target rows the target worker returned and those the drafter worker got."""
    sent, received = [], []
    dw = srv.drafter_server.hsd_servicer.worker
    tw = srv.target_server.hsd_servicer.worker
    verify_batch, step = tw.verify_batch, dw.slrs_step

    def spy_verify_batch(calls):
        out = verify_batch(calls)
        sent.extend(v.row.clone() for v in out if getattr(v, "row", None) is not None)
        return out

    def spy_step(rid, generated, row, position):
        received.append(row.clone())
        return step(rid, generated, row, position)

    tw.verify_batch, dw.slrs_step = spy_verify_batch, spy_step
    return sent, received


@pytest.fixture(scope="module")
def hetero(loaded_model, families):
    return loaded_model(families[1]), loaded_model(families[0], seed=1)


def test_heterogeneous_pair_matches_in_process(hetero):
    target, drafter = hetero
    engine = Engine(target, drafter)
    greedy = [GenerationRequest(PROMPT, max_new_tokens=14, method=m, lookahead=3)
              for m in ("ar", "slem", "tli")]
    sampled = [GenerationRequest(PROMPT, max_new_tokens=10, method=m, lookahead=3,
                                 params=SamplingParams(seed=seed, **SAMPLED))
               for m in ("ar", "tli", "slem") for seed in (1, 2)]

    async def main():
        want = [await engine.coordinator.generate(r) for r in greedy + sampled]
        async with served(target, drafter) as srv:
            sent, received = spy_proposals(srv)
            got = [await srv.run(r) for r in greedy + sampled]
            assert len(sent) == len(received) > 0
            for a, b in zip(sent, received):  # the verifier got exactly the sampled-from rows
                assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
                assert torch.equal(a.view(torch.int32), b.view(torch.int32))
            assert any(int((row > 0).sum()) > 1 for a in sent for row in a)  # not only one-hot
            # concurrent requests share the replicas (calls serialise on the worker thread)
            together = await asyncio.gather(*(srv.run(r) for r in greedy))
            d_sessions = srv.drafter_server.hsd_servicer.worker.sessions
            t_sessions = srv.target_server.hsd_servicer.worker.sessions
            assert not d_sessions and not t_sessions  # every request freed its caches
        return want, got, together

    want, got, together = asyncio.run(main())
    assert [key(r) for r in got] == [key(r) for r in want]
    assert [key(r) for r in together] == [key(r) for r in want[:len(greedy)]]
    ar, slem, tli = got[:3]
    assert slem.token_ids == ar.token_ids == tli.token_ids
    assert slem.stats.drafted > 0 and tli.stats.drafted > 0
    assert got[3].token_ids == got[7].token_ids  # sampled SLEM = sampled AR, same seed
    assert any(r.stats.drafted > r.stats.accepted for r in got[5:7])  # sampled TLI rejected some


def test_identical_drafter_sd_and_slem(loaded_model, families):
    model = loaded_model(families[0])
    engine = Engine(model, model)
    reqs = [GenerationRequest(PROMPT, max_new_tokens=16, method=m, lookahead=4)
            for m in ("ar", "sd", "slem")]
    reqs.append(GenerationRequest(PROMPT, max_new_tokens=10, method="sd", lookahead=4,
                                  params=SamplingParams(seed=3, **SAMPLED)))

    async def main():
        want = [await engine.coordinator.generate(r) for r in reqs]
        async with served(model, model) as srv:
            return want, [await srv.run(r) for r in reqs]

    want, got = asyncio.run(main())
    assert [key(r) for r in got] == [key(r) for r in want]
    for res in got[1:3]:
        assert res.token_ids == got[0].token_ids
        assert res.stats.drafted > 0 and res.stats.accepted == res.stats.drafted


def test_drafter_losing_sessions_reopens_and_stays_exact(hetero):
    target, drafter = hetero
    reqs = [GenerationRequest(PROMPT, max_new_tokens=14, method=m, lookahead=3)
            for m in ("ar", "slem", "tli")]

    async def main():
        async with served(target, drafter) as srv:
            ar = await srv.run(reqs[0])
            out = []
            for req in reqs[1:]:
                _, port = srv.ports()
                forgetful = Forgetful(port, srv.drafter_server.hsd_servicer)
                out.append((await srv.run(req, drafter=forgetful), forgetful))
            return ar, out

    ar, out = asyncio.run(main())
    for res, forgetful in out:
        assert res.token_ids == ar.token_ids and res.text == ar.text
        assert forgetful.forgot >= 2 and forgetful.opens == forgetful.forgot + 1
        assert res.stats.fallback_rounds < res.stats.rounds  # drafting went on after re-opens


def test_slrs_over_grpc_matches_in_process(stories_model, byte_drafter_model):
    from hsd_serve.core.slrs import SLRSBudgetError

    engine = Engine(stories_model, byte_drafter_model)
    try:
        engine.drafter_worker.slrs()
    except SLRSBudgetError as exc:
        pytest.skip(f"SLRS not constructible for this pair: {exc}")
    reqs = [GenerationRequest(STORY, max_new_tokens=6, method="slrs",
                              params=SamplingParams(seed=seed, temperature=1.3, top_p=0.98))
            for seed in (0, 1)]
    reqs.append(GenerationRequest(STORY, max_new_tokens=6, method="slrs"))

    async def main():
        want = [await engine.coordinator.generate(r) for r in reqs]
        async with served(stories_model, byte_drafter_model) as srv:
            sent, received = spy_rows(srv)
            got = [await srv.run(r) for r in reqs]
            assert len(sent) == len(received) > 0
            for a, b in zip(sent, received):
                assert a.dtype == b.dtype == torch.float32
                assert torch.equal(a.view(torch.int32), b.view(torch.int32))
            _, port = srv.ports()
            forgetful = Forgetful(port, srv.drafter_server.hsd_servicer)
            forgot = await srv.run(reqs[0], drafter=forgetful)
            return want, got, forgot, forgetful

    want, got, forgot, forgetful = asyncio.run(main())
    assert [key(r) for r in got] == [key(r) for r in want]
    assert sum(r.stats.drafted for r in got) > 0
    assert forgot.token_ids == want[0].token_ids and forgetful.forgot >= 1


def test_status_mapping_health_and_reflection(hetero):
    target, drafter = hetero

    async def main():
        async with served(target, drafter) as srv:
            t_port, d_port = srv.ports()
            with pytest.raises(SessionMissing):
                await d_port.draft("nobody", 2, 0, generated=b"")
            with pytest.raises(SessionMissing):
                await d_port.slrs_step("nobody", b"", torch.zeros(4), 0)
            with pytest.raises(ValueError):  # INVALID_ARGUMENT: AR needs no drafter
                await d_port.open("r1", "ar", "hi", SamplingParams(), [1])
            with pytest.raises(ValueError):  # a rule with no wire value: refused before sending
                await t_port.verify("r1", [1, 2], [], "nope", SamplingParams(), 0)
            with pytest.raises(grpc.aio.AioRpcError) as info:  # INTERNAL: id out of range
                await t_port.verify("r2", [10**9], [], EXACT, SamplingParams(), 0)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            ok = await t_port.verify("r3", [1, 2], [], EXACT, SamplingParams(), 0)
            assert len(ok.tokens) == 1 and t_port.calls == 1 and t_port.transport_s > 0
            await t_port.free("r3")
            with pytest.raises(ValueError):  # INVALID_ARGUMENT: sd needs one shared vocabulary
                await d_port.open("r4", "sd", "hi", SamplingParams(), [1])
            with pytest.raises(RequestError):  # ... which the coordinator refuses up front
                await srv.run(GenerationRequest(PROMPT, method="sd"))

            for addr, name in ((srv.target_addr, TARGET_SERVICE),
                               (srv.drafter_addr, DRAFTER_SERVICE)):
                ch = srv.pool.get(addr)
                health = health_pb2_grpc.HealthStub(ch)
                for service in ("", name):
                    resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    assert resp.status == health_pb2.HealthCheckResponse.SERVING
                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                call = refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                names = [s.name async for r in call for s in r.list_services_response.service]
                assert name in names and "grpc.health.v1.Health" in names

    asyncio.run(main())


def test_verdicts_report_their_batch_over_grpc(hetero):
    """Each verdict carries the number of requests verified in its forward pass across the wire
    (the coordinator's load-aware lookahead reads it): calls queued behind a busy worker thread
    are batched, and every verdict's batch_size is the size of the batch it was in."""
    target, drafter = hetero

    async def main():
        async with served(target, drafter) as srv:
            t_port, _ = srv.ports()
            servicer = srv.target_server.hsd_servicer
            batches = {}
            verify_batch = servicer.worker.verify_batch

            def spy(calls):
                batches.update((c.rid, len(calls)) for c in calls)
                return verify_batch(calls)

            servicer.worker.verify_batch = spy
            arrived = []
            batched = servicer._batched

            async def count(context, call):
                arrived.append(call.rid)
                return await batched(context, call)

            servicer._batched = count
            gate = threading.Event()
            busy = asyncio.ensure_future(servicer.run(gate.wait, 30))
            rids = [f"b{i}" for i in range(4)]
            tasks = [asyncio.ensure_future(t_port.verify(rid, [1, 2, 3 + i], [], EXACT,
                                                         SamplingParams(), 0))
                     for i, rid in enumerate(rids)]
            try:
                for _ in range(1000):  # until every call waits on the replica behind the gate
                    if len(arrived) == len(rids):
                        break
                    await asyncio.sleep(0.01)
                assert len(arrived) == len(rids)
            finally:
                gate.set()
            await busy
            verdicts = await asyncio.gather(*tasks)
            alone = await t_port.verify("b9", [1, 2], [], EXACT, SamplingParams(), 0)
            for rid in (*rids, "b9"):
                await t_port.free(rid)
            return verdicts, alone, batches, rids

    verdicts, alone, batches, rids = asyncio.run(main())
    assert [v.batch_size for v in verdicts] == [batches[r] for r in rids]
    assert max(v.batch_size for v in verdicts) >= 2
    assert alone.batch_size == 1


def test_calls_that_arrive_after_their_lease_ended_are_refused_and_leave_nothing(hetero):
    """A replica frees a request's caches when its lease ends; a call for it that reaches the
    worker after that (sent before the coordinator was cancelled, queued behind the free) is
    refused with FAILED_PRECONDITION and creates no session that nobody would free.  A new lease
    for the same request (a re-lease) serves it again."""
    target, drafter = hetero
    sampling = SamplingParams()

    async def main():
        async with served(target, drafter) as srv:
            t_port, d_port = srv.ports()
            t_srv = srv.target_server.hsd_servicer
            d_srv = srv.drafter_server.hsd_servicer
            prompt_ids = target.tokenizer.encode_prompt(PROMPT)
            for servicer in (t_srv, d_srv):
                servicer.begin("r")
            await d_port.open("r", "slem", PROMPT, sampling, prompt_ids)
            await d_port.draft("r", 2, 0, generated=b"")
            await t_port.verify("r", prompt_ids, [], EXACT, sampling, 0)
            assert "r" in t_srv.worker.sessions and "r" in d_srv.worker.sessions
            for servicer in (t_srv, d_srv):
                await servicer.end("r")
            assert "r" not in t_srv.worker.sessions and "r" not in d_srv.worker.sessions
            late = [t_port.verify("r", prompt_ids, [], EXACT, sampling, 0),
                    d_port.open("r", "slem", PROMPT, sampling, prompt_ids),
                    d_port.draft("r", 2, 0, generated=b"")]
            for call in late:
                with pytest.raises(RequestEnded, match="lease") as info:
                    await call
                assert info.value.__cause__.code() == grpc.StatusCode.FAILED_PRECONDITION
            refused = (t_srv.refused_late, d_srv.refused_late)
            left = (dict(t_srv.worker.sessions), dict(d_srv.worker.sessions))
            # other requests are not affected; a re-lease of "r" is served again
            other = await t_port.verify("s", prompt_ids, [], EXACT, sampling, 0)
            t_srv.begin("r")
            again = await t_port.verify("r", prompt_ids, [], EXACT, sampling, 0)
            for rid in ("r", "s"):
                await t_port.free(rid)
            return refused, left, other, again

    refused, left, other, again = asyncio.run(main())
    assert refused == (1, 2)
    assert left == ({}, {})
    assert len(other.tokens) == 1 and again.tokens == other.tokens


class RecordingWorker:
    """A drafter and target worker that records what reaches it (no model)."""

    model = SimpleNamespace(vocab=SimpleNamespace(size=8))

    def __init__(self):
        self.calls = []

    def open(self, **kwargs):
        self.calls.append(("open", kwargs))

    def draft_batch(self, calls):
        self.calls.extend(("draft", c) for c in calls)
        return [Draft() for _ in calls]

    def verify_batch(self, calls):
        self.calls.extend(("verify", c) for c in calls)
        return [Verdict() for _ in calls]

    def free(self, rid):
        return False


def test_unspecified_or_unknown_enums_are_invalid_argument():
    """A data-plane request whose enum is UNSPECIFIED or unknown to this release (or a draft
    without its context) is refused with INVALID_ARGUMENT before it reaches the worker; valid
    values reach it as the engine's strings."""

    async def main():
        worker = RecordingWorker()
        tserver, tport = await start_dataplane_server("target", worker, host="127.0.0.1")
        dserver, dport = await start_dataplane_server("drafter", worker, host="127.0.0.1")
        sampling = pb.SamplingParams(seed=0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{tport}") as tch, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{dport}") as dch:
                target, drafter = pb_grpc.TargetStub(tch), pb_grpc.DrafterStub(dch)
                bad = [(target.Verify, pb.VerifyRequest(request_id="r", committed=[1], rule=r,
                                                        sampling=sampling), "rule")
                       for r in (pb.RULE_UNSPECIFIED, 99)]
                bad += [(drafter.Open, pb.OpenRequest(request_id="r", method=m, prompt="hi",
                                                      sampling=sampling, prompt_ids=[1]),
                         "method") for m in (pb.METHOD_UNSPECIFIED, pb.METHOD_AUTO, 99)]
                bad.append((drafter.Draft, pb.DraftRequest(request_id="r", k=2), "generated"))
                for call, request, what in bad:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(request, timeout=30)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
                    assert what in info.value.details()
                assert worker.calls == []
                await target.Verify(pb.VerifyRequest(request_id="r", committed=[1],
                                                     rule=pb.RULE_ROW, sampling=sampling))
                await drafter.Open(pb.OpenRequest(request_id="r", method=pb.METHOD_TLI,
                                                  prompt="hi", sampling=sampling,
                                                  prompt_ids=[1]))
                await drafter.Draft(pb.DraftRequest(request_id="r", k=2,
                                                    committed=pb.TokenIds(ids=[1, 2])))
        finally:
            await stop_dataplane_server(dserver, grace=None)
            await stop_dataplane_server(tserver, grace=None)
        return worker.calls

    calls = asyncio.run(main())
    assert [kind for kind, _ in calls] == ["verify", "open", "draft"]
    assert calls[0][1].rule == "row" and calls[1][1]["method"] == "tli"
    assert (calls[2][1].committed, calls[2][1].generated) == ([1, 2], None)
