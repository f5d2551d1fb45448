"""Leases without Ray: ``serve/lease.py`` driven by a fake DeploymentHandle whose
``.options(stream=True).lease.remote(rid, caller)`` answers like Ray's response generator
(``__anext__`` gives the replica's address, ``cancel()`` ends the lease and frees the request's
caches there), fake data-plane ports and a fake channel pool.  Also the replica side of a lease
(``_ModelReplica.lease``): a request's caches are freed once, when its last lease there ends."""

from __future__ import annotations

import asyncio
from functools import partialmethod
from typing import Optional

import grpc
import pytest

from hsd_serve.serve.lease import (DrafterAvailability, Lease, LeaseClosed, LeasedDrafter,
                                   LeasedTarget, UnavailableDrafter, cancel_means_replica_died,
                                   is_transport_failure, open_lease, replica_gone)

RID = "req-1"
CALLER = object()  # stands for the coordinator's actor handle


# ------------------------------------------------------------------ fakes


class BackPressureError(Exception):
    """Named like Ray Serve's: the queue of every replica is full."""


class FakeReplica:
    """One replica behind the handle.  ``mode``: "ok" answers its address, "fail" raises
    ``error``, "hang" never answers, "end" ends the stream without an address, "cold" answers
    once ``up`` is set (a deployment scaled to zero, starting a replica)."""

    def __init__(self, address: str, mode: str = "ok", error: Optional[BaseException] = None):
        self.address = address
        self.mode = mode
        self.error = error
        self.calls: list[FakeLeaseCall] = []
        self.frees: list[str] = []  # a request's caches freed here (its lease ended)
        self.up = asyncio.Event()

    @property
    def active(self) -> int:
        return sum(c.open for c in self.calls)


class FakeLeaseCall:
    """What ``handle.options(stream=True).lease.remote(...)`` returns."""

    def __init__(self, replica: FakeReplica, rid: str, caller):
        self.replica, self.rid, self.caller = replica, rid, caller
        self.open = False
        self.cancels = 0
        self.asked = asyncio.Event()  # the coordinator waits for the address
        self.cancelled = asyncio.Event()

    async def __anext__(self) -> str:
        self.asked.set()
        mode = self.replica.mode
        if mode == "fail":
            raise self.replica.error
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "cold":
            await self.replica.up.wait()
        if mode == "end":
            raise StopAsyncIteration
        self.open = True
        return self.replica.address

    def cancel(self) -> None:
        self.cancels += 1
        self.cancelled.set()
        if self.open:
            self.open = False
            self.replica.frees.append(self.rid)


class FakeHandle:
    """A DeploymentHandle whose router picks ``replicas`` in order (the last one repeats)."""

    def __init__(self, *replicas: FakeReplica):
        self.replicas = list(replicas)
        self.options_seen: list[dict] = []
        self.calls: list[FakeLeaseCall] = []

    def options(self, **kwargs) -> "FakeHandle":
        self.options_seen.append(kwargs)
        return self

    @property
    def lease(self) -> "FakeHandle":
        return self

    def remote(self, rid: str, caller=None) -> FakeLeaseCall:
        replica = self.replicas[min(len(self.calls), len(self.replicas) - 1)]
        call = FakeLeaseCall(replica, rid, caller)
        replica.calls.append(call)
        self.calls.append(call)
        return call


class FakeChannels:
    def __init__(self):
        self.discarded: list[str] = []

    def get(self, address: str) -> str:
        return f"channel:{address}"

    async def discard(self, address: str) -> None:
        self.discarded.append(address)


HANG = object()


class FakePort:
    """A data-plane port; each call takes the next scripted outcome of its replica (an exception
    is raised, ``HANG`` never answers, anything else is returned)."""

    def __init__(self, channel: str, script: list):
        self.channel = channel
        self.script = script
        self.calls: list[tuple] = []
        self.started = asyncio.Event()

    async def _answer(self, name: str, *args, **kwargs):
        self.calls.append((name, args))
        self.started.set()
        out = self.script.pop(0) if self.script else f"{name}@{self.channel}"
        if out is HANG:
            await asyncio.Event().wait()
        if isinstance(out, BaseException):
            raise out
        return out

    verify = partialmethod(_answer, "verify")
    open = partialmethod(_answer, "open")
    draft = partialmethod(_answer, "draft")
    slrs_step = partialmethod(_answer, "slrs_step")
    free = partialmethod(_answer, "free")  # the Free RPC: leased ports must not send it


