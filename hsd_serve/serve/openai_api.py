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

Responses have the OpenAI shapes (``id``, ``object``, ``created``, ``model``, ``choices``,
``usage``) plus an ``hsd`` block with the request's speculative-decoding statistics.  With
``stream=true`` the answer is ``text/event-stream``: one ``data: {chunk}`` per engine chunk that
carries text, a final chunk with ``finish_reason``, ``usage`` and ``hsd``, then ``data: [DONE]``.

Defaults follow OpenAI: ``temperature`` 1.0, ``top_p`` 1.0, ``max_tokens``
``ApiLimits.default_max_tokens``; a temperature below 1e-5 is greedy (as 0), ``top_k`` -1 means
off (as 0).  Without a ``seed`` a sampled (temperature > 0) request draws a
fresh random seed, reported back as ``hsd.seed``; the same seed reproduces the same output.  The
``model`` field is accepted whatever it names (one model is served) and answers carry the served
model name.

Validation
----------
The body is parsed here (not by FastAPI) so that every bad input gets HTTP 400 with
``{"error": {"message", "type": "invalid_request_error", "param", "code": null}}`` where
``param`` names the field (``null`` for a body that is not a JSON object).  ``NaN``/``Infinity``
literals, wrong types (no coercion: ``"1"`` is not a number, ``true`` is not an integer), values out
of range and strings that are not valid Unicode (lone surrogates) are rejected.  Unknown fields are
ignored; fields we know but cannot honour are accepted only at their default value (``n``,
``best_of``, ``echo``, ``logprobs``, ``top_logprobs``, ``suffix``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, ``repetition_penalty``, ``min_p``, ``min_tokens``,
``ignore_eos``, ``tools``/``functions``, ``tool_choice``/``function_call``, ``response_format``).
A :class:`RequestError` from the engine becomes a 400 naming its field (``max_new_tokens`` is
reported as ``max_tokens``; ``prompt`` as ``messages`` for chat).  Exceptions of the configured
*unavailable* kinds (and ``TimeoutError``, Ray Serve's ``BackPressureError`` /
``DeploymentUnavailableError``) become 503 (with ``Retry-After`` when the exception carries
``retry_after_s``); any other exception during generation is a 500 with a JSON error body (in a
stream that has started: an SSE ``data: {"error": ...}`` event and then ``data: [DONE]``).

Chat prompts
------------
``GenerationBackend.chat_prompt`` renders the messages.  :func:`render_chat` uses the target
tokenizer's ``chat_template`` when it has one (``add_generation_prompt=True``; a leading BOS
string is dropped when the tokenizer adds BOS itself, so the model never sees two); otherwise
:func:`fallback_chat_prompt` writes one ``"{role}: {content}"`` line per message and ends with
``"assistant:"``.  Messages reach the renderer as ``{"role", "content"}`` with ``content`` a string
(text parts are joined) and the role ``developer`` mapped to ``system``.

Cancellation
------------
Each engine step runs as its own task; when the handler is cancelled (a client disconnect under
Ray Serve, or Starlette's disconnect listener) the step is cancelled with plain asyncio semantics
and the engine stream is closed inside a shielded scope, so the engine's ``finally`` (which frees
the KV caches on both workers) always runs.  Between streamed chunks the handler also polls
``request.is_disconnected()`` (streamed or not) and stops generating when the client has gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import (Any, AsyncIterator, Callable, Literal, Optional, Protocol, Union,
                    runtime_checkable)

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, \
    ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.types import METHODS, Chunk, GenerationRequest, GenerationResult, RequestError

log = logging.getLogger(__name__)

__all__ = [
    "ApiLimits",
    "GenerationBackend",
    "CoordinatorBackend",
    "build_openai_app",
    "render_chat",
    "fallback_chat_prompt",
]

# Statistics reported in each response's ``hsd`` block.
HSD_STAT_KEYS = ("method", "rounds", "drafted", "accepted", "acceptance_rate", "tokens_per_round",
                 "wall_s", "tokens_per_s", "fallback_rounds", "ttft_s")

CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_LOOKAHEAD = 64
MIN_TEMPERATURE = 1e-5  # temperatures below this are greedy (as in vLLM)
MAX_BODY_OVERHEAD = 1 << 20  # bytes of JSON allowed on top of the prompt size limit


