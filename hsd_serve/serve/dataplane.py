"""The per-round data plane: grpc.aio servers next to the model workers, and client ports.

Server side.  ``DrafterServicer`` / ``TargetServicer`` serve ``hsd.v1.Drafter`` / ``hsd.v1.Target``
for a ``DrafterWorker`` / ``TargetWorker``.  Model work is synchronous torch code, so every worker
call (decode, work, encode) runs on one thread owned by the servicer: calls to one replica are
serialised (one model, one thread) and the event loop stays free for other RPCs, health checks
and the replica's own handle calls.  A missing session is a normal reply (``session_missing``);
``ValueError`` becomes ``INVALID_ARGUMENT`` with its message (a request ``convert`` refuses too:
an ``*_UNSPECIFIED`` or unknown enum value, no draft context); a call for a request whose lease
on the replica has ended (``_WorkerServicer.end``) ``FAILED_PRECONDITION``; anything else
``INTERNAL``.

``start_dataplane_server`` starts a server with one of the two services plus the standard health
service (SERVING for ``""`` and the service name) and reflection, and returns ``(server, port)``.
Given a ``security.DataPlaneSecurity`` it refuses every call but the health check without the
cluster's token (``UNAUTHENTICATED``) and serves TLS when configured; ``ChannelPool`` and the ports
given the same object send the token (over TLS when configured).

Client side.  ``GrpcDrafter`` / ``GrpcTarget`` implement the coordinator's ``DrafterPort`` /
``TargetPort`` over a ``grpc.aio`` channel and behave like ``engine.local``'s in-process ports:
same arguments, same engine dataclasses back, ``SessionMissing`` when the replica lost the
session, ``ValueError`` when the replica rejected the arguments (``INVALID_ARGUMENT``),
``RequestEnded`` when the request's lease there has ended (``FAILED_PRECONDITION``); other
failures raise ``grpc.aio.AioRpcError``.  They also add up ``transport_s``: each call's wall time
minus the model time the replica reported (serialisation, network, queueing on the replica).
``ChannelPool`` caches one channel per (address, event loop).

grpc.aio objects belong to the event loop that created them: create servers, channels and ports
on the loop that will use them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.protocol import Draft, SessionMissing, SLRSOutcome, Verdict
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.pb import hsd_pb2_grpc as pb_grpc
from hsd_serve.serve import convert
from hsd_serve.serve.security import DataPlaneSecurity

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DRAFTER_SERVICE = pb.DESCRIPTOR.services_by_name["Drafter"].full_name  # "hsd.v1.Drafter"
TARGET_SERVICE = pb.DESCRIPTOR.services_by_name["Target"].full_name  # "hsd.v1.Target"

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a fixed port is ours alone
    ("grpc.keepalive_permit_without_calls", 1),  # accept the clients' idle keepalive pings
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


# ============================================================================== server side
ENDED_REMEMBERED = 65_536  # request ids whose lease ended that a servicer remembers


class RequestEnded(Exception):
    """A call for a request whose lease on this replica has ended (``end``): it arrived late
    (sent before the caller was cancelled, queued behind the free); running it would re-create a
    session that nobody frees."""


class _WorkerServicer:
    """One worker, one thread: every call to the worker goes through ``run``.

    ``begin(rid)`` / ``end(rid)`` bracket a request's lease on this replica: ``end`` remembers
    the id and frees its caches, and until a later ``begin`` every call for it is refused with
    ``FAILED_PRECONDITION`` instead of running.  The check runs on the worker thread just before
    the call would, so a call that was sent before the caller went away but reaches the worker
    after the lease ended (queued behind other work, or late on the wire) cannot re-create the
    caches that the end freed.  A vLLM target's ``Generate`` stream is checked when it starts (on
    the event loop, where ``end`` marks the id).
    """

    def __init__(self, worker, executor: Optional[ThreadPoolExecutor] = None, *,
                 max_batch: int = 16):
        self.worker = worker
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"hsd-{type(worker).__name__}")
        # continuous batching: calls that arrive while the worker thread is busy wait here and
        # the next pass takes up to max_batch of them at once; at low load a call runs alone
        self.max_batch = max_batch
        self._pending: list[tuple[object, asyncio.Future]] = []
        self._batcher: Optional[asyncio.Task] = None
        self.batches = 0
        self.batched_calls = 0
        self.ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.refused_late = 0  # calls refused because their request's lease had ended

    def begin(self, rid: str) -> None:
        """A lease for ``rid`` starts here: its calls run (again)."""
        self.ended.pop(rid, None)

    async def end(self, rid: str) -> None:
        """``rid``'s lease here ended: from now on its calls are refused (those queued for the
        worker thread included); then free its caches on the worker thread."""
        self.ended[rid] = None
        self.ended.move_to_end(rid)
        while len(self.ended) > ENDED_REMEMBERED:
            self.ended.popitem(last=False)
        await self.run(self.worker.free, rid)

    def _late(self, rid: str) -> Optional[RequestEnded]:
        """The error for a call of ``rid`` if its lease here ended (counted), else None."""
        if rid not in self.ended:
            return None
        self.refused_late += 1
        return RequestEnded(f"request {rid}'s lease on this replica has ended")

    def _check_live(self, rid: str) -> None:
        """On the worker thread: raise ``RequestEnded`` for a request whose lease ended."""
        late = self._late(rid)
        if late is not None:
            raise late

    def _run_live(self, calls: list) -> list:
        """``_run_batch`` over the calls whose request is live; the others get RequestEnded."""
        results: list = [self._late(call.rid) for call in calls]
        live = [i for i, late in enumerate(results) if late is None]
        if live:
            for i, out in zip(live, self._run_batch([calls[i] for i in live])):
                results[i] = out
        return results

    def _run_batch(self, calls: list) -> list:  # pragma: no cover - per servicer
        raise NotImplementedError

    async def _batched(self, context, call):
        """Queue ``call`` for the next batch; return its result (errors → status codes; a
        ``SessionMissing`` is re-raised for the caller to answer)."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((call, fut))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(self._run_batches())
        out = await asyncio.shield(fut)
        if isinstance(out, SessionMissing):
            raise out
        if isinstance(out, RequestEnded):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(out))
        if isinstance(out, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(out))
        if isinstance(out, Exception):
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(out).__name__}: {out}")
        return out

    async def _run_batches(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                results = await self.run(self._run_live, [c for c, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets it
                log.exception("batched call failed")
                results = [exc] * len(batch)
            self.batches += 1
            self.batched_calls += len(batch)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    async def run(self, fn: Callable, *args, **kwargs) -> Any:
        """Run ``fn(*args, **kwargs)`` on the worker thread (use it for any other access to the
        worker from the replica, e.g. freeing a session when a lease closes)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def _serve(self, context, fn: Callable[[], Any], rid: Optional[str] = None):
        """Run ``fn`` on the worker thread (refused if ``rid``'s lease here ended)."""
        def work():
            if rid is not None:
                self._check_live(rid)
            return fn()

        try:
            return await self.run(work)
        except asyncio.CancelledError:
            raise
        except RequestEnded as exc:
            code, details = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except ValueError as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - reported to the caller as INTERNAL
            log.exception("%s failed", type(self).__name__)
            code, details = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        await context.abort(code, details)

    def close(self) -> None:
        """Shut the worker thread down (waits for the call in progress)."""
        if self._own_executor:
            self.executor.shutdown(wait=True)


class DrafterServicer(_WorkerServicer, pb_grpc.DrafterServicer):
    """``hsd.v1.Drafter`` for a ``DrafterWorker``; Draft calls are batched
    (``DrafterWorker.draft_batch``: concurrent requests draft in lockstep)."""

    def __init__(self, worker, executor: Optional[ThreadPoolExecutor] = None, *,
                 max_batch: int = 16):
        super().__init__(worker, executor, max_batch=max_batch)

    async def Open(self, request: pb.OpenRequest, context) -> pb.OpenReply:
        def work():
            self.worker.open(**convert.open_request_args(request))
            return pb.OpenReply()

        return await self._serve(context, work, request.request_id)

    def _run_batch(self, calls):
        return self.worker.draft_batch(calls)

    async def Draft(self, request: pb.DraftRequest, context) -> pb.DraftReply:
        from hsd_serve.engine.drafter import DraftCall

        try:
            call = DraftCall(request.request_id, request.k, request.position,
                             **convert.draft_request_args(request))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            d = await self._batched(context, call)
        except SessionMissing:
            return pb.DraftReply(session_missing=True)
        return convert.draft_to_proto(d)

    async def SLRSStep(self, request: pb.SLRSRequest, context) -> pb.SLRSReply:
        def work():
            args = convert.slrs_request_args(request)
            if args["row"] is None:
                raise ValueError("SLRSStep needs the target's row")
            try:
                out = self.worker.slrs_step(**args)
            except SessionMissing:
                return pb.SLRSReply(session_missing=True)
            return convert.slrs_to_proto(out)

        return await self._serve(context, work, request.request_id)

    async def Free(self, request: pb.FreeRequest, context) -> pb.FreeReply:
        return await self._serve(
            context, lambda: pb.FreeReply(freed=bool(self.worker.free(request.request_id))))


class TargetServicer(_WorkerServicer, pb_grpc.TargetServicer):
    """``hsd.v1.Target`` for a ``TargetWorker``; proposal rows span the target's vocabulary.
    Verify calls are batched (``TargetWorker.verify_batch``)."""

    def __init__(self, worker, executor: Optional[ThreadPoolExecutor] = None, *,
                 max_batch: int = 16):
        super().__init__(worker, executor, max_batch=max_batch)
        model = getattr(worker, "model", None)  # a vLLM target has none here (Generate only)
        self.width = model.vocab.size if model is not None else 0

    def _run_batch(self, calls):
        return self.worker.verify_batch(calls)

    async def Generate(self, request, context):
        """One whole request on a vLLM target (``serve.vllm``): a ``TargetStep`` per engine
        output.  The stream's end (the caller cancelling it) aborts the request in vLLM."""
        if not hasattr(self.worker, "generate"):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "this target replica verifies rounds (Verify); Generate needs "
                                "target_executor: vllm")
        from hsd_serve.serve.vllm import wire

        try:
            args = wire.generate_args(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # on the event loop, as ``end`` marks requests: a stream that arrives after its lease
        # ended would start a request no one reads (it ends only when its caller cancels it)
        late = self._late(args["rid"])
        if late is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(late))
        try:
            async for step in self.worker.generate(**args):
                yield wire.step_to_proto(step)
        except ValueError as exc:  # vLLM refuses the request (e.g. too long)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyReply:
        from hsd_serve.engine.target import VerifyCall

        try:
            call = VerifyCall(**convert.verify_request_args(request, self.width))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # the verdict's batch_size (requests in its forward pass) travels back: the
        # coordinator's load-aware lookahead reads it
        return convert.verdict_to_proto(await self._batched(context, call))

    async def Free(self, request: pb.FreeRequest, context) -> pb.FreeReply:
        return await self._serve(
            context, lambda: pb.FreeReply(freed=bool(self.worker.free(request.request_id))))


_KINDS = {
    "drafter": (DrafterServicer, pb_grpc.add_DrafterServicer_to_server, DRAFTER_SERVICE),
    "target": (TargetServicer, pb_grpc.add_TargetServicer_to_server, TARGET_SERVICE),
}


async def start_dataplane_server(servicer_kind: str, worker, host: str = "0.0.0.0",
                                 port: int = 0, *, executor: Optional[ThreadPoolExecutor] = None,
                                 servicer_options: Optional[dict] = None,
                                 security: Optional[DataPlaneSecurity] = None
                                 ) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for ``worker`` (``servicer_kind`` "drafter" or "target") on
    ``host:port`` (0 = any free port) with health and reflection; returns ``(server, port)``.

    The servicer is ``server.hsd_servicer`` (its ``run`` executes on the worker thread) and the
    health servicer ``server.hsd_health``; stop with ``stop_dataplane_server``.
    """
    if servicer_kind not in _KINDS:
        raise ValueError(f"servicer_kind must be 'drafter' or 'target', got {servicer_kind!r}")
    cls, add, name = _KINDS[servicer_kind]
    servicer = cls(worker, executor, **(servicer_options or {}))
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        interceptors=security.server_interceptors() if security is not None else None)
    add(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    try:
        bound = (security.add_port(server, address) if security is not None
                 else server.add_insecure_port(address))
    except Exception:
        servicer.close()
        raise
    if not bound:
        servicer.close()
        raise RuntimeError(f"could not bind the data-plane server to {host}:{port}")
    await server.start()
    for service in ("", name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    server.hsd_servicer = servicer
    server.hsd_health = health_servicer
    log.info("%s data plane listening on %s:%d (%s)", servicer_kind, host, bound,
             "no token" if security is None else "token" + (", TLS" if security.tls else ""))
    return server, bound


async def stop_dataplane_server(server: grpc.aio.Server, grace: Optional[float] = 1.0) -> None:
    """Mark NOT_SERVING, stop accepting calls (in-flight ones get ``grace`` seconds), then shut
    the worker thread down."""
    health_servicer = getattr(server, "hsd_health", None)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)
    servicer = getattr(server, "hsd_servicer", None)
    if servicer is not None:
        await asyncio.get_running_loop().run_in_executor(None, servicer.close)


# ============================================================================== client side
def open_channel(address: str, security: Optional[DataPlaneSecurity] = None,
                 options: Optional[list] = None) -> grpc.aio.Channel:
    """A channel to a replica's data plane: with ``security``, the token on every call (and TLS
    when configured)."""
    options = list(options if options is not None else CHANNEL_OPTIONS)
    if security is None:
        return grpc.aio.insecure_channel(address, options=options)
    return security.channel(address, options)


class ChannelPool:
    """One ``grpc.aio`` channel per ``"host:port"`` (and per event loop), closed by ``close``;
    ``security``: the data plane's token and TLS (``None``: plaintext, no token)."""

    def __init__(self, options: Optional[list] = None,
                 security: Optional[DataPlaneSecurity] = None):
        self.options = list(options if options is not None else CHANNEL_OPTIONS)
        self.security = security
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        key = (address, id(asyncio.get_running_loop()))
        ch = self._channels.get(key)
        if ch is None:
            ch = self._channels[key] = open_channel(address, self.security, self.options)
        return ch

    async def discard(self, address: str) -> None:
        """Close and forget the channel(s) to ``address`` (e.g. after its replica died)."""
        for key in [k for k in self._channels if k[0] == address]:
            await self._channels.pop(key).close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()


def _raise_for(exc: grpc.aio.AioRpcError) -> None:
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        raise ValueError(exc.details()) from exc
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        raise RequestEnded(exc.details()) from exc
    raise exc


class _GrpcPort:
    def __init__(self, target_or_channel: Union[str, grpc.aio.Channel], *,
                 pool: Optional[ChannelPool] = None, timeout_s: Optional[float] = None,
                 security: Optional[DataPlaneSecurity] = None):
        self._own_channel = False
        if isinstance(target_or_channel, str):
            if pool is not None:
                self.channel = pool.get(target_or_channel)
            else:
                self.channel = open_channel(target_or_channel, security)
                self._own_channel = True
        else:
            self.channel = target_or_channel
        self.timeout_s = timeout_s
        self.transport_s = 0.0  # wall time of calls minus the model time replicas reported
        self.calls = 0

    async def _call(self, method, request, model_s: Callable[[Any], float] = lambda r: 0.0):
        t0 = time.perf_counter()
        try:
            reply = await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            _raise_for(exc)
        self.calls += 1
        self.transport_s += max(0.0, time.perf_counter() - t0 - model_s(reply))
        return reply

    async def close(self) -> None:
        """Close the channel if this port created it (pooled channels belong to the pool)."""
        if self._own_channel:
            await self.channel.close()


class GrpcDrafter(_GrpcPort):
    """``DrafterPort`` over ``hsd.v1.Drafter``; ``target_vocab_size`` is the width of the dense
    proposal rows handed back (the target's ``vocab.size``, as in ``DrafterWorker``)."""

    def __init__(self, target_or_channel: Union[str, grpc.aio.Channel], *,
                 target_vocab_size: int, pool: Optional[ChannelPool] = None,
                 timeout_s: Optional[float] = None,
                 security: Optional[DataPlaneSecurity] = None):
        super().__init__(target_or_channel, pool=pool, timeout_s=timeout_s, security=security)
        self.width = int(target_vocab_size)
        self.stub = pb_grpc.DrafterStub(self.channel)

    async def open(self, rid: str, method: str, prompt: str, params: SamplingParams,
                   prompt_ids) -> None:
        await self._call(self.stub.Open, convert.open_request(rid, method, prompt, params,
                                                              prompt_ids))

    async def draft(self, rid: str, k: int, position: int, *, committed=None,
                    generated=None, attempt: int = 0, branches: int = 0,
                    span: int = 0) -> Draft:
        reply = await self._call(self.stub.Draft,
                                 convert.draft_request(rid, k, position, committed, generated,
                                                       attempt, branches, span),
                                 lambda r: r.draft_s)
        if reply.session_missing:
            raise SessionMissing(rid)
        return convert.draft_from_proto(reply, self.width)

    async def slrs_step(self, rid: str, generated: bytes, row, position: int) -> SLRSOutcome:
        reply = await self._call(self.stub.SLRSStep,
                                 convert.slrs_request(rid, generated, row, position),
                                 lambda r: r.draft_s)
        if reply.session_missing:
            raise SessionMissing(rid)
        return convert.slrs_from_proto(reply)

    async def free(self, rid: str) -> None:
        await self._call(self.stub.Free, pb.FreeRequest(request_id=rid))


class GrpcTarget(_GrpcPort):
    """``TargetPort`` over ``hsd.v1.Target``."""

    def __init__(self, target_or_channel: Union[str, grpc.aio.Channel], *,
                 pool: Optional[ChannelPool] = None, timeout_s: Optional[float] = None,
                 security: Optional[DataPlaneSecurity] = None):
        super().__init__(target_or_channel, pool=pool, timeout_s=timeout_s, security=security)
        self.stub = pb_grpc.TargetStub(self.channel)

    async def verify(self, rid: str, committed, candidates, rule: str, params: SamplingParams,
                     position: int, proposals=None) -> Verdict:
        reply = await self._call(self.stub.Verify,
                                 convert.verify_request(rid, committed, candidates, rule, params,
                                                        position, proposals),
                                 lambda r: r.verify_s)
        return convert.verdict_from_proto(reply)

    async def free(self, rid: str) -> None:
        await self._call(self.stub.Free, pb.FreeRequest(request_id=rid))

    async def generate(self, rid: str, prompt_ids, params: SamplingParams, max_new_tokens: int,
                       spec=None):
        """The steps of a whole request on a vLLM target replica (``serve.vllm``)."""
        from hsd_serve.serve.vllm import wire

        call = self.stub.Generate(wire.generate_request(rid, prompt_ids, params, max_new_tokens,
                                                        spec), timeout=None)
        try:
            async for msg in call:
                yield wire.step_from_proto(msg)
        except grpc.aio.AioRpcError as exc:
            _raise_for(exc)
        finally:
            call.cancel()
