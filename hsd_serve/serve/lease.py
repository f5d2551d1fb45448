"""Leases: how the coordinator holds one drafter and one target replica for one request.

A lease is a streaming call on a replica's DeploymentHandle (``handle.options(stream=True)
).lease.remote(rid, caller)``): its first item is the replica's gRPC address, and it stays open
until the request ends, so Ray Serve routes, balances, counts the request for autoscaling and
applies backpressure.  Ending the lease (cancelling the call) frees the request's caches on the
replica — that is the request's one free: a leased port's ``free(rid)`` ends its lease instead of
sending a ``Free`` call, and the later ``close()`` is then a no-op.

The ports here are built from explicit parts (a handle, the request id, a port factory, a channel
pool, timeouts, the caller handle replicas watch, a shared ``DrafterAvailability``), so they run
and are tested without a deployment or a Ray cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Optional, Protocol

import grpc

log = logging.getLogger("hsd_serve.serve")


class Channels(Protocol):
    """What a leased port needs of a channel pool (``dataplane.ChannelPool``)."""

    def get(self, address: str) -> Any: ...

    async def discard(self, address: str) -> None: ...


class LeaseClosed(ConnectionError):
    """The port's request is over (its lease was closed): it leases no replica again."""


class Lease:
    """An open lease on one replica (closing it frees the request's caches there)."""

    def __init__(self, gen, address: str):
        self.gen = gen
        self.address = address
        self.closed = False

    def close(self) -> None:
        """End the lease (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.gen.cancel()
        except Exception:  # noqa: BLE001 - the replica may already be gone
            pass


async def open_lease(handle, rid: str, timeout_s: float, caller=None) -> Lease:
    """Lease one replica behind ``handle`` for ``rid``; waits ``timeout_s`` for its address."""
    gen = handle.options(stream=True).lease.remote(rid, caller)
    try:
        address = await asyncio.wait_for(gen.__anext__(), timeout_s)
    except BaseException:
        gen.cancel()
        raise
    return Lease(gen, address)


class DrafterAvailability:
    """Shared by one coordinator's requests: ``unavailable`` while its last drafter lease attempt
    failed (new requests then do not wait for their first drafter lease)."""

    def __init__(self) -> None:
        self.unavailable = False


class UnavailableDrafter:
    """Drafter port for a request whose drafter lease failed: every round falls back."""

    def __init__(self, reason: str):
        self.reason = reason

    async def _fail(self, *args, **kwargs):
        raise ConnectionError(f"no drafter replica: {self.reason}")

    open = draft = slrs_step = address = _fail

    async def free(self, rid):
        return None


def is_transport_failure(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if type(exc).__name__ == "UsageError" and "closed" in str(exc):
        return True  # another request closed the pooled channel to a replica that died
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


def cancelled_by_others() -> bool:
    """Inside ``except CancelledError``: nobody cancelled this task.  grpc.aio raises
    CancelledError for calls in flight on a channel that another request closed (its replica
    died), and a lease call can end cancelled when its replica dies: a transport failure, not
    the request's own cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


@contextlib.contextmanager
def cancel_means_replica_died(what: str):
    """Re-raise a ``CancelledError`` that nobody asked for (see ``cancelled_by_others``) as a
    ``ConnectionError``, so the caller fails over instead of ending the request."""
    try:
        yield
    except asyncio.CancelledError:
        if not cancelled_by_others():
            raise
        raise ConnectionError(f"{what} cancelled under us (its channel was closed or its lease "
                              "ended: the replica died)") from None


