"""Client-facing gRPC (``hsd.v1.Generation``) on the coordinator, behind Ray Serve's gRPC proxy.

Bad input → ``INVALID_ARGUMENT`` naming the field; no capacity → ``RESOURCE_EXHAUSTED``; an
unexpected failure → ``INTERNAL``.  Nothing is started for a request that fails validation.
With API keys on, a call without ``authorization: Bearer <key>`` metadata → ``UNAUTHENTICATED``
before its request is read.
"""

from __future__ import annotations

import contextlib
import logging

import grpc

from hsd_serve.engine.types import RequestError
from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc
from hsd_serve.serve.convert import chunk_to_proto, request_from_proto, result_to_proto
from hsd_serve.serve.security import Unauthenticated

log = logging.getLogger("hsd_serve.serve")


MAX_DETAILS_CHARS = 512  # status details travel in HTTP/2 trailers (clients refuse > 8 KiB)


def _fail(ctx, code: grpc.StatusCode, message: str) -> None:
    if ctx is not None:
        if len(message) > MAX_DETAILS_CHARS:  # e.g. a message quoting a huge invalid value
            message = message[:MAX_DETAILS_CHARS - 15] + "... [truncated]"
        ctx.set_code(code)
        ctx.set_details(message)


def _status_for(exc: BaseException) -> grpc.StatusCode:
    name = type(exc).__name__
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if "BackPressure" in name or "RejectedRequest" in name:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _authorize(dep, ctx) -> None:
    keys = getattr(dep, "api_keys", None)
    if keys is not None and keys.enabled:
        try:
            keys.check_metadata(ctx.invocation_metadata() if ctx is not None else ())
        except Unauthenticated:
            dep.refused()
            raise


async def generate_unary(dep, request, ctx) -> hsd_pb2.GenerateResponse:
    try:
        _authorize(dep, ctx)
        req = request_from_proto(request, dep.limits)
        result = None
        async with contextlib.aclosing(dep.stream(req)) as chunks:
            async for chunk in chunks:
                result = chunk.result
        return result_to_proto(result, seed=req.params.seed)  # echo the seed used
    except Exception as exc:  # noqa: BLE001 - mapped to a status
        code = _status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("Generate failed")
        _fail(ctx, code, str(exc))
        return hsd_pb2.GenerateResponse()


async def generate_stream(dep, request, ctx):
    try:
        _authorize(dep, ctx)
        req = request_from_proto(request, dep.limits)
        # closed here, not by the garbage collector, when the client cancels: the request's
        # caches and leases are freed at once
        async with contextlib.aclosing(dep.stream(req)) as chunks:
            async for chunk in chunks:
                yield chunk_to_proto(chunk, seed=req.params.seed)
    except Exception as exc:  # noqa: BLE001 - mapped to a status
        code = _status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("GenerateStream failed")
        _fail(ctx, code, str(exc))
        # A stream that yielded nothing only carries the status if the handler raises after
        # setting it (Ray Serve's proxy then keeps the user's code instead of INTERNAL).
        raise


# ---- clients' gRPC served by the coordinator itself (TLS; loopback for local runs) -------------
class DirectGeneration(hsd_pb2_grpc.GenerationServicer):
    """``hsd.v1.Generation`` on a coordinator's own gRPC server (``security.client_grpc_tls``,
    ``security.client_grpc_local_port``): the same keys, limits and status codes as through Ray
    Serve's gRPC proxy (the ``application`` metadata is not needed: this is the application).  Calls beyond the
    coordinator's ``max_ongoing_requests + max_queued_requests`` get ``RESOURCE_EXHAUSTED``
    (Serve's backpressure does not see this port)."""

    def __init__(self, dep, capacity: int):
        self.dep, self.capacity = dep, capacity

    def _full(self) -> bool:
        return self.dep.ongoing >= self.capacity

    async def Generate(self, request, context):
        if self._full():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "coordinator at capacity")
        return await generate_unary(self.dep, request, context)

    async def GenerateStream(self, request, context):
        if self._full():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "coordinator at capacity")
        try:
            async for chunk in generate_stream(self.dep, request, context):
                yield chunk
        except Exception:  # noqa: BLE001 - generate_stream set the status; send it
            code = context.code() or grpc.StatusCode.INTERNAL
            await context.abort(code, context.details() or "")


async def start_client_grpc_server(dep, host: str, port: int, capacity: int, tls=None):
    """Serve ``hsd.v1.Generation`` (plus health and reflection) for ``dep`` on ``host:port``:
    over TLS with ``tls`` (``ClientGrpcTls``), else plaintext (``SO_REUSEPORT``: coordinator
    replicas on one node share the port, the kernel spreads connections); returns
    ``(server, port)``."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from hsd_serve.serve.security import server_credentials

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    hsd_pb2_grpc.add_GenerationServicer_to_server(DirectGeneration(dep, capacity), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = hsd_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
    reflection.enable_server_reflection(
        (name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, server_credentials(
            tls.model_dump(), "security.client_grpc_tls"))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"could not bind the clients' gRPC port {address}")
    await server.start()
    for service in ("", name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    how = "plaintext" if tls is None else "TLS" + (" (mTLS)" if tls.require_client_cert else "")
    log.info("hsd.v1.Generation (%s) on %s:%d", how, host, bound)
    return server, bound