@dataclass(frozen=True)
class ApiLimits:
    """Limits on requests, and the server-side defaults for fields a request leaves out."""

    max_prompt_chars: int = 1_000_000  # characters of prompt (completions) or of all messages
    max_tokens_limit: int = 4096  # largest accepted max_tokens
    default_max_tokens: int = 128  # max_tokens when the request gives none
    default_method: str = "auto"  # method when the request gives none
    default_lookahead: int = 4  # lookahead when the request gives none

    def __post_init__(self) -> None:
        if self.max_prompt_chars < 1 or self.max_tokens_limit < 1:
            raise ValueError("ApiLimits: limits must be >= 1")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError("ApiLimits: default_max_tokens must be in [1, max_tokens_limit]")
        if self.default_method not in METHODS:
            raise ValueError(f"ApiLimits: default_method must be one of {', '.join(METHODS)}")
        if not 1 <= self.default_lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"ApiLimits: default_lookahead must be in [1, {MAX_LOOKAHEAD}]")


# ---------------------------------------------------------------------------- backends


@runtime_checkable
class GenerationBackend(Protocol):
    """What the HTTP layer needs from the engine."""

    model_name: str

    def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        """Chunks of one request, the last carrying ``result``; raises :class:`RequestError`
        before the first chunk for a bad request.  Closing the iterator (``aclose``) must free
        whatever the request holds."""
        ...

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text for chat ``messages`` (``[{"role", "content"}]``, content a string);
        may raise :class:`RequestError` (field ``messages``)."""
        ...

    async def health(self) -> dict:
        """``{"status": "ok", ...}`` when able to serve; any other status answers 503."""
        ...


def fallback_chat_prompt(messages: list[dict]) -> str:
    """``"system: ...\\nuser: ...\\nassistant:"``: one ``role: content`` line per message, then the
    generation prompt ``assistant:`` (the model writes the reply after it)."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    lines.append("assistant:")
    return "\n".join(lines)


