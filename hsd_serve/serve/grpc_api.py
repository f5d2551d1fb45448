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
from hsd_serve.pb import hsd_pb2
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