def replica_gone(exc: BaseException) -> bool:
    """The replica's address is dead (not merely slow): its pooled channel should go too.  A
    deadline is no such sign; closing the shared channel would fail other requests' calls."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return isinstance(exc, ConnectionError)


class LeasedPort:
    """A port bound to a lease; after a transport failure it leases another replica.

    ``handle``: the replicas' DeploymentHandle; ``rid``: the request; ``make_port(channel)``: the
    data-plane port on a pooled channel to the leased replica; ``channels``: that pool;
    ``lease_timeout_s``: how long to wait for a lease; ``caller``: the coordinator's own actor
    handle, which replicas watch to end the leases of a coordinator that died (None: not an
    actor)."""

    def __init__(self, handle, rid: str, make_port: Callable[[Any], Any], *,
                 channels: Channels, lease_timeout_s: float, caller=None):
        self.handle, self.rid, self.make_port = handle, rid, make_port
        self.channels, self.lease_timeout_s, self.caller = channels, lease_timeout_s, caller
        self.lease: Optional[Lease] = None
        self.port = None
        self.closed = False
        self.failovers = 0
        self.addresses: list[str] = []  # every replica this request leased, in order

    async def connect(self, timeout_s: Optional[float] = None) -> None:
        if self.closed:
            raise LeaseClosed(f"request {self.rid} is over: no new lease")
        lease = await open_lease(self.handle, self.rid, timeout_s or self.lease_timeout_s,
                                 self.caller)
        if self.closed:  # closed while the lease was being opened
            lease.close()
            raise LeaseClosed(f"request {self.rid} is over: no new lease")
        self.lease = lease
        self.addresses.append(lease.address)
        self.port = self.make_port(self.channels.get(lease.address))

    async def drop(self, discard_channel: bool = True) -> None:
        if self.lease is not None:
            self.lease.close()
            if discard_channel:
                await self.channels.discard(self.lease.address)
        self.lease, self.port = None, None

    def close(self) -> None:
        """End the request's lease (its replica frees the request's caches); idempotent.  A
        closed port leases no replica again."""
        self.closed = True
        if self.lease is not None:
            self.lease.close()
        self.lease, self.port = None, None

    async def free(self, rid: str) -> None:
        """The request is over: end its lease, which frees its caches on the replica (no
        ``Free`` call; the later ``close()`` is a no-op)."""
        if rid != self.rid:
            raise ValueError(f"port of request {self.rid} asked to free {rid}")
        self.close()


class LeasedTarget(LeasedPort):
    """TargetPort that survives the loss of its replica: every call carries the committed tokens,
    so the request resumes on a newly leased replica (a prefill there, never a repeated or missing
    token).  If no replica takes the round within ``failover_s`` of the first failure (lease
    waits included), the request fails with ConnectionError (gRPC UNAVAILABLE, HTTP 503)."""

    def __init__(self, handle, rid: str, make_port: Callable[[Any], Any], *,
                 channels: Channels, lease_timeout_s: float, failover_s: float, caller=None):
        super().__init__(handle, rid, make_port, channels=channels,
                         lease_timeout_s=lease_timeout_s, caller=caller)
        self.failover_s = failover_s

    async def start(self) -> None:
        """Lease the request's first replica.  Overload fails at once (Serve's backpressure →
        RESOURCE_EXHAUSTED / 503; no lease within ``lease_timeout_s`` → UNAVAILABLE / 503); a
        lease that failed because its replica just died is retried like a failover."""
        await self._with_failover(None)

    async def verify(self, *args, **kwargs):
        return await self._with_failover(lambda: self.port.verify(*args, **kwargs))

    async def generate(self, *args, **kwargs):
        """A whole request's steps on the leased (vLLM) replica.  A replica lost mid-stream
        raises ConnectionError once another is leasable; the caller resumes from what it
        committed (``RequestRun.follow``)."""
        await self._with_failover(None)
        try:
            with cancel_means_replica_died("target stream"):
                async for step in self.port.generate(*args, **kwargs):
                    yield step
        except Exception as exc:  # noqa: BLE001 - classified below
            if self.closed or not is_transport_failure(exc):
                raise
            await self.drop(replica_gone(exc))
            self.failovers += 1
            raise ConnectionError(f"target replica lost mid-stream: {type(exc).__name__}: "
                                  f"{exc}") from exc

    async def _with_failover(self, call):
        loop = asyncio.get_running_loop()
        limit = self.failover_s
        deadline = None  # set at the first failure
        while True:
            try:
                if self.port is None:
                    timeout = self.lease_timeout_s
                    if deadline is not None:
                        timeout = max(0.05, min(timeout, deadline - loop.time()))
                    with cancel_means_replica_died("target lease"):
                        await self.connect(timeout)
                with cancel_means_replica_died("target call"):
                    out = None if call is None else await call()
                if deadline is not None:
                    log.warning("request %s: resumed on target %s after %.2fs", self.rid,
                                self.addresses[-1], loop.time() - (deadline - limit))
                return out
            except Exception as exc:  # noqa: BLE001 - classified below
                if self.closed:
                    raise  # the request is over: no failover
                if self.port is not None and not is_transport_failure(exc):
                    raise  # the replica answered: this request's own error
                if call is None and deadline is None and (
                        "BackPressure" in type(exc).__name__
                        or isinstance(exc, (TimeoutError, asyncio.TimeoutError))):
                    raise  # overloaded: tell the client now
                await self.drop(replica_gone(exc))
                self.failovers += 1
                now = loop.time()
                deadline = now + limit if deadline is None else deadline
                if now >= deadline:
                    raise ConnectionError(f"target replica lost and none took over within "
                                          f"{limit:g}s: {type(exc).__name__}: {exc}") from exc
                log.warning("request %s: target replica failed (%s: %s); leasing another",
                            self.rid, type(exc).__name__, exc)
                await asyncio.sleep(min(0.25, deadline - now))


class LeasedDrafter(LeasedPort):
    """DrafterPort whose failures the coordinator turns into target-only rounds; the next
    ``open`` (the coordinator re-opens after its retry interval) leases a replica again.

    Leasing runs as a background task: the first ``open`` of a request waits for it at most
    ``first_wait_s`` (a warm replica answers in milliseconds), later ones do not — while no
    drafter replica can be leased (the deployment scaled to zero and Serve is starting one, a
    replica died and is being replaced, or every drafter is saturated) each retry fails at once
    and the rounds go on target-only without stalling; the lease goes on in the background (its
    queued call is what makes Serve scale the drafters up) and the first retry after it arrives
    drafts again.  While the coordinator's last drafter lease attempt failed
    (``availability.unavailable``, shared by its requests), new requests do not wait for their
    first lease at all."""

    def __init__(self, handle, rid: str, make_port: Callable[[Any], Any], *,
                 channels: Channels, lease_timeout_s: float, caller=None,
                 availability: Optional[DrafterAvailability] = None,
                 first_wait_s: Optional[float] = None):
        super().__init__(handle, rid, make_port, channels=channels,
                         lease_timeout_s=lease_timeout_s, caller=caller)
        self.availability = availability if availability is not None else DrafterAvailability()
        self.first_wait_s = first_wait_s  # None: as long as the caller waits
        self._connecting: Optional[asyncio.Task] = None
        self._failed_once = self.availability.unavailable

    async def connect(self, timeout_s: Optional[float] = None) -> None:
        await super().connect(timeout_s)
        self.availability.unavailable = False

    async def _ensure_port(self) -> None:
        task = self._connecting
        if task is not None and task.done():
            self._connecting = task = None
        if self.port is not None:
            return
        if task is None:
            task = self._connecting = asyncio.ensure_future(self.connect())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        if self._failed_once and not task.done():
            raise ConnectionError("no drafter replica leased yet")
        try:  # a timeout here ends this wait, not the lease
            await asyncio.wait_for(asyncio.shield(task), self.first_wait_s)
        except asyncio.TimeoutError:
            raise ConnectionError(f"no drafter replica leased yet (waited "
                                  f"{self.first_wait_s:g}s; leasing goes on)") from None

    async def _call(self, name, *args, **kwargs):
        try:
            with cancel_means_replica_died("drafter call"):
                await self._ensure_port()
                return await getattr(self.port, name)(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised; timeouts arrive as cancellation
            self._failed_once = True
            if self.port is None and not self.closed:
                self.availability.unavailable = True  # tell the next requests not to wait
            if isinstance(exc, Exception) and is_transport_failure(exc):
                await self.drop(replica_gone(exc))
            raise

    def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()  # open_lease cancels the lease call
        self._connecting = None
        super().close()

    async def open(self, *args, **kwargs):
        return await self._call("open", *args, **kwargs)

    async def draft(self, *args, **kwargs):
        return await self._call("draft", *args, **kwargs)

    async def slrs_step(self, *args, **kwargs):
        return await self._call("slrs_step", *args, **kwargs)

    def ready_address(self) -> Optional[str]:
        """The leased replica's address if a lease is open now, else None — keeping a lease
        attempt going in the background (a request that started without a drafter asks between
        steps; when a replica is up it starts drafting)."""
        if self.closed:
            return None
        task = self._connecting
        if self.lease is not None and self.port is not None:
            return self.lease.address
        if task is None or task.done():
            self._connecting = asyncio.ensure_future(self.connect())
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        return None

    async def address(self) -> str:
        """The leased drafter replica's data-plane address (a vLLM target's proposer calls it)."""
        try:
            await self._ensure_port()
        except BaseException:
            self._failed_once = True
            if not self.closed:
                self.availability.unavailable = True
            raise
        return self.lease.address