def render_chat(tokenizer: Any, messages: list[dict]) -> str:
    """Render ``messages`` with the tokenizer's chat template, or :func:`fallback_chat_prompt`.

    ``tokenizer`` is a :class:`hsd_serve.models.tokenizer.TokenizerAdapter` (or a bare Hugging Face
    tokenizer).  Template errors (e.g. a template that insists on alternating roles) raise
    :class:`RequestError` on ``messages``.
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    if not getattr(hf, "chat_template", None):
        return fallback_chat_prompt(messages)
    try:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and friends: the messages
        if type(exc).__module__.split(".")[0] == "jinja2":
            raise RequestError("messages", f"the chat template rejects these messages: {exc}") \
                from exc
        raise
    if not isinstance(text, str):  # some versions return a list for a single conversation
        first = text[0] if isinstance(text, list) and text else None
        text = first if isinstance(first, str) else str(text)
    bos = getattr(hf, "bos_token", None)
    if isinstance(bos, str) and bos and text.startswith(bos) and _adds_bos(tokenizer, hf):
        text = text[len(bos):]
    return text


def _adds_bos(tokenizer: Any, hf: Any) -> bool:
    """Does encoding a prompt already put BOS in front (so a template's BOS would double it)?"""
    bos_id = getattr(hf, "bos_token_id", None)
    if not isinstance(bos_id, int):
        return False
    try:
        if hasattr(tokenizer, "encode_prompt"):
            ids = tokenizer.encode_prompt("a")
        else:
            ids = list(hf.encode("a", add_special_tokens=True))
    except Exception:  # noqa: BLE001
        return False
    return bool(ids) and ids[0] == bos_id


class CoordinatorBackend:
    """:class:`GenerationBackend` over a :class:`hsd_serve.engine.engine.Coordinator`.

    ``tokenizer`` is the target's :class:`TokenizerAdapter` (its chat template renders chat
    prompts).
    """

    def __init__(self, coordinator: Any, tokenizer: Any, model_name: str):
        self.coordinator = coordinator
        self.tokenizer = tokenizer
        self.model_name = model_name

    def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        return self.coordinator.stream(req)

    def chat_prompt(self, messages: list[dict]) -> str:
        return render_chat(self.tokenizer, messages)

    async def health(self) -> dict:
        c = self.coordinator
        drafter = getattr(c, "drafter", None)
        if drafter is None:  # a deployment wrapping a Coordinator: its drafter handle
            drafter = getattr(c, "drafter_handle", None)
        return {"status": "ok", "model": self.model_name, "drafter": drafter is not None}


# ---------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answer: HTTP status, message, the offending field (``param``) and error type."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": None}}

    def response(self) -> Response:
        return _json(self.body(), self.status, headers=self.headers)


def _bad(param: Optional[str], message: str) -> ApiError:
    return ApiError(400, message, param)


def _json(obj: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    # ensure_ascii keeps the body valid UTF-8 whatever an error message quotes.
    data = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return Response(data, status_code=status, headers=headers, media_type="application/json")


_RAY_UNAVAILABLE = ("BackPressureError", "DeploymentUnavailableError")


def _unavailable(exc: BaseException, kinds: tuple) -> Optional[ApiError]:
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


def _server_error(exc: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")


# ---------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # strict: no coercion ("1" is no number, true no integer); NaN/inf refused; unknown ignored.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


Number = Union[StrictInt, StrictFloat]


class _Common(_Body):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stop: Union[None, StrictStr, list[StrictStr]] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[dict] = None
    n: Optional[StrictInt] = None
    user: Optional[StrictStr] = None
    # extensions
    method: Optional[StrictStr] = None
    lookahead: Optional[StrictInt] = None
    adaptive_lookahead: Optional[StrictBool] = None
    # known, accepted only at their defaults
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict] = None
    repetition_penalty: Optional[Number] = None
    min_p: Optional[Number] = None
    min_tokens: Optional[StrictInt] = None
    ignore_eos: Optional[StrictBool] = None


class CompletionBody(_Common):
    prompt: Union[StrictStr, list[Any]]
    best_of: Optional[StrictInt] = None
    echo: Optional[StrictBool] = None
    logprobs: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class _TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr
    content: Union[StrictStr, list[_TextPart]]
    name: Optional[StrictStr] = None


class ChatCompletionBody(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[StrictStr, dict]] = None
    functions: Optional[list] = None
    function_call: Optional[Union[StrictStr, dict]] = None
    response_format: Optional[dict] = None
    parallel_tool_calls: Optional[StrictBool] = None


def _param_of(loc: tuple) -> Optional[str]:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``; other fields: the top-level name."""
    if not loc:
        return None
    top = str(loc[0])
    if top == "messages" and len(loc) >= 2 and isinstance(loc[1], int):
        p = f"messages[{loc[1]}]"
        if len(loc) >= 3 and loc[2] in ChatMessage.model_fields:
            p += f".{loc[2]}"
        return p
    return top


def _from_validation(errors: list[dict]) -> ApiError:
    e = errors[0]
    loc = tuple(e.get("loc") or ())
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # FastAPI's locations
        loc = loc[1:]
    param = _param_of(loc)
    msg = str(e.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if e.get("type") == "missing":
        msg = "this field is required"
    if e.get("type") == "json_invalid":
        return _bad(None, "the request body is not valid JSON")
    return _bad(param, f"{param}: {msg}" if param else msg)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, limits: ApiLimits) -> dict:
    raw = await request.body()
    if len(raw) > limits.max_prompt_chars * 4 + MAX_BODY_OVERHEAD:
        raise _bad(None, f"the request body is too large ({len(raw)} bytes)")
    if not raw.strip():
        raise _bad(None, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise _bad(None, "invalid JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, huge ints
        raise _bad(None, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    return body


def _validate(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _from_validation(exc.errors(include_url=False, include_input=False)) from None
    except RecursionError:
        raise _bad(None, "the request body is nested too deeply") from None


def _check_text(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(param, f"{param}: not valid Unicode (lone surrogate)") from None


def _float(value: Union[int, float], param: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise _bad(param, f"{param}: out of range") from None


def _require_default(body: Any, name: str, ok: Callable[[Any], bool], what: str) -> None:
    v = getattr(body, name)
    if v is not None and not ok(v):
        raise _bad(name, f"{name}: not supported by this server (only {what} is accepted)")


def _common_request(body: _Common, prompt: str, max_tokens: Optional[int], limits: ApiLimits,
                    max_tokens_param: str) -> tuple[GenerationRequest, int]:
    """(request, seed used) from the fields shared by both endpoints."""
    _require_default(body, "n", lambda v: v == 1, "n=1")
    _require_default(body, "presence_penalty", lambda v: v == 0, "0")
    _require_default(body, "frequency_penalty", lambda v: v == 0, "0")
    _require_default(body, "logit_bias", lambda v: not v, "an empty object")
    _require_default(body, "repetition_penalty", lambda v: v == 1, "1")
    _require_default(body, "min_p", lambda v: v == 0, "0")
    _require_default(body, "min_tokens", lambda v: v == 0, "0")
    _require_default(body, "ignore_eos", lambda v: v is False, "false")

    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif not 1 <= max_tokens <= limits.max_tokens_limit:
        raise _bad(max_tokens_param, f"{max_tokens_param}: must be in [1, "
                                     f"{limits.max_tokens_limit}], got {max_tokens}")
    temperature = 1.0 if body.temperature is None else _float(body.temperature, "temperature")
    if temperature < 0:
        raise _bad("temperature", f"temperature: must be >= 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0  # below this, logits / T overflows: it is greedy decoding anyway
    top_p = 1.0 if body.top_p is None else _float(body.top_p, "top_p")
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"top_p: must be in (0, 1], got {top_p}")
    top_k = 0 if body.top_k is None else body.top_k
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    if top_k < 0:
        raise _bad("top_k", f"top_k: must be >= 0 (0 or -1 disables it), got {top_k}")
    if body.seed is None:
        seed = secrets.randbits(63) if temperature > 0 else 0
    elif not 0 <= body.seed < 2**63:
        raise _bad("seed", "seed: must be an integer in [0, 2**63)")
    else:
        seed = body.seed
    if body.stop is None:
        stop: tuple[str, ...] = ()
    elif isinstance(body.stop, str):
        stop = (body.stop,)
    else:
        stop = tuple(body.stop)
    for s in stop:
        _check_text(s, "stop")
    method = limits.default_method if body.method is None else body.method
    if method not in METHODS:
        raise _bad("method", f"method: unknown method; choose one of {', '.join(METHODS)}")
    lookahead = limits.default_lookahead if body.lookahead is None else body.lookahead
    if not 1 <= lookahead <= MAX_LOOKAHEAD:
        raise _bad("lookahead", f"lookahead: must be in [1, {MAX_LOOKAHEAD}], got {lookahead}")
    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as exc:  # unreachable after the checks above; kept as a safety net
        field = str(exc).split(" ", 1)[0]
        raise _bad(field if field in ("temperature", "top_k", "top_p", "seed") else None,
                   str(exc)) from None
    req = GenerationRequest(prompt=prompt, max_new_tokens=max_tokens, params=params,
                            method=method, lookahead=lookahead,
                            adaptive_lookahead=bool(body.adaptive_lookahead), stop=stop)
    return req, seed


def completion_request(body: CompletionBody, limits: ApiLimits) -> tuple[GenerationRequest, int]:
    _require_default(body, "best_of", lambda v: v == 1, "best_of=1")
    _require_default(body, "echo", lambda v: v is False, "false")
    _require_default(body, "logprobs", lambda v: False, "null")
    _require_default(body, "suffix", lambda v: v == "", "an empty suffix")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise _bad("prompt", "prompt: a list prompt must hold exactly one string "
                                 f"(got {len(prompt)} items)")
        prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt", "prompt: must be a string (token-id prompts are not supported)")
    if not prompt:
        raise _bad("prompt", "prompt: must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise _bad("prompt", f"prompt: longer than {limits.max_prompt_chars} characters")
    _check_text(prompt, "prompt")
    return _common_request(body, prompt, body.max_tokens, limits, "max_tokens")


def chat_messages(body: ChatCompletionBody, limits: ApiLimits) -> list[dict]:
    """The messages as ``[{"role", "content"[, "name"]}]`` with string content, checked."""
    if not body.messages:
        raise _bad("messages", "messages: must hold at least one message")
    out = []
    total = 0
    for i, m in enumerate(body.messages):
        if m.role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role",
                       f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        _check_text(content, f"messages[{i}].content")
        total += len(content)
        if total > limits.max_prompt_chars:
            raise _bad("messages", f"messages: longer than {limits.max_prompt_chars} characters")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            _check_text(m.name, f"messages[{i}].name")
            msg["name"] = m.name
        out.append(msg)
    return out


def chat_request_checks(body: ChatCompletionBody) -> Optional[int]:
    """Unsupported chat fields; returns the effective max_tokens."""
    _require_default(body, "logprobs", lambda v: v is False, "false")
    _require_default(body, "top_logprobs", lambda v: v == 0, "0")
    _require_default(body, "tools", lambda v: not v, "an empty list")
    _require_default(body, "functions", lambda v: not v, "an empty list")
    _require_default(body, "tool_choice", lambda v: v in ("none", "auto"), "none")
    _require_default(body, "function_call", lambda v: v in ("none", "auto"), "none")
    _require_default(body, "response_format", lambda v: v.get("type", "text") == "text",
                     '{"type": "text"}')
    if body.max_tokens is not None and body.max_completion_tokens is not None and \
            body.max_tokens != body.max_completion_tokens:
        raise _bad("max_completion_tokens",
                   "max_completion_tokens: differs from max_tokens; give one of them")
    return body.max_tokens if body.max_tokens is not None else body.max_completion_tokens


# ---------------------------------------------------------------------------- engine stream


class _Pump:
    """Steps an engine stream one chunk at a time, each step in its own task.

    A cancelled caller (client gone) cancels the running step with ordinary one-shot asyncio
    cancellation, so the engine's ``finally`` can still await its cache frees; :meth:`aclose`
    runs shielded for the same reason.
    """

    def __init__(self, agen: AsyncIterator[Chunk]):
        self.agen = agen

    async def _step(self) -> Optional[Chunk]:
        try:
            return await self.agen.__anext__()
        except StopAsyncIteration:
            return None

    async def next(self) -> Optional[Chunk]:
        task = asyncio.ensure_future(self._step())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            with anyio.CancelScope(shield=True):
                try:
                    await task
                except BaseException:  # noqa: BLE001 - the step's own cancellation/failure
                    pass
            raise

    async def aclose(self) -> None:
        aclose = getattr(self.agen, "aclose", None)
        if aclose is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await aclose()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the answer
                log.warning("closing an engine stream failed: %s", exc)


def _engine_error(exc: RequestError, chat: bool) -> ApiError:
    field = exc.field
    if field == "max_new_tokens":
        field = "max_tokens"
    elif chat and field == "prompt":
        field = "messages"
    return _bad(field, f"{field}: {exc.message}")


def _hsd_block(result: GenerationResult, seed: int) -> dict:
    d = result.stats.as_dict()
    out = {k: d[k] for k in HSD_STAT_KEYS}
    out["seed"] = seed
    return out


def _usage(result: GenerationResult) -> dict:
    p = int(result.stats.prompt_tokens)
    c = len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=True, allow_nan=False,
                                  separators=(",", ":")).encode("ascii") + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """SSE response that always closes its event generator (hence the engine stream) at once,
    even when the handler is cancelled while a chunk is being sent."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class _Shape:
    """Builds the OpenAI objects for one request (completions or chat)."""

    def __init__(self, chat: bool, model: str, seed: int):
        self.chat = chat
        self.model = model
        self.seed = seed
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, result: GenerationResult) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None,
                      "finish_reason": result.finish_reason}
            out = self._head("text_completion")
        out.update(choices=[choice], usage=_usage(result), hsd=_hsd_block(result, self.seed))
        return out

    def piece(self, text: Optional[str], finish: Optional[str] = None, *,
              role: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = self._head("text_completion")
        out["choices"] = [choice]
        return out

    def last(self, result: GenerationResult, text: str) -> dict:
        out = self.piece(text if text or not self.chat else None, result.finish_reason)
        out.update(usage=_usage(result), hsd=_hsd_block(result, self.seed))
        return out


# ---------------------------------------------------------------------------- the app


def build_openai_app(backend: GenerationBackend, *, limits: Optional[ApiLimits] = None,
                     unavailable_exceptions: tuple[type[BaseException], ...] = ()) -> FastAPI:
    """The FastAPI application serving the OpenAI-compatible API over ``backend``.

    ``unavailable_exceptions``: exception types (raised by the backend) answered with 503, e.g. an
    admission-control rejection; ``TimeoutError`` (``asyncio.TimeoutError``) and Ray Serve's
    ``BackPressureError`` and ``DeploymentUnavailableError`` are 503 without being listed.
    """
    limits = limits or ApiLimits()
    kinds = tuple(unavailable_exceptions)
    app = FastAPI(title="hsd-serve", summary="OpenAI-compatible lossless speculative decoding")
    app.state.backend = backend
    app.state.limits = limits
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> Response:
        return _from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            kind = "not_found_error"
        return ApiError(exc.status_code, str(exc.detail), None, kind,
                        getattr(exc, "headers", None)).response()

    @app.exception_handler(ApiError)
    async def _on_api_error(_: Request, exc: ApiError) -> Response:
        return exc.response()

    async def serve(request: Request, req: GenerationRequest, shape: _Shape,
                    stream: bool) -> Response:
        pump = _Pump(backend.stream(req))
        try:
            first = await pump.next()
            if first is None:
                raise RuntimeError("the engine stream ended without a result")
        except RequestError as exc:
            await pump.aclose()
            return _engine_error(exc, shape.chat).response()
        except Exception as exc:  # noqa: BLE001
            await pump.aclose()
            err = _unavailable(exc, kinds)
            if err is None:
                log.exception("generation failed")
                err = _server_error(exc)
            return err.response()
        except BaseException:  # cancelled: the client is gone
            await pump.aclose()
            raise
        if stream:
            return _EventStream(_events(request, pump, first, shape),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            chunk = first
            while chunk.result is None:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody to answer; finally frees caches
                chunk = await pump.next()
                if chunk is None:
                    raise RuntimeError("the engine stream ended without a result")
            return _json(shape.full(chunk.result))
        except RequestError as exc:
            return _engine_error(exc, shape.chat).response()
        except Exception as exc:  # noqa: BLE001
            err = _unavailable(exc, kinds)
            if err is None:
                log.exception("generation failed")
                err = _server_error(exc)
            return err.response()
        finally:
            await pump.aclose()

    async def _events(request: Request, pump: _Pump, first: Chunk,
                      shape: _Shape) -> AsyncIterator[bytes]:
        try:
            chunk: Optional[Chunk] = first
            if shape.chat:
                yield _sse(shape.piece("", role=True))
            while True:
                if chunk is None:
                    raise RuntimeError("the engine stream ended without a result")
                if chunk.result is not None:
                    yield _sse(shape.last(chunk.result, chunk.text))
                    break
                if chunk.text:
                    yield _sse(shape.piece(chunk.text))
                if await request.is_disconnected():
                    return  # finally closes the engine stream
                chunk = await pump.next()
        except RequestError as exc:
            yield _sse(_engine_error(exc, shape.chat).body())
        except Exception as exc:  # noqa: BLE001
            err = _unavailable(exc, kinds)
            if err is None:
                log.exception("generation failed mid-stream")
                err = _server_error(exc)
            yield _sse(err.body())
        finally:
            await pump.aclose()
        yield _DONE

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = _validate(CompletionBody, await _read_json(request, limits))
            req, seed = completion_request(body, limits)
        except ApiError as exc:
            return exc.response()
        return await serve(request, req, _Shape(False, backend.model_name, seed),
                           bool(body.stream))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = _validate(ChatCompletionBody, await _read_json(request, limits))
            max_tokens = chat_request_checks(body)
            messages = chat_messages(body, limits)
            try:
                prompt = backend.chat_prompt(messages)
            except RequestError as exc:
                raise _engine_error(exc, True) from None
            except Exception as exc:  # noqa: BLE001 - a broken template is the server's fault
                log.exception("rendering the chat prompt failed")
                raise _server_error(exc) from None
            if not prompt:
                raise _bad("messages", "messages: render to an empty prompt")
            if len(prompt) > limits.max_prompt_chars + 65536:
                raise _bad("messages", f"messages: the rendered prompt is longer than "
                                       f"{limits.max_prompt_chars} characters")
            req, seed = _common_request(body, prompt, max_tokens, limits,
                                        "max_tokens" if body.max_tokens is not None
                                        else "max_completion_tokens")
        except ApiError as exc:
            return exc.response()
        return await serve(request, req, _Shape(True, backend.model_name, seed),
                           bool(body.stream))

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [
            {"id": backend.model_name, "object": "model", "created": started,
             "owned_by": "hsd-serve"}]})

    @app.get("/health")
    async def health() -> Response:
        try:
            info = await backend.health()
        except Exception as exc:  # noqa: BLE001
            return _json({"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}, 503)
        if not isinstance(info, dict):
            info = {"status": "ok" if info else "unavailable"}
        status = info.get("status", "ok")
        return _json({**info, "status": status}, 200 if status == "ok" else 503)

    return app
