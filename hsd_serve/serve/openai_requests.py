"""OpenAI request bodies → the engine's ``GenerationRequest`` (see ``openai_api``).

The builders only translate: they refuse what is specific to the OpenAI shapes (fields this server
cannot honour, list prompts, chat roles, lone surrogates, OpenAI's sampling spellings), fill what
a body leaves out from the ``RequestLimits``, and let ``GenerationRequest.validate(limits)`` check
the request, its fields renamed (``max_new_tokens`` → ``max_tokens`` or
``max_completion_tokens``; ``prompt`` → ``messages`` for chat).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional, Union

from hsd_serve.core.sampling import SamplingParams, seed_for
from hsd_serve.engine.types import GenerationRequest, RequestError, RequestLimits
from hsd_serve.serve.openai_errors import bad, engine_error, server_error
from hsd_serve.serve.openai_models import ChatCompletionBody, CommonBody, CompletionBody

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "developer", "user", "assistant")
MIN_TEMPERATURE = 1e-5  # temperatures below this are greedy (as in vLLM)
CHAT_TEMPLATE_CHARS = 65536  # a rendered chat prompt may pass max_prompt_chars by this much

# fields known but not honoured: (name, accepted value?, what is accepted)
_Default = tuple[str, Callable[[Any], bool], str]
_COMMON_DEFAULTS: tuple[_Default, ...] = (
    ("n", lambda v: v == 1, "n=1"),
    ("presence_penalty", lambda v: v == 0, "0"),
    ("frequency_penalty", lambda v: v == 0, "0"),
    ("logit_bias", lambda v: not v, "an empty object"),
    ("repetition_penalty", lambda v: v == 1, "1"),
    ("min_p", lambda v: v == 0, "0"),
    ("min_tokens", lambda v: v == 0, "0"),
    ("ignore_eos", lambda v: v is False, "false"))
_COMPLETION_DEFAULTS: tuple[_Default, ...] = (
    ("best_of", lambda v: v == 1, "best_of=1"),
    ("echo", lambda v: v is False, "false"),
    ("logprobs", lambda v: False, "null"),
    ("suffix", lambda v: v == "", "an empty suffix"))
_CHAT_DEFAULTS: tuple[_Default, ...] = (
    ("logprobs", lambda v: v is False, "false"),
    ("top_logprobs", lambda v: v == 0, "0"),
    ("tools", lambda v: not v, "an empty list"),
    ("functions", lambda v: not v, "an empty list"),
    ("tool_choice", lambda v: v in ("none", "auto"), "none"),
    ("function_call", lambda v: v in ("none", "auto"), "none"),
    ("response_format", lambda v: v.get("type", "text") == "text", '{"type": "text"}'))


def _require_defaults(body: Any, table: tuple[_Default, ...]) -> None:
    for name, ok, what in table:
        v = getattr(body, name)
        if v is not None and not ok(v):
            raise bad(name, f"{name}: not supported by this server (only {what} is accepted)")


def check_text(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, f"{param}: not valid Unicode (lone surrogate)") from None


def _float(value: Union[int, float], param: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise bad(param, f"{param}: out of range") from None


def sampling(body: CommonBody) -> tuple[SamplingParams, int]:
    """(params, seed used) with OpenAI's defaults and spellings: ``temperature`` 1.0 (below 1e-5:
    greedy), ``top_p`` 1.0, ``top_k`` -1 or 0 off, no ``seed``: a fresh one when sampling."""
    temperature = 1.0 if body.temperature is None else _float(body.temperature, "temperature")
    if temperature < 0:
        raise bad("temperature", f"temperature: must be >= 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0  # below this, logits / T overflows: it is greedy decoding anyway
    top_p = 1.0 if body.top_p is None else _float(body.top_p, "top_p")
    if not 0 < top_p <= 1:
        raise bad("top_p", f"top_p: must be in (0, 1], got {top_p}")
    top_k = 0 if body.top_k is None or body.top_k == -1 else body.top_k  # -1: vLLM's "off"
    if top_k < 0:
        raise bad("top_k", f"top_k: must be >= 0 (0 or -1 disables it), got {top_k}")
    if body.seed is None:
        seed = seed_for(temperature)
    elif not 0 <= body.seed < 2**63:
        raise bad("seed", "seed: must be an integer in [0, 2**63)")
    else:
        seed = body.seed
    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as exc:  # unreachable after the checks above; kept as a safety net
        field = str(exc).split(" ", 1)[0]
        raise bad(field if field in ("temperature", "top_k", "top_p", "seed") else None,
                  str(exc)) from None
    return params, seed


def _stop(body: CommonBody) -> tuple[str, ...]:
    if body.stop is None:
        return ()
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    for s in stop:
        check_text(s, "stop")
    return stop


def common_request(body: CommonBody, prompt: str, max_tokens: Optional[int],
                   limits: RequestLimits, *, chat: bool = False,
                   max_tokens_param: str = "max_tokens") -> tuple[GenerationRequest, int]:
    """(request, seed used) from the fields both endpoints share, checked against ``limits``."""
    _require_defaults(body, _COMMON_DEFAULTS)
    req = GenerationRequest(
        prompt=prompt, stop=_stop(body), adaptive_lookahead=bool(body.adaptive_lookahead),
        max_new_tokens=limits.default_max_tokens if max_tokens is None else max_tokens,
        method=limits.default_method if body.method is None else body.method,
        lookahead=limits.default_lookahead if body.lookahead is None else body.lookahead)
    try:
        req.validate(limits)
    except RequestError as exc:
        raise engine_error(exc, chat, max_tokens_param) from None
    req.params, seed = sampling(body)
    return req, seed


def completion_request(body: CompletionBody,
                       limits: RequestLimits) -> tuple[GenerationRequest, int]:
    _require_defaults(body, _COMPLETION_DEFAULTS)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad("prompt", "prompt: a list prompt must hold exactly one string "
                                f"(got {len(prompt)} items)")
        prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("prompt", "prompt: must be a string (token-id prompts are not supported)")
    check_text(prompt, "prompt")
    return common_request(body, prompt, body.max_tokens, limits)


def chat_messages(body: ChatCompletionBody, limits: RequestLimits) -> list[dict]:
    """The messages as ``[{"role", "content"[, "name"]}]`` with string content, checked."""
    if not body.messages:
        raise bad("messages", "messages: must hold at least one message")
    out = []
    total = 0
    for i, m in enumerate(body.messages):
        if m.role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role",
                      f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        check_text(content, f"messages[{i}].content")
        total += len(content)
        if limits.max_prompt_chars is not None and total > limits.max_prompt_chars:
            raise bad("messages", f"messages: longer than {limits.max_prompt_chars} characters")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            check_text(m.name, f"messages[{i}].name")
            msg["name"] = m.name
        out.append(msg)
    return out


def chat_request_checks(body: ChatCompletionBody) -> Optional[int]:
    """Unsupported chat fields; returns the effective max_tokens."""
    _require_defaults(body, _CHAT_DEFAULTS)
    if body.max_tokens is not None and body.max_completion_tokens is not None and \
            body.max_tokens != body.max_completion_tokens:
        raise bad("max_completion_tokens",
                  "max_completion_tokens: differs from max_tokens; give one of them")
    return body.max_tokens if body.max_tokens is not None else body.max_completion_tokens


def _render(render: Callable[[list[dict]], str], messages: list[dict]) -> str:
    try:
        return render(messages)
    except RequestError as exc:
        raise engine_error(exc, True) from None
    except Exception as exc:  # noqa: BLE001 - a broken template is the server's fault
        log.exception("rendering the chat prompt failed")
        raise server_error(exc) from None


def chat_request(body: ChatCompletionBody, limits: RequestLimits,
                 render: Callable[[list[dict]], str]) -> tuple[GenerationRequest, int]:
    """(request, seed used); ``render`` turns the checked messages into the prompt text (the
    template's own text may pass ``max_prompt_chars`` by ``CHAT_TEMPLATE_CHARS``)."""
    max_tokens = chat_request_checks(body)
    prompt = _render(render, chat_messages(body, limits))
    if limits.max_prompt_chars is not None:
        limits = dataclasses.replace(limits,
                                     max_prompt_chars=limits.max_prompt_chars + CHAT_TEMPLATE_CHARS)
    param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
    return common_request(body, prompt, max_tokens, limits, chat=True, max_tokens_param=param)
