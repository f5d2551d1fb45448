"""Request bodies of the OpenAI-compatible API (see ``openai_api``) and their parsing: the body is
read here (not by FastAPI) with strict types, and a pydantic error becomes a 400 naming its field
(``messages[0].role``; ``null`` for a body that is not a JSON object)."""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, \
    ValidationError

from hsd_serve.engine.types import RequestLimits
from hsd_serve.serve.openai_errors import ApiError, bad

MAX_BODY_OVERHEAD = 1 << 20  # bytes of JSON allowed on top of the prompt size limit


class _Body(BaseModel):
    # strict: no coercion ("1" is no number, true no integer); NaN/inf refused; unknown ignored.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


Number = Union[StrictInt, StrictFloat]


class CommonBody(_Body):
    """The fields both endpoints share."""

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


class CompletionBody(CommonBody):
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


class ChatCompletionBody(CommonBody):
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


def from_validation(errors: list[dict]) -> ApiError:
    """The 400 for the first of pydantic's (or FastAPI's) validation errors."""
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
        return bad(None, "the request body is not valid JSON")
    return bad(param, f"{param}: {msg}" if param else msg)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limits: RequestLimits) -> dict:
    """The body as a JSON object; too large (for ``limits.max_prompt_chars``), empty or invalid
    JSON (``NaN``/``Infinity`` included) is a 400 with ``param`` null."""
    raw = await request.body()
    if limits.max_prompt_chars is not None and \
            len(raw) > limits.max_prompt_chars * 4 + MAX_BODY_OVERHEAD:
        raise bad(None, f"the request body is too large ({len(raw)} bytes)")
    if not raw.strip():
        raise bad(None, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise bad(None, "invalid JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, huge ints
        raise bad(None, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


def parse_body(model: type[BaseModel], body: dict) -> Any:
    """``body`` as ``model`` (strict types), or the 400 naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc.errors(include_url=False, include_input=False)) from None
    except RecursionError:
        raise bad(None, "the request body is nested too deeply") from None