class Ports:
    """``make_port``: scripts per replica address (``a_1=[...]`` for "a:1"); keeps every port
    made."""

    def __init__(self, **scripts: list):
        self.scripts = {k.replace("_", ":"): v for k, v in scripts.items()}
        self.made: list[FakePort] = []

    def __call__(self, channel: str) -> FakePort:
        address = channel.removeprefix("channel:")
        port = FakePort(channel, self.scripts.get(address, []))
        self.made.append(port)
        return port


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "fake")


def target(handle, ports, *, channels=None, failover_s=5.0, lease_timeout_s=5.0):
    return LeasedTarget(handle, RID, ports, channels=channels or FakeChannels(),
                        lease_timeout_s=lease_timeout_s, failover_s=failover_s, caller=CALLER)


def drafter(handle, ports, *, channels=None, availability=None, lease_timeout_s=5.0):
    return LeasedDrafter(handle, RID, ports, channels=channels or FakeChannels(),
                         lease_timeout_s=lease_timeout_s, caller=CALLER,
                         availability=availability)


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------ target


def test_target_leases_once_and_close_ends_the_lease_once():
    async def main():
        a = FakeReplica("a:1")
        handle, ports = FakeHandle(a), Ports(a_1=["verdict"])
        t = target(handle, ports)
        await t.start()
        assert handle.options_seen == [{"stream": True}]
        [call] = handle.calls
        assert (call.rid, call.caller) == (RID, CALLER)
        assert t.addresses == ["a:1"] and ports.made[0].channel == "channel:a:1"
        assert await t.verify(RID, [1, 2], [3], "exact", None, 0) == "verdict"
        assert ports.made[0].calls == [("verify", (RID, [1, 2], [3], "exact", None, 0))]
        assert a.active == 1 and a.frees == []
        t.close()
        t.close()
        assert call.cancels == 1 and a.frees == [RID] and a.active == 0
        assert len(handle.calls) == 1

    run(main())


def test_target_free_ends_the_lease_instead_of_a_free_call():
    async def main():
        a = FakeReplica("a:1")
        handle, ports = FakeHandle(a), Ports()
        t = target(handle, ports)
        await t.start()
        await t.verify(RID, [1], [], "exact", None, 0)
        await t.free(RID)
        assert a.frees == [RID] and a.active == 0
        assert [name for name, _ in ports.made[0].calls] == ["verify"]  # no Free RPC
        t.close()  # the request's finally: nothing left to do
        assert handle.calls[0].cancels == 1 and a.frees == [RID]

    run(main())


def test_free_of_another_request_is_refused_and_keeps_the_lease():
    async def main():
        a = FakeReplica("a:1")
        t = target(FakeHandle(a), Ports())
        await t.start()
        with pytest.raises(ValueError):
            await t.free("someone-else")
        assert a.active == 1
        t.close()
        assert a.frees == [RID]

    run(main())


@pytest.mark.parametrize("error, discard", [
    (ConnectionError("reset"), True),
    (rpc_error(grpc.StatusCode.UNAVAILABLE), True),
    (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), False),  # slow is not dead: keep the channel
    (asyncio.CancelledError(), True),  # grpc.aio: another request closed the shared channel
])
def test_target_fails_over_to_a_new_lease_and_answers_once(error, discard):
    async def main():
        a, b = FakeReplica("a:1"), FakeReplica("b:2")
        handle, ports, channels = FakeHandle(a, b), Ports(a_1=[error], b_2=["verdict-b"]), \
            FakeChannels()
        t = target(handle, ports, channels=channels)
        await t.start()
        assert await t.verify(RID, [1, 2], [3], "exact", None, 0) == "verdict-b"
        port_a, port_b = ports.made
        assert len(port_a.calls) == 1 and len(port_b.calls) == 1  # the round ran once on each
        assert port_b.calls[0] == ("verify", (RID, [1, 2], [3], "exact", None, 0))
        assert t.addresses == ["a:1", "b:2"] and t.failovers == 1
        assert a.frees == [RID] and b.active == 1  # the lost replica's lease ended
        assert channels.discarded == (["a:1"] if discard else [])
        t.close()
        assert b.frees == [RID] and [c.cancels for c in handle.calls] == [1, 1]

    run(main())


