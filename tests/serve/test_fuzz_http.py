"""Hostile HTTP input, property-based, in process (thousands of cases in seconds): every body —
wrong types, huge numbers, NaN/Infinity literals, lone surrogates, NUL, RTL, 1 MB prompts,
unknown fields, empty or enormous stop strings, malformed JSON — is answered 400 with an OpenAI
error naming the field, or 200 with a well-formed completion; never a 5xx, a crash or a hang.

The bulk runs against a backend that does the engine's real request preparation (validation,
tokenization, context check on a real tokenizer) and then answers at once; a smaller run goes
through the real in-process engine, which must still answer a normal request exactly after."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from hsd_serve.engine.engine import Coordinator, TargetInfo
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import (METHODS, Chunk, GenerationRequest, GenerationResult,
                                    RequestStats)
from hsd_serve.serve.config import service_limits
from hsd_serve.serve.openai_api import CoordinatorBackend, build_openai_app, render_chat

C, CH = "/v1/completions", "/v1/chat/completions"
FAST = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.large_base_example,
                                   HealthCheck.function_scoped_fixture])


class PreparingBackend:
    """Runs the coordinator's ``prepare`` (what a request must pass before any round), then
    streams two fixed chunks: the HTTP layer sees real RequestErrors and real successes."""

    model_name = "fuzz"

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.started = 0
        self.closed = 0

    async def stream(self, req: GenerationRequest):
        method, ids = self.coordinator.prepare(req)
        self.started += 1
        try:
            yield Chunk([ids[-1]], "a")
            stats = RequestStats(method=method, prompt_tokens=len(ids), rounds=1, emitted=2)
            yield Chunk([ids[0]], "b", result=GenerationResult(
                text="ab", token_ids=[ids[-1], ids[0]], finish_reason="length", stats=stats))
        finally:
            self.closed += 1

    def chat_prompt(self, messages):
        return render_chat(self.coordinator.info.tokenizer, messages)

    async def health(self):
        return {"status": "ok"}


class Client:
    """One event loop and one ASGI client for thousands of calls."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                        base_url="http://fuzz", timeout=30)

    def post(self, path: str, content) -> httpx.Response:
        return self.loop.run_until_complete(asyncio.wait_for(
            self.client.post(path, content=content,
                             headers={"content-type": "application/json"}), 60))

    def close(self):
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def target(loaded_model):
    return loaded_model("mistral-v0.1")


@pytest.fixture(scope="module")
def preparing(target):
    backend = PreparingBackend(Coordinator(
        target=None, drafter=object(),
        info=TargetInfo(target.tokenizer, target.eos_ids, target.max_context)))
    client = Client(build_openai_app(backend, limits=service_limits(max_tokens_limit=64,
                                                                    default_max_tokens=4)))
    yield backend, client
    client.close()


def check(r: httpx.Response) -> None:
    assert r.status_code in (200, 400), (r.status_code, r.text[:500])
    try:  # outcome statistics (pytest --hypothesis-show-statistics)
        event(f"HTTP {r.status_code}" + (f" param={r.json()['error']['param']}"
                                         if r.status_code == 400 else ""))
    except InvalidArgument:  # not inside a hypothesis test
        pass
    if r.status_code == 400:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        assert err["param"] is None or isinstance(err["param"], str)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        blocks = [b for b in r.text.split("\n\n") if b.strip()]
        assert blocks[-1] == "data: [DONE]"
        events = [json.loads(b[len("data: "):]) for b in blocks[:-1]]
        assert all("error" not in e for e in events), events
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        body = r.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 0


# ---------------------------------------------------------------------------- strategies

CHARS = st.characters()  # surrogates included: json.dumps writes them as \\udXXX escapes
NASTY = st.sampled_from([
    "\x00", "\u202e", "\u202edcba\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "\ufeff", "\uffff",
    "\ud800", "\udfff", "a\ud83dz", "\U0010ffff", "e\u0301" * 30, "</s>", "<|endoftext|>",
    "\r\n", " " * 200, "%s%n{}", "A" * 1025, "é" * 1500])
TEXT = st.one_of(st.text(CHARS, max_size=30), NASTY,
                 st.lists(NASTY | st.text(CHARS, max_size=5), max_size=5).map("".join))
HUGE_INTS = st.one_of(st.integers(), st.sampled_from(
    [0, -1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, -2**63, 10**30, 10**400]))
FLOATS = st.one_of(st.floats(), st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e-300, 1e308, 1e-6, 0.5, 1.0, 2.0]))
LEAF = st.one_of(st.none(), st.booleans(), HUGE_INTS, FLOATS, TEXT)
ANY = st.recursive(LEAF, lambda c: st.lists(c, max_size=3)
                   | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)
STOP = st.one_of(TEXT, st.just(""), st.lists(TEXT | st.just(""), max_size=20),
                 st.text(max_size=1100, min_size=1000), st.lists(st.just("x" * 5000), max_size=2))
FIELDS = {
    "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(HUGE_INTS, max_size=3)),
    "max_tokens": HUGE_INTS, "max_completion_tokens": HUGE_INTS,
    "temperature": FLOATS | HUGE_INTS, "top_p": FLOATS | HUGE_INTS,
    "top_k": HUGE_INTS, "seed": HUGE_INTS, "n": HUGE_INTS, "lookahead": HUGE_INTS,
    "stop": STOP, "stream": st.booleans(), "adaptive_lookahead": st.booleans(),
    "method": st.sampled_from(METHODS + ("", "AR", "beam", "slem\x00")) | TEXT,
    "model": TEXT, "user": TEXT, "logit_bias": ANY, "stream_options": ANY,
    "presence_penalty": FLOATS, "frequency_penalty": FLOATS, "logprobs": ANY, "echo": ANY,
    "suffix": ANY, "best_of": HUGE_INTS, "tools": ANY, "response_format": ANY,
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | TEXT,
         "content": TEXT | st.lists(st.fixed_dictionaries(
             {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=2)
         | ANY}), max_size=4),
}
UNKNOWN_KEYS = TEXT.filter(lambda k: k not in FIELDS and k not in ("prompt", "messages"))
OK = {"prompt": "def fib(n):", "max_tokens": 4, "temperature": 0}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


