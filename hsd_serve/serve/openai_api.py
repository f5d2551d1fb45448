"""OpenAI-compatible HTTP API over a generation backend (a :class:`Coordinator` or anything alike).

Endpoints (see DESIGN.md section 6)
-----------------------------------
* ``POST /v1/completions``: ``prompt`` (a string, or a list of exactly one string), ``max_tokens``,
  ``temperature``, ``top_p``, ``top_k`` (extension), ``seed``, ``stop`` (string or list),
  ``stream``, ``n`` (only 1); extensions ``method`` (ar|sd|slem|tli|slrs|auto), ``lookahead``,
  ``adaptive_lookahead``.
* ``POST /v1/chat/completions``: ``messages`` ([{role, content}]) and the same sampling fields
  (``max_completion_tokens`` is accepted as a synonym of ``max_tokens``).
* ``GET /v1/models``, ``GET /health``.

API keys (``api_keys``, ``security.ApiKeys``): when on, every endpoint but ``/health`` needs
``Authorization: Bearer <key>``; otherwise 401 with ``WWW-Authenticate: Bearer`` and the OpenAI
error body (``"code": "invalid_api_key"``), checked before the body is read.

Responses have the OpenAI shapes (``id``, ``object``, ``created``, ``model``, ``choices``,
``usage``) plus an ``hsd`` block with the request's speculative-decoding statistics.  With
``stream=true`` the answer is ``text/event-stream``: one ``data: {chunk}`` per engine chunk that
carries text, a final chunk with ``finish_reason``, ``usage`` and ``hsd``, then ``data: [DONE]``.

Defaults follow OpenAI: ``temperature`` 1.0, ``top_p`` 1.0; ``max_tokens``, ``method`` and
``lookahead`` come from the app's :class:`RequestLimits` (``limits``; default: the service's,
``service_limits()``); a temperature below 1e-5 is greedy (as 0), ``top_k`` -1 means off (as 0).
Without a ``seed`` a sampled (temperature > 0) request draws a fresh random seed, reported back
as ``hsd.seed``; the same seed reproduces the same output.  The ``model`` field is accepted
whatever it names (one model is served) and answers carry the served model name.

Validation (``openai_models``, ``openai_requests``, ``openai_errors``)
---------------------------------------------------------------------
The body is parsed by hand (not by FastAPI) so that every bad input gets HTTP 400 with
``{"error": {"message", "type": "invalid_request_error", "param", "code": null}}`` where
``param`` names the field (``null`` for a body that is not a JSON object).  ``NaN``/``Infinity``
literals, wrong types (no coercion: ``"1"`` is not a number, ``true`` is not an integer), values out
of range and strings that are not valid Unicode (lone surrogates) are rejected.  Unknown fields are
ignored; fields we know but cannot honour are accepted only at their default value (``n``,
``best_of``, ``echo``, ``logprobs``, ``top_logprobs``, ``suffix``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, ``repetition_penalty``, ``min_p``, ``min_tokens``,
``ignore_eos``, ``tools``/``functions``, ``tool_choice``/``function_call``, ``response_format``).
The limits are checked by ``GenerationRequest.validate(limits)``, as for gRPC; its
:class:`RequestError` (and the engine's) becomes a 400 naming the field (``max_new_tokens`` is
reported as ``max_tokens``, or ``max_completion_tokens`` when that was given; ``prompt`` as
``messages`` for chat).  Exceptions of the configured *unavailable* kinds (and ``TimeoutError``,
Ray Serve's ``BackPressureError`` / ``DeploymentUnavailableError``) become 503 (with
``Retry-After`` when the exception carries ``retry_after_s``); any other exception during
generation is a 500 with a JSON error body (in a stream that has started: an SSE
``data: {"error": ...}`` event and then ``data: [DONE]``).

Chat prompts (``openai_backend``)
---------------------------------
``GenerationBackend.chat_prompt`` renders the messages.  :func:`render_chat` uses the target
tokenizer's ``chat_template`` when it has one (``add_generation_prompt=True``; a leading BOS
string is dropped when the tokenizer adds BOS itself, so the model never sees two); otherwise
:func:`fallback_chat_prompt` writes one ``"{role}: {content}"`` line per message and ends with
``"assistant:"``.  Messages reach the renderer as ``{"role", "content"}`` with ``content`` a string
(text parts are joined) and the role ``developer`` mapped to ``system``.

Cancellation (``openai_stream``)
--------------------------------
Each engine step runs as its own task; when the handler is cancelled (a client disconnect under
Ray Serve, or Starlette's disconnect listener) the step is cancelled with plain asyncio semantics
and the engine stream is closed inside a shielded scope, so the engine's ``finally`` (which frees
the KV caches on both workers) always runs.  Between streamed chunks the handler also polls
``request.is_disconnected()`` (streamed or not) and stops generating when the client has gone.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hsd_serve.engine.types import RequestLimits
from hsd_serve.serve.config import service_limits
from hsd_serve.serve.openai_backend import (CoordinatorBackend, GenerationBackend,
                                            fallback_chat_prompt, render_chat)
from hsd_serve.serve.openai_errors import ApiError, json_response
from hsd_serve.serve.openai_models import (ChatCompletionBody, CompletionBody, from_validation,
                                           parse_body, read_json)
from hsd_serve.serve.openai_requests import (chat_messages, chat_request, chat_request_checks,
                                             completion_request)
from hsd_serve.serve.openai_stream import HSD_STAT_KEYS, Shape, answer
from hsd_serve.serve.security import ApiKeys

__all__ = [
    "GenerationBackend",
    "CoordinatorBackend",
    "build_openai_app",
    "render_chat",
    "fallback_chat_prompt",
    # also here for callers of the module before it was split
    "ApiError",
    "HSD_STAT_KEYS",
    "chat_messages",
    "chat_request_checks",
    "completion_request",
]


def build_openai_app(backend: GenerationBackend, *, limits: Optional[RequestLimits] = None,
                     unavailable_exceptions: tuple[type[BaseException], ...] = (),
                     api_keys: Optional[ApiKeys] = None,
                     on_unauthenticated: Optional[Callable[[], None]] = None) -> FastAPI:
    """The FastAPI application serving the OpenAI-compatible API over ``backend``.

    ``limits``: what requests may ask for and the defaults (``None``: ``service_limits()``).
    ``unavailable_exceptions``: exception types (raised by the backend) answered with 503, e.g. an
    admission-control rejection; ``TimeoutError`` (``asyncio.TimeoutError``) and Ray Serve's
    ``BackPressureError`` and ``DeploymentUnavailableError`` are 503 without being listed.
    ``api_keys``: the keys every endpoint but ``/health`` asks for (``None`` or disabled: open);
    ``app.state.key_guard`` is the FastAPI dependency that checks them, for routes added later;
    ``on_unauthenticated`` is called for every call it refuses (e.g. to count them).
    """
    limits = service_limits() if limits is None else limits
    app = FastAPI(title="hsd-serve", summary="OpenAI-compatible lossless speculative decoding")
    app.state.backend = backend
    app.state.limits = limits
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(ApiError, _on_api_error)
    routes = _Routes(backend, limits, tuple(unavailable_exceptions))
    guard = app.state.key_guard = key_guard(api_keys, on_unauthenticated)
    keyed = [Depends(guard)] if guard is not None else None
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"],
                      dependencies=keyed)
    app.add_api_route("/v1/models", routes.models, methods=["GET"], dependencies=keyed)
    app.add_api_route("/health", routes.health, methods=["GET"])
    return app


def key_guard(api_keys: Optional[ApiKeys], on_denied: Optional[Callable[[], None]] = None):
    """A FastAPI dependency that answers 401 unless the request carries a valid key (``None``
    when keys are off); ``on_denied`` is called for each refusal."""
    if api_keys is None or not api_keys.enabled:
        return None

    async def guard(request: Request) -> None:
        value = request.headers.get("authorization")
        if not api_keys.verify_authorization(value):
            if on_denied is not None:
                on_denied()
            what = "invalid API key" if value else "missing API key"
            raise ApiError(401, f"{what}: send 'Authorization: Bearer <key>'", None,
                           "invalid_request_error", {"WWW-Authenticate": "Bearer"},
                           code="invalid_api_key")

    return guard


async def _on_validation(_: Request, exc: RequestValidationError) -> Response:
    return from_validation(list(exc.errors())).response()


async def _on_http(_: Request, exc: StarletteHTTPException) -> Response:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    if exc.status_code == 404:
        kind = "not_found_error"
    return ApiError(exc.status_code, str(exc.detail), None, kind,
                    getattr(exc, "headers", None)).response()


async def _on_api_error(_: Request, exc: ApiError) -> Response:
    return exc.response()


class _Routes:
    """The endpoints over one backend."""

    def __init__(self, backend: GenerationBackend, limits: RequestLimits, kinds: tuple):
        self.backend = backend
        self.limits = limits
        self.kinds = kinds  # exception types answered with 503
        self.started = int(time.time())

    async def completions(self, request: Request) -> Response:
        try:
            body = parse_body(CompletionBody, await read_json(request, self.limits))
            req, seed = completion_request(body, self.limits)
        except ApiError as exc:
            return exc.response()
        return await answer(request, self.backend, req,
                            Shape(False, self.backend.model_name, seed), bool(body.stream),
                            self.kinds)

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = parse_body(ChatCompletionBody, await read_json(request, self.limits))
            req, seed = chat_request(body, self.limits, self.backend.chat_prompt)
        except ApiError as exc:
            return exc.response()
        return await answer(request, self.backend, req,
                            Shape(True, self.backend.model_name, seed), bool(body.stream),
                            self.kinds)

    async def models(self) -> Response:
        return json_response({"object": "list", "data": [
            {"id": self.backend.model_name, "object": "model", "created": self.started,
             "owned_by": "hsd-serve"}]})

    async def health(self) -> Response:
        try:
            info = await self.backend.health()
        except Exception as exc:  # noqa: BLE001
            return json_response({"status": "unavailable",
                                  "error": f"{type(exc).__name__}: {exc}"}, 503)
        if not isinstance(info, dict):
            info = {"status": "ok" if info else "unavailable"}
        status = info.get("status", "ok")
        return json_response({**info, "status": status}, 200 if status == "ok" else 503)