def test_target_error_of_the_request_itself_is_not_failed_over():
    async def main():
        a = FakeReplica("a:1")
        handle, ports = FakeHandle(a, FakeReplica("b:2")), Ports(a_1=[ValueError("bad rule")])
        t = target(handle, ports)
        await t.start()
        with pytest.raises(ValueError, match="bad rule"):
            await t.verify(RID, [1], [], "exact", None, 0)
        assert len(handle.calls) == 1 and a.active == 1 and t.failovers == 0
        t.close()

    run(main())


@pytest.mark.parametrize("replica, error", [
    (FakeReplica("a:1", "fail", BackPressureError("queue full")), BackPressureError),
    (FakeReplica("a:1", "hang"), asyncio.TimeoutError),  # no lease within lease_timeout_s
])
def test_target_start_under_overload_fails_at_once(replica, error):
    async def main():
        handle = FakeHandle(replica, FakeReplica("b:2"))
        t = target(handle, Ports(), lease_timeout_s=0.05)
        with pytest.raises(error):
            await t.start()
        [call] = handle.calls  # no second lease
        assert call.cancels == 1  # the lease call was cancelled, not left queued
        assert t.failovers == 0 and t.addresses == []

    run(main())


def test_target_start_retries_a_lease_whose_replica_died():
    async def main():
        a, b = FakeReplica("a:1", "end"), FakeReplica("b:2")
        handle = FakeHandle(a, b)
        t = target(handle, Ports())
        await t.start()
        assert t.addresses == ["b:2"] and t.failovers == 1
        assert handle.calls[0].cancels == 1 and b.active == 1
        t.close()

    run(main())


def test_target_fails_with_connection_error_when_no_replica_takes_over():
    async def main():
        a = FakeReplica("a:1")
        dead = FakeReplica("b:2", "fail", ConnectionError("refused"))
        handle = FakeHandle(a, dead)
        t = target(handle, Ports(a_1=[rpc_error(grpc.StatusCode.UNAVAILABLE)]), failover_s=0.0)
        await t.start()
        with pytest.raises(ConnectionError, match="none took over"):
            await t.verify(RID, [1], [], "exact", None, 0)
        assert a.frees == [RID] and t.lease is None
        assert len(handle.calls) == 1  # failover_s = 0: no time left to lease another
        t.close()
        assert handle.calls[0].cancels == 1

    run(main())


def test_target_request_cancelled_mid_call_does_not_fail_over():
    async def main():
        a = FakeReplica("a:1")
        handle, ports = FakeHandle(a, FakeReplica("b:2")), Ports(a_1=[HANG])
        t = target(handle, ports)
        await t.start()
        task = asyncio.ensure_future(t.verify(RID, [1], [], "exact", None, 0))
        await ports.made[0].started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(handle.calls) == 1 and t.failovers == 0 and a.active == 1
        t.close()  # the request's finally ends the lease
        assert a.frees == [RID]

    run(main())


def test_closed_target_leases_no_replica_again():
    async def main():
        a = FakeReplica("a:1")
        handle = FakeHandle(a)
        t = target(handle, Ports())
        await t.start()
        await t.free(RID)
        with pytest.raises(LeaseClosed):
            await t.verify(RID, [1], [], "exact", None, 0)
        assert len(handle.calls) == 1 and a.frees == [RID]

    run(main())


# ------------------------------------------------------------------ drafter