@st.composite
def bodies(draw, chat: bool):
    body = dict(OK_CHAT if chat else OK)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4,
                              unique=True)):
        body[name] = draw(ANY | FIELDS[name]) if draw(st.booleans()) else draw(FIELDS[name])
    for key in draw(st.lists(UNKNOWN_KEYS, max_size=2)):
        body[key] = draw(ANY)
    if draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


def encode(body) -> str:
    """NaN/Infinity become JSON literals (not JSON: refused), lone surrogates \\udXXX escapes."""
    return json.dumps(body)


# ---------------------------------------------------------------------------- tests


@settings(max_examples=1500, **FAST)
@given(body=bodies(chat=False))
def test_completions_fuzz_never_5xx(preparing, body):
    check(preparing[1].post(C, encode(body)))


@settings(max_examples=800, **FAST)
@given(body=bodies(chat=True))
def test_chat_fuzz_never_5xx(preparing, body):
    check(preparing[1].post(CH, encode(body)))


@settings(max_examples=500, **FAST)
@given(raw=st.one_of(st.binary(max_size=200),
                     st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.sampled_from([b"{", b"}", b"[]", b"null", b"1e999", b'"\\ud800"',
                                      b'{"prompt": NaN}', b'{"prompt": "a", "prompt": 1}',
                                      b"\xef\xbb\xbf{}", b'{"prompt":"a"}\x00',
                                      b"[" * 50_000, b'{"a":' * 5000])))
def test_malformed_bodies_never_5xx(preparing, raw):
    check(preparing[1].post(C if len(raw) % 2 else CH, raw))


@pytest.mark.parametrize("prompt,status,param", [
    ("x" * 999_000, 400, "prompt"),  # admitted by size, over the target's context
    ("x" * 1_000_001, 400, "prompt"),  # over max_prompt_chars
    ("\u202e" * 300_000, 400, "prompt"),
    ("\x00" * 999_999, 400, None),  # 6 MB of \\u0000 escapes: the body itself is too large
    ("hello world " * 100, 200, None)])
def test_large_prompts(preparing, prompt, status, param):
    r = preparing[1].post(C, json.dumps({**OK, "prompt": prompt}))
    check(r)
    assert r.status_code == status, r.text[:300]
    if status == 400:
        assert r.json()["error"]["param"] == param


def test_enormous_body_is_refused_before_parsing(preparing):
    r = preparing[1].post(C, b'{"prompt": "' + b"x" * 6_000_000 + b'"}')
    assert r.status_code == 400 and r.json()["error"]["param"] is None


def test_streams_all_closed_after_fuzzing(preparing):
    backend, client = preparing
    check(client.post(C, json.dumps(OK)))
    assert backend.started == backend.closed  # no engine stream left open by any answer


@pytest.fixture(scope="module")
def engine(loaded_model, target):
    return Engine(target, loaded_model("gpt2", seed=1))


def test_real_engine_fuzz_then_normal_request(engine):
    backend = CoordinatorBackend(engine.coordinator, engine.target.tokenizer, "tiny")
    client = Client(build_openai_app(backend, limits=service_limits(max_tokens_limit=6,
                                                                    default_max_tokens=3)))

    @settings(max_examples=150, **FAST)
    @given(chat=st.booleans(), data=st.data())
    def one(chat, data):
        check(client.post(CH if chat else C, encode(data.draw(bodies(chat)))))

    try:
        one()
        assert not engine.target_worker.sessions and not engine.drafter_worker.sessions
        r = client.post(C, json.dumps({"prompt": "def fib(n):", "max_tokens": 6,
                                       "temperature": 0, "method": "slem"}))
        assert r.status_code == 200
        want = engine.generate(GenerationRequest("def fib(n):", max_new_tokens=6, method="slem"))
        assert r.json()["choices"][0]["text"] == want.text
    finally:
        client.close()


def test_lost_target_is_503_not_500(target):
    """The service's HTTP app maps the coordinator's "target replica lost" ConnectionError to 503
    (before the first chunk) or to an SSE error event of type server_overloaded (mid-stream)."""
    from types import SimpleNamespace

    from hsd_serve.serve.config import load_config
    from hsd_serve.serve.http import build_http_app

    async def stream(req):
        if req.stop:  # mid-stream failure
            yield Chunk([1], "a")
        raise ConnectionError("target replica lost and none took over within 2s")

    dep = SimpleNamespace(config=load_config({}), tokenizer=target.tokenizer, stream=stream,
                          drafter_handle=None)
    client = Client(build_http_app(dep))
    try:
        r = client.post(C, json.dumps({"prompt": "x", "max_tokens": 2}))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_overloaded"
        r = client.post(C, json.dumps({"prompt": "x", "max_tokens": 2, "stream": True,
                                       "stop": ["zz"]}))
        assert r.status_code == 200
        blocks = [b for b in r.text.split("\n\n") if b.strip()]
        assert blocks[-1] == "data: [DONE]"
        assert json.loads(blocks[-2][len("data: "):])["error"]["type"] == "server_overloaded"
    finally:
        client.close()
