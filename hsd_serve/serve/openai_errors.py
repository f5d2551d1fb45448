"""Error answers of the OpenAI-compatible API (see ``openai_api``): the JSON error body and the
mapping of exceptions to 400, 500 and 503."""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

from fastapi.responses import Response

from hsd_serve.engine.types import RequestError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status, message, the offending field (``param``) and error type."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", headers: Optional[dict] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.headers = headers
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        return json_response(self.body(), self.status, headers=self.headers)


def bad(param: Optional[str], message: str) -> ApiError:
    """A 400 naming ``param`` (``None``: the body as a whole)."""
    return ApiError(400, message, param)


def json_response(obj: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    # ensure_ascii keeps the body valid UTF-8 whatever an error message quotes.
    data = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return Response(data, status_code=status, headers=headers, media_type="application/json")


def engine_error(exc: RequestError, chat: bool, max_tokens_param: str = "max_tokens") -> ApiError:
    """A 400 for the engine's ``RequestError``, its field renamed to the API's: ``max_new_tokens``
    → ``max_tokens_param``; ``prompt`` → ``messages`` for chat."""
    field = exc.field
    if field == "max_new_tokens":
        field = max_tokens_param
    elif chat and field == "prompt":
        field = "messages"
    return bad(field, f"{field}: {exc.message}")


_RAY_UNAVAILABLE = ("BackPressureError", "DeploymentUnavailableError")


def unavailable(exc: BaseException, kinds: tuple) -> Optional[ApiError]:
    """503 for overload/unavailability exceptions, else None."""
    ray_kind = type(exc).__name__ in _RAY_UNAVAILABLE and \
        type(exc).__module__.startswith("ray.")
    if not (ray_kind or isinstance(exc, TimeoutError) or (kinds and isinstance(exc, kinds))):
        return None
    headers = None
    retry = getattr(exc, "retry_after_s", None)
    if isinstance(retry, (int, float)) and math.isfinite(retry) and retry >= 0:
        headers = {"Retry-After": str(max(1, math.ceil(retry)))}
    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return ApiError(503, f"the service is overloaded or unavailable: {msg}", None,
                    "server_overloaded", headers)


def server_error(exc: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")


def failure(exc: Exception, kinds: tuple, what: str = "generation failed") -> ApiError:
    """503 for the unavailable kinds, else a logged 500 (call it inside the ``except``)."""
    err = unavailable(exc, kinds)
    if err is None:
        log.exception(what)
        err = server_error(exc)
    return err