def test_drafter_leases_on_first_open_and_free_ends_the_lease():
    async def main():
        a = FakeReplica("a:1")
        handle, ports = FakeHandle(a), Ports(a_1=[None, "draft-1"])
        avail = DrafterAvailability()
        d = drafter(handle, ports, availability=avail)
        assert handle.calls == []  # nothing leased before the request opens its drafter
        await d.open(RID, "slem", "p", None, [1])
        assert await d.draft(RID, 4, 0) == "draft-1"
        [call] = handle.calls
        assert (call.rid, call.caller) == (RID, CALLER) and d.addresses == ["a:1"]
        await d.free(RID)
        assert [name for name, _ in ports.made[0].calls] == ["open", "draft"]  # no Free RPC
        d.close()
        d.close()
        assert call.cancels == 1 and a.frees == [RID] and not avail.unavailable

    run(main())


def test_drafter_lease_failure_marks_the_drafter_unavailable_for_the_next_requests():
    async def main():
        avail = DrafterAvailability()
        down = FakeReplica("a:1", "fail", BackPressureError("queue full"))
        d1 = drafter(FakeHandle(down), Ports(), availability=avail)
        with pytest.raises(BackPressureError):
            await d1.open(RID, "slem", "p", None, [1])
        assert avail.unavailable
        d1.close()

        # the next request does not wait for its first lease while the drafter is unavailable
        slow = FakeReplica("b:2", "hang")
        handle2 = FakeHandle(slow)
        d2 = drafter(handle2, Ports(), availability=avail)
        with pytest.raises(ConnectionError, match="no drafter replica leased yet"):
            await d2.open(RID, "slem", "p", None, [1])
        while not handle2.calls:  # the lease goes on in the background
            await asyncio.sleep(0)
        await handle2.calls[0].asked.wait()
        d2.close()  # cancels the lease still being asked for
        await asyncio.wait_for(handle2.calls[0].cancelled.wait(), 5)

        # a lease that succeeds clears the flag (the retry after it uses the replica)
        c = FakeReplica("c:3")
        d3 = drafter(FakeHandle(c), Ports(), availability=avail)
        with pytest.raises(ConnectionError, match="no drafter replica leased yet"):
            await d3.open(RID, "slem", "p", None, [1])
        await asyncio.wait_for(asyncio.shield(d3._connecting), 5)
        assert not avail.unavailable
        await d3.open(RID, "slem", "p", None, [1])
        assert d3.addresses == ["c:3"] and c.active == 1
        d3.close()
        assert c.frees == [RID]

    run(main())


def test_drafter_scaled_to_zero_serves_at_once_and_drafts_once_a_replica_is_up():
    """No drafter replica running: the first call waits ``first_wait_s`` only, then fails (the
    round goes target-only) while the lease goes on; the next request does not wait at all; once
    a replica is up, the retries of both requests draft on it."""
    async def main():
        cold = FakeReplica("a:1", "cold")
        handle, ports, avail = FakeHandle(cold), Ports(a_1=[None, "draft"]), \
            DrafterAvailability()
        d = LeasedDrafter(handle, RID, ports, channels=FakeChannels(), lease_timeout_s=30.0,
                          caller=CALLER, availability=avail, first_wait_s=0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionError, match="leasing goes on"):
            await d.open(RID, "slem", "p", None, [1])
        assert 0.04 <= loop.time() - t0 < 5 and avail.unavailable
        other = LeasedDrafter(handle, "req-2", ports, channels=FakeChannels(),
                              lease_timeout_s=30.0, caller=CALLER, availability=avail,
                              first_wait_s=10.0)
        t0 = loop.time()
        with pytest.raises(ConnectionError, match="no drafter replica leased yet"):
            await other.open("req-2", "slem", "p", None, [1])
        assert loop.time() - t0 < 1.0  # did not wait its 10 s
        with pytest.raises(ConnectionError):  # a retry before the replica is up: at once
            await d.draft(RID, 4, 0)
        for _ in range(100):  # the second lease starts in the background
            if len(handle.calls) == 2:
                break
            await asyncio.sleep(0)
        assert [c.rid for c in handle.calls] == [RID, "req-2"]  # one lease each, still asked
        cold.up.set()  # Serve started a replica
        await asyncio.wait_for(asyncio.shield(d._connecting), 5)
        assert not avail.unavailable
        await d.open(RID, "slem", "p", None, [1])
        assert await d.draft(RID, 4, 0) == "draft" and d.addresses == ["a:1"]
        assert cold.active == 2  # both requests hold their lease
        d.close()
        other.close()
        assert sorted(cold.frees) == [RID, "req-2"]

    run(main())


