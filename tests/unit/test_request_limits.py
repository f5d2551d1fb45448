"""One ``RequestLimits``: every front door (in-process ``validate``, gRPC ``request_from_proto``,
the OpenAI builders) refuses the same request naming the same field, and a limit changed in the
limits object changes what every door accepts."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

from hsd_serve.engine.types import (MAX_LOOKAHEAD, GenerationRequest, RequestError,
                                    RequestLimits)
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.serve.config import AppConfig, service_limits
from hsd_serve.serve.convert import request_from_proto
from hsd_serve.serve.openai_api import fallback_chat_prompt
from hsd_serve.serve.openai_errors import ApiError
from hsd_serve.serve.openai_models import ChatCompletionBody, CompletionBody
from hsd_serve.serve.openai_requests import chat_request, completion_request

LIMITS = service_limits(max_prompt_chars=40, max_tokens_limit=16, default_max_tokens=8)


def engine_field(limits: RequestLimits, prompt: str = "hello", max_tokens: Optional[int] = None,
                 method: Optional[str] = None, lookahead: Optional[int] = None,
                 stop: tuple = ()) -> Optional[str]:
    """The field ``GenerationRequest.validate(limits)`` names (None: valid)."""
    req = GenerationRequest(
        prompt, max_new_tokens=limits.default_max_tokens if max_tokens is None else max_tokens,
        method=limits.default_method if method is None else method,
        lookahead=limits.default_lookahead if lookahead is None else lookahead, stop=stop)
    try:
        req.validate(limits)
    except RequestError as exc:
        return exc.field
    return None


def proto_field(limits: RequestLimits, **fields) -> Optional[str]:
    msg = pb.GenerateRequest(**{"prompt": "hello", **fields})
    try:
        request_from_proto(pb.GenerateRequest.FromString(msg.SerializeToString()), limits)
    except RequestError as exc:
        return exc.field
    return None


def openai_param(limits: RequestLimits, chat: bool = False, **fields) -> Optional[str]:
    """The ``param`` of the OpenAI builder's 400 (None: valid); ``prompt`` goes into one user
    message for chat."""
    prompt = fields.pop("prompt", "hello")
    try:
        if chat:
            body = ChatCompletionBody.model_validate(
                {"messages": [{"role": "user", "content": prompt}], **fields})
            chat_request(body, limits, lambda messages: messages[0]["content"])
        else:
            completion_request(CompletionBody.model_validate({"prompt": prompt, **fields}),
                               limits)
    except ApiError as exc:
        assert exc.status == 400
        return exc.param
    return None


# (the request, as engine / proto / OpenAI fields) -> field named by engine, proto, OpenAI
BAD = [
    (dict(prompt="x" * 41), "prompt", "prompt"),
    (dict(prompt=""), "prompt", "prompt"),
    (dict(method="beam"), "method", "method"),
    (dict(max_tokens=17), "max_new_tokens", "max_tokens"),
    (dict(lookahead=MAX_LOOKAHEAD + 1), "lookahead", "lookahead"),
    (dict(stop=("a",) * 17), "stop", "stop"),
    (dict(stop=("ok", "")), "stop", "stop"),
    (dict(stop=("x" * 1025,)), "stop", "stop"),
]


@pytest.mark.parametrize("fields,engine,api", BAD, ids=[f"{b[0]}"[:40] for b in BAD])
def test_every_front_door_refuses_the_same_request_by_the_same_field(fields, engine, api):
    assert engine_field(LIMITS, **fields) == engine
    wire = {k: list(v) if k == "stop" else v for k, v in fields.items()}
    # gRPC's method is an enum: an unknown method is a value this release does not know
    proto = {**wire, "method": 99} if "method" in wire else wire
    assert proto_field(LIMITS, **proto) == api
    assert openai_param(LIMITS, **wire) == api


def test_chat_names_its_own_fields():
    assert openai_param(LIMITS, chat=True, max_completion_tokens=17) == "max_completion_tokens"
    assert openai_param(LIMITS, chat=True, max_tokens=17) == "max_tokens"
    assert openai_param(LIMITS, chat=True, prompt="") == "messages"  # renders to ""
    assert openai_param(LIMITS, chat=True, method="beam") == "method"
    assert openai_param(LIMITS, chat=True, max_completion_tokens=16) is None


def test_the_lookahead_cap_is_one_field():
    for cap in (8, MAX_LOOKAHEAD):
        limits = dataclasses.replace(LIMITS, max_lookahead=cap)
        assert engine_field(limits, lookahead=cap) is None
        assert proto_field(limits, lookahead=cap) is None
        assert openai_param(limits, lookahead=cap) is None
        assert openai_param(limits, chat=True, lookahead=cap) is None
        assert engine_field(limits, lookahead=cap + 1) == "lookahead"
        assert proto_field(limits, lookahead=cap + 1) == "lookahead"
        assert openai_param(limits, lookahead=cap + 1) == "lookahead"
        assert openai_param(limits, chat=True, lookahead=cap + 1) == "lookahead"
    with pytest.raises(ValueError):  # no front door may allow more than the engine checks
        dataclasses.replace(LIMITS, max_lookahead=MAX_LOOKAHEAD + 1)
    with pytest.raises(ValueError):  # the default must fit under the cap
        dataclasses.replace(LIMITS, max_lookahead=3, default_lookahead=4)


def test_the_stop_limits_are_fields():
    limits = dataclasses.replace(LIMITS, max_stop_strings=2, max_stop_chars=3)
    for fields, field in ((dict(stop=["a", "b"]), None), (dict(stop=["a", "b", "c"]), "stop"),
                          (dict(stop=["abc"]), None), (dict(stop=["abcd"]), "stop")):
        assert engine_field(limits, stop=tuple(fields["stop"])) == field
        assert proto_field(limits, **fields) == field
        assert openai_param(limits, **fields) == field


def test_defaults_come_from_the_limits():
    limits = dataclasses.replace(LIMITS, default_max_tokens=3, default_lookahead=7,
                                 default_method="slem")
    req = request_from_proto(pb.GenerateRequest(prompt="hi"), limits)
    assert (req.max_new_tokens, req.lookahead, req.method) == (3, 7, "slem")
    req, _ = completion_request(CompletionBody.model_validate({"prompt": "hi"}), limits)
    assert (req.max_new_tokens, req.lookahead, req.method) == (3, 7, "slem")


def test_in_process_limits_are_the_engine_defaults():
    req = GenerationRequest("p")
    limits = RequestLimits()
    assert (req.max_new_tokens, req.lookahead, req.method) == \
        (limits.default_max_tokens, limits.default_lookahead, limits.default_method)
    # in-process: up to a million tokens, no prompt length limit, an empty prompt goes on to
    # the tokenizer (which may give BOS); the service refuses all three
    for fields in (dict(max_tokens=1_000_000), dict(prompt="x" * 2_000_000), dict(prompt="")):
        assert engine_field(limits, **fields) is None
        assert engine_field(service_limits(), **fields) == \
            ("max_new_tokens" if "max_tokens" in fields else "prompt")
    GenerationRequest("p", max_new_tokens=1_000_000).validate()
    with pytest.raises(RequestError, match="max_new_tokens"):
        GenerationRequest("p", max_new_tokens=1_000_001).validate()


def test_service_limits_come_from_the_config():
    assert service_limits() == AppConfig().request_limits() == RequestLimits(
        max_prompt_chars=1_000_000, max_tokens_limit=4096, default_max_tokens=128,
        default_lookahead=4, default_method="auto", allow_empty_prompt=False)
    cfg = AppConfig(default_max_tokens=500, max_tokens_limit=64, default_lookahead=9,
                    default_method="tli", max_prompt_chars=77)
    assert cfg.request_limits() == RequestLimits(
        max_prompt_chars=77, max_tokens_limit=64, default_max_tokens=64, default_lookahead=9,
        default_method="tli", allow_empty_prompt=False)
    for bad in (dict(default_lookahead=MAX_LOOKAHEAD + 1), dict(default_lookahead=0),
                dict(default_method="beam"), dict(max_tokens_limit=0),
                dict(max_tokens_limit=1_000_001), dict(max_prompt_chars=0),
                dict(default_max_tokens=0)):
        with pytest.raises(ValueError):
            AppConfig(**bad)


@pytest.mark.parametrize("bad", [
    dict(max_tokens_limit=0), dict(max_tokens_limit=1_000_001), dict(default_max_tokens=0),
    dict(max_tokens_limit=5, default_max_tokens=10), dict(max_lookahead=0),
    dict(default_lookahead=0), dict(default_method="beam"), dict(max_prompt_chars=0),
    dict(max_stop_strings=-1), dict(max_stop_strings=17), dict(max_stop_chars=0),
    dict(max_stop_chars=1025), dict(max_tokens_limit=True), dict(default_lookahead=2.0)])
def test_limits_check_themselves(bad):
    with pytest.raises(ValueError, match="RequestLimits"):
        RequestLimits(**bad)