def test_ready_address_keeps_leasing_in_the_background_and_never_waits():
    """A vLLM-path request that started without a drafter asks between steps: None (at once)
    until a replica is leased, then its address; a closed port answers None and leases nothing."""
    async def main():
        cold = FakeReplica("a:1", "cold")
        handle = FakeHandle(cold)
        d = drafter(handle, Ports())
        assert d.ready_address() is None and d.ready_address() is None
        for _ in range(100):
            if handle.calls:
                break
            await asyncio.sleep(0)
        assert len(handle.calls) == 1  # one lease attempt, not one per question
        cold.up.set()
        await asyncio.wait_for(asyncio.shield(d._connecting), 5)
        assert d.ready_address() == "a:1" and cold.active == 1
        d.close()
        assert d.ready_address() is None and len(handle.calls) == 1 and cold.frees == [RID]

    run(main())


def test_drafter_transport_failure_drops_the_lease_and_the_retry_leases_again():
    async def main():
        a, b = FakeReplica("a:1"), FakeReplica("b:2")
        channels, avail = FakeChannels(), DrafterAvailability()
        handle = FakeHandle(a, b)
        ports = Ports(a_1=[None, rpc_error(grpc.StatusCode.UNAVAILABLE)])
        d = drafter(handle, ports, channels=channels, availability=avail)
        await d.open(RID, "slem", "p", None, [1])
        with pytest.raises(grpc.aio.AioRpcError):
            await d.draft(RID, 4, 0)
        assert a.frees == [RID] and channels.discarded == ["a:1"] and d.port is None
        assert not avail.unavailable  # the replica was leased: only it failed
        # the retry does not wait for the new lease; the one after uses it
        with pytest.raises(ConnectionError, match="no drafter replica leased yet"):
            await d.open(RID, "slem", "p", None, [1])
        await asyncio.wait_for(asyncio.shield(d._connecting), 5)
        await d.open(RID, "slem", "p", None, [1])
        assert d.addresses == ["a:1", "b:2"] and b.active == 1
        await d.free(RID)
        assert b.frees == [RID]

    run(main())


def test_drafter_error_of_the_request_itself_keeps_the_lease():
    async def main():
        a = FakeReplica("a:1")
        d = drafter(FakeHandle(a), Ports(a_1=[ValueError("slrs budget")]))
        with pytest.raises(ValueError, match="slrs budget"):
            await d.open(RID, "slrs", "p", None, [1])
        assert a.active == 1 and d.port is not None
        d.close()
        assert a.frees == [RID]

    run(main())


def test_drafter_close_cancels_a_lease_still_being_asked_for():
    async def main():
        slow = FakeReplica("a:1", "hang")
        handle, avail = FakeHandle(slow), DrafterAvailability()
        d = drafter(handle, Ports(), availability=avail)
        waiting = asyncio.ensure_future(d.open(RID, "slem", "p", None, [1]))
        while not handle.calls:
            await asyncio.sleep(0)
        await handle.calls[0].asked.wait()
        d.close()
        with pytest.raises(ConnectionError):
            await waiting
        await asyncio.wait_for(handle.calls[0].cancelled.wait(), 5)
        d.close()
        assert handle.calls[0].cancels == 1 and len(handle.calls) == 1
        assert not avail.unavailable  # the request ended; the drafter did not fail

    run(main())


def test_drafter_request_cancelled_while_waiting_keeps_leasing_until_close():
    async def main():
        slow = FakeReplica("a:1", "hang")
        handle = FakeHandle(slow)
        d = drafter(handle, Ports())
        waiting = asyncio.ensure_future(d.open(RID, "slem", "p", None, [1]))
        while not handle.calls:
            await asyncio.sleep(0)
        await handle.calls[0].asked.wait()
        waiting.cancel()  # the coordinator's draft timeout or the client going away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert handle.calls[0].cancels == 0  # the wait was cancelled, not the lease
        d.close()
        await asyncio.wait_for(handle.calls[0].cancelled.wait(), 5)
        assert handle.calls[0].cancels == 1

    run(main())


def test_unavailable_drafter_fails_every_call_and_frees_nothing():
    async def main():
        u = UnavailableDrafter("not leased")
        for call in (u.open(RID, "slem", "p", None, [1]), u.draft(RID, 4, 0),
                     u.slrs_step(RID, b"", None, 0)):
            with pytest.raises(ConnectionError, match="no drafter replica: not leased"):
                await call
        assert await u.free(RID) is None

    run(main())


# ------------------------------------------------------------------ pieces


def test_open_lease_and_close_are_idempotent():
    async def main():
        a = FakeReplica("a:1")
        handle = FakeHandle(a)
        lease = await open_lease(handle, RID, 1.0, CALLER)
        assert isinstance(lease, Lease) and lease.address == "a:1"
        lease.close()
        lease.close()
        assert handle.calls[0].cancels == 1 and a.frees == [RID]

    run(main())


def test_lease_close_survives_a_replica_that_is_gone():
    class Gone:
        def cancel(self):
            raise RuntimeError("actor died")

    lease = Lease(Gone(), "a:1")
    lease.close()
    assert lease.closed


def test_failure_classification():
    assert is_transport_failure(ConnectionError())
    assert is_transport_failure(asyncio.TimeoutError())
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        assert is_transport_failure(rpc_error(code))
    assert not is_transport_failure(rpc_error(grpc.StatusCode.INVALID_ARGUMENT))
    assert not is_transport_failure(ValueError("bad"))
    UsageError = type("UsageError", (Exception,), {})
    assert is_transport_failure(UsageError("Channel is closed"))

    assert replica_gone(ConnectionError()) and replica_gone(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert not replica_gone(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not replica_gone(asyncio.TimeoutError())


def test_cancel_nobody_asked_for_means_the_replica_died():
    async def channel_closed():
        with cancel_means_replica_died("call"):
            raise asyncio.CancelledError()

    async def cancelled():
        with cancel_means_replica_died("call"):
            await asyncio.Event().wait()

    async def main():
        with pytest.raises(ConnectionError, match="call cancelled under us"):
            await asyncio.ensure_future(channel_closed())
        task = asyncio.ensure_future(cancelled())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


# ------------------------------------------------------------------ the replica side


class FakeWorker:
    def __init__(self):
        self.freed: list[str] = []

    def free(self, rid):
        self.freed.append(rid)
        return True


def _replica():
    from hsd_serve.serve.dataplane import _WorkerServicer
    from hsd_serve.serve.deployments import _ModelReplica

    rep = _ModelReplica()
    assert (rep.leases_total, rep.active_leases, rep.caller_watchers) == (0, {}, {})
    assert rep.server is None and rep.worker is None
    rep.worker = FakeWorker()
    rep.servicer, rep.address = _WorkerServicer(rep.worker), "10.0.0.9:7"
    return rep


def test_replica_frees_a_request_once_when_its_last_lease_ends():
    async def main():
        rep = _replica()
        first, second = rep.lease(RID), rep.lease(RID)  # a re-lease overlapping the old one
        assert await first.__anext__() == "10.0.0.9:7"
        assert await second.__anext__() == "10.0.0.9:7"
        assert rep.active_leases == {RID: 2} and rep.leases_total == 2
        await first.aclose()
        assert rep.worker.freed == [] and rep.active_leases == {RID: 1}
        assert RID not in rep.servicer.ended  # still leased: its calls run
        await second.aclose()
        assert rep.worker.freed == [RID] and rep.active_leases == {}
        assert RID in rep.servicer.ended  # late calls for it are refused from now on
        third = rep.lease(RID)  # a later lease serves it again
        assert await third.__anext__() == "10.0.0.9:7"
        assert RID not in rep.servicer.ended
        await third.aclose()
        assert rep.worker.freed == [RID, RID]
        rep.servicer.close()

    run(main())


def test_replica_health_check_fails_before_its_server_runs():
    from hsd_serve.serve.deployments import _ModelReplica

    with pytest.raises(RuntimeError, match="not running"):
        run(_ModelReplica().check_health())
