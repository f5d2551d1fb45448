"""The OpenAI-compatible HTTP API over a real in-process engine (tiny random models, no mocks)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import METHODS, GenerationRequest
from hsd_serve.serve.config import service_limits
from hsd_serve.serve.openai_api import (CoordinatorBackend, build_openai_app, fallback_chat_prompt,
                                        render_chat)

PROMPT = "def fib(n):\n    if n < 2:\n"
MESSAGES = [{"role": "system", "content": "You write code."},
            {"role": "user", "content": "Print hello, café 東京."}]
HSD_KEYS = {"method", "rounds", "drafted", "accepted", "acceptance_rate", "tokens_per_round",
            "wall_s", "tokens_per_s", "fallback_rounds"}


@pytest.fixture(scope="module")
def engine(loaded_model, families):
    return Engine(loaded_model(families[0]), loaded_model(families[1], seed=1))


@pytest.fixture(scope="module")
def backend(engine):
    return CoordinatorBackend(engine.coordinator, engine.target.tokenizer, "tiny-target")


@pytest.fixture(scope="module")
def app(backend):
    return build_openai_app(backend)


@pytest.fixture(scope="module")
def small_app(backend):
    """Tight limits: the bad-input table and the fuzzer cannot start long generations."""
    return build_openai_app(backend, limits=service_limits(max_prompt_chars=4000,
                                                           max_tokens_limit=8,
                                                           default_max_tokens=2))


async def _request(app, method: str, path: str, **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, **kw)


def call(app, method: str, path: str, **kw) -> httpx.Response:
    return asyncio.run(_request(app, method, path, **kw))


def sse_events(resp: httpx.Response) -> list:
    assert resp.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in resp.text.split("\n\n") if b.strip()]
    out = []
    for b in blocks:
        assert b.startswith("data: "), b
        data = b[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_no_leaks(engine):
    assert not engine.target_worker.sessions
    assert not engine.drafter_worker.sessions


# ------------------------------------------------------------------ same output as the engine


@pytest.mark.parametrize("method,temperature,seed", [("auto", 0.0, None), ("slem", 0.0, None),
                                                      ("tli", 0.8, 7), ("ar", 1.0, 3)])
def test_completion_matches_engine(app, engine, method, temperature, seed):
    body = {"model": "whatever", "prompt": PROMPT, "max_tokens": 8, "temperature": temperature,
            "method": method, "lookahead": 3, "user": "u1", "logit_bias": {},
            "presence_penalty": 0, "some_future_field": [1, 2]}
    if seed is not None:
        body["seed"] = seed
    r = call(app, "POST", "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    want = engine.generate(GenerationRequest(
        PROMPT, max_new_tokens=8, method=method, lookahead=3,
        params=SamplingParams(temperature=temperature, seed=d["hsd"]["seed"])))
    assert d["object"] == "text_completion" and d["id"].startswith("cmpl-")
    assert d["model"] == "tiny-target" and isinstance(d["created"], int)
    (choice,) = d["choices"]
    assert choice["index"] == 0
    assert choice["text"] == want.text
    assert choice["finish_reason"] == want.finish_reason
    assert d["usage"] == {"prompt_tokens": want.stats.prompt_tokens,
                          "completion_tokens": len(want.token_ids),
                          "total_tokens": want.stats.prompt_tokens + len(want.token_ids)}
    assert HSD_KEYS <= set(d["hsd"])
    assert d["hsd"]["method"] == want.stats.method
    if seed is not None:
        assert d["hsd"]["seed"] == seed
    assert_no_leaks(engine)


def test_list_prompt_and_stop(app, engine):
    full = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8, method="ar"))
    stop = full.text[2:4] if len(full.text) >= 4 else None
    body = {"prompt": [PROMPT], "max_tokens": 8, "temperature": 0, "method": "slem"}
    if stop:
        body["stop"] = stop
    r = call(app, "POST", "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    want = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8, method="slem",
                                             stop=(stop,) if stop else ()))
    assert r.json()["choices"][0]["text"] == want.text
    assert r.json()["choices"][0]["finish_reason"] == want.finish_reason


def test_chat_matches_engine_with_fallback_template(app, engine, backend):
    prompt = backend.chat_prompt(MESSAGES)
    if not getattr(engine.target.tokenizer.hf, "chat_template", None):
        assert prompt == fallback_chat_prompt(MESSAGES)
        assert prompt == "system: You write code.\nuser: Print hello, café 東京.\nassistant:"
    body = {"model": "x", "messages": MESSAGES, "max_completion_tokens": 8, "temperature": 0,
            "tools": [], "logprobs": False, "response_format": {"type": "text"}}
    r = call(app, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    want = engine.generate(GenerationRequest(prompt, max_new_tokens=8,
                                             params=SamplingParams(temperature=0.0)))
    assert d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-")
    (choice,) = d["choices"]
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason
    assert d["usage"]["completion_tokens"] == len(want.token_ids)
    assert d["usage"]["prompt_tokens"] == want.stats.prompt_tokens
    assert d["hsd"]["method"] == want.stats.method
    # text content parts and the developer role are accepted
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You write code."}]},
             {"role": "user", "content": [{"type": "text", "text": "Print hello, "},
                                          {"type": "text", "text": "café 東京."}]}]
    r2 = call(app, "POST", "/v1/chat/completions",
              json={"messages": parts, "max_tokens": 8, "temperature": 0})
    assert r2.status_code == 200, r2.text
    assert r2.json()["choices"][0]["message"]["content"] == want.text


def test_chat_template_path(families):
    """With a chat template: exactly apply_chat_template, minus a BOS the tokenizer adds itself."""
    from tests.support.models import load_family_tokenizer

    fams = [f for f in ("llama2", "mistral-v0.1", "phi-3") if f in families]
    if not fams:
        pytest.skip("no SentencePiece family available")
    hf = load_family_tokenizer(fams[0])
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
                        "{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(hf.bos_token)
    assert render_chat(hf, MESSAGES) == rendered[len(hf.bos_token):]  # encode adds BOS again
    hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    from hsd_serve.engine.types import RequestError

    with pytest.raises(RequestError) as info:
        render_chat(hf, MESSAGES)
    assert info.value.field == "messages"


# ------------------------------------------------------------------ streaming


def test_stream_completion_concatenates_to_full_text(app, engine):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "method": "slem",
            "lookahead": 2}
    full = call(app, "POST", "/v1/completions", json=body).json()
    r = call(app, "POST", "/v1/completions", json={**body, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert last["usage"] == full["usage"]
    assert HSD_KEYS <= set(last["hsd"])
    assert_no_leaks(engine)


def test_stream_chat(app, engine):
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    full = call(app, "POST", "/v1/chat/completions", json=body).json()
    events = sse_events(call(app, "POST", "/v1/chat/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == full["usage"]


def test_stream_bad_request_is_a_400_not_a_stream(app):
    r = call(app, "POST", "/v1/completions",
             json={"prompt": PROMPT, "stream": True, "method": "sd", "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "method"


@pytest.mark.parametrize("how", ["disconnect", "cancel"])
def test_client_disconnect_stops_generation_and_frees_caches(app, engine, how):
    """A client that goes away after the first chunk: generation stops, caches are freed.

    ``disconnect``: the server sees ``http.disconnect`` (uvicorn); ``cancel``: the handler task is
    cancelled mid-stream, which is what Ray Serve does when the HTTP client goes away.
    """
    body = json.dumps({"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "method": "slem",
                       "lookahead": 1, "stream": True}).encode()
    full = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8, method="slem",
                                             lookahead=1))
    rounds_full = full.stats.rounds

    async def go():
        sent: list[dict] = []
        got_data = asyncio.Event()
        never = asyncio.Event()
        calls = 0

        async def receive():
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            await (got_data if how == "disconnect" else never).wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                got_data.set()
                if how == "cancel":
                    asyncio.get_running_loop().call_soon(task.cancel)

        scope = {"type": "http", "asgi": {"version": "3.0",
                                          "spec_version": "2.3" if how == "disconnect" else "2.4"},
                 "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("test", 1), "server": ("test", 80)}
        task = asyncio.ensure_future(app(scope, receive, send))
        try:
            await task
        except asyncio.CancelledError:
            assert how == "cancel"
        assert_no_leaks(engine)  # freed before the handler returned, not later by GC
        return sent

    sent = asyncio.run(go())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert data.startswith(b"data: ")
    assert b"[DONE]" not in data  # cut short
    assert data.count(b"data: ") < rounds_full
    assert_no_leaks(engine)


# ------------------------------------------------------------------ models and health


def test_models_and_health(app):
    r = call(app, "GET", "/v1/models")
    assert r.status_code == 200
    d = r.json()
    assert d["object"] == "list" and [m["id"] for m in d["data"]] == ["tiny-target"]
    assert d["data"][0]["object"] == "model"
    h = call(app, "GET", "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["drafter"] is True
    nf = call(app, "GET", "/v1/nothing")
    assert nf.status_code == 404 and nf.json()["error"]["param"] is None
    wrong = call(app, "GET", "/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_server_defaults(backend, engine):
    app = build_openai_app(backend, limits=service_limits(default_max_tokens=3,
                                                          default_method="ar",
                                                          default_lookahead=2))
    d = call(app, "POST", "/v1/completions", json={"prompt": PROMPT, "temperature": 0}).json()
    want = engine.generate(GenerationRequest(PROMPT, max_new_tokens=3, method="ar"))
    assert d["hsd"]["method"] == "ar" and d["choices"][0]["text"] == want.text
    assert d["usage"]["completion_tokens"] == len(want.token_ids) <= 3
    with pytest.raises(ValueError):
        service_limits(default_method="fast")


def test_fastapi_validation_errors_are_400(backend):
    app = build_openai_app(backend)

    @app.get("/extra")
    async def extra(k: int):  # a route added by the deployment: FastAPI validates it
        return {"k": k}

    r = call(app, "GET", "/extra?k=x")
    assert r.status_code == 400 and r.json()["error"]["param"] == "k"


def test_unhealthy_backend_and_engine_failure_give_json_errors(backend):
    class Broken:
        model_name = "broken"

        async def _fail(self, req):
            raise RuntimeError("boom")
            yield  # pragma: no cover

        def stream(self, req):
            return self._fail(req)

        def chat_prompt(self, messages):
            return fallback_chat_prompt(messages)

        async def health(self):
            return {"status": "loading"}

    class MidStream(Broken):
        async def _fail(self, req):
            async for chunk in backend.stream(req):
                if chunk.result is None:
                    yield chunk
            raise RuntimeError("boom")

    class Overloaded(Broken):
        async def _fail(self, req):
            raise TimeoutError("no target replica within 30 s")
            yield  # pragma: no cover

    app = build_openai_app(Broken())
    r = call(app, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = call(build_openai_app(Overloaded()), "POST", "/v1/chat/completions",
             json={"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_overloaded"
    r = call(build_openai_app(Broken(), unavailable_exceptions=(RuntimeError,)), "POST",
             "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503
    assert call(app, "GET", "/health").status_code == 503
    events = sse_events(call(build_openai_app(MidStream()), "POST", "/v1/completions",
                             json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                   "method": "ar", "stream": True}))
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"


# ------------------------------------------------------------------ bad input -> 400

C, CH = "/v1/completions", "/v1/chat/completions"
OK = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
OK_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}

BAD = [
    (C, {"prompt": 5}, "prompt"),
    (C, {"prompt": ""}, "prompt"),
    (C, {"prompt": []}, "prompt"),
    (C, {"prompt": ["a", "b"]}, "prompt"),
    (C, {"prompt": [1, 2, 3]}, "prompt"),
    (C, {"prompt": None}, "prompt"),
    (C, {"prompt": "x" * 4001}, "prompt"),
    (C, {"prompt": "! " * 1500}, "prompt"),  # more tokens than the target's context
    (C, {"max_tokens": 0}, "max_tokens"),
    (C, {"max_tokens": -3}, "max_tokens"),
    (C, {"max_tokens": 9}, "max_tokens"),
    (C, {"max_tokens": "2"}, "max_tokens"),
    (C, {"max_tokens": 2.5}, "max_tokens"),
    (C, {"max_tokens": True}, "max_tokens"),
    (C, {"max_tokens": 10**30}, "max_tokens"),
    (C, {"temperature": -0.1}, "temperature"),
    (C, {"temperature": "hot"}, "temperature"),
    (C, {"temperature": 10**400}, "temperature"),
    (C, {"top_p": 0}, "top_p"),
    (C, {"top_p": 1.5}, "top_p"),
    (C, {"top_k": -2}, "top_k"),
    (C, {"top_k": 1.5}, "top_k"),
    (C, {"seed": -1}, "seed"),
    (C, {"seed": 2**63}, "seed"),
    (C, {"seed": "x"}, "seed"),
    (C, {"stop": 5}, "stop"),
    (C, {"stop": [1]}, "stop"),
    (C, {"stop": [""]}, "stop"),
    (C, {"stop": ["x"] * 17}, "stop"),
    (C, {"stream": "yes"}, "stream"),
    (C, {"n": 2}, "n"),
    (C, {"n": 0}, "n"),
    (C, {"best_of": 2}, "best_of"),
    (C, {"echo": True}, "echo"),
    (C, {"logprobs": 1}, "logprobs"),
    (C, {"suffix": "x"}, "suffix"),
    (C, {"presence_penalty": 0.5}, "presence_penalty"),
    (C, {"frequency_penalty": 1}, "frequency_penalty"),
    (C, {"logit_bias": {"1": 5}}, "logit_bias"),
    (C, {"method": "fast"}, "method"),
    (C, {"method": "sd"}, "method"),  # the pair does not share a vocabulary
    (C, {"lookahead": 0}, "lookahead"),
    (C, {"lookahead": 65}, "lookahead"),
    (C, {"adaptive_lookahead": "yes"}, "adaptive_lookahead"),
    (C, {"user": 5}, "user"),
    (CH, {"messages": []}, "messages"),
    (CH, {"messages": "hi"}, "messages"),
    (CH, {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    (CH, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (CH, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CH, {"messages": [{"role": "user", "content": "a"}, "b"]}, "messages[1]"),
    (CH, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    (CH, {"messages": [{"role": "user", "content": "x" * 4001}]}, "messages"),
    (CH, {"max_completion_tokens": 0, "max_tokens": None}, "max_completion_tokens"),
    (CH, {"logprobs": True}, "logprobs"),
    (CH, {"top_logprobs": 2}, "top_logprobs"),
    (CH, {"tools": [{"type": "function"}]}, "tools"),
    (CH, {"response_format": {"type": "json_object"}}, "response_format"),
    (CH, {"temperature": -1}, "temperature"),
    (CH, {"method": "sd"}, "method"),
]


@pytest.mark.parametrize("path,patch,param", BAD, ids=[f"{p[-11:]}-{x}" for p, _, x in BAD])
def test_bad_input_is_400_naming_the_field(small_app, engine, path, patch, param):
    body = {**(OK if path == C else OK_CHAT), **patch}
    r = call(small_app, "POST", path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] is None
    assert err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    assert_no_leaks(engine)


@pytest.mark.parametrize("raw,param", [
    (b"{", None),
    (b"", None),
    (b"[1, 2]", None),
    (b'"prompt"', None),
    (b"\xff\xfe{}", None),
    (b'{"prompt": "Hello", "temperature": NaN}', None),
    (b'{"prompt": "Hello", "temperature": Infinity}', None),
    (b'{"prompt": "Hello", "temperature": 1e400}', "temperature"),
    (b'{"prompt": "Hello", "extra": -Infinity}', None),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "Hello", "stop": ["\\udfff"]}', "stop"),
    (b"[" * 100_000 + b"]" * 100_000, None),
])
def test_bad_body_is_400(small_app, raw, param):
    r = call(small_app, "POST", C, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_bad_chat_body_is_400(small_app):
    raw = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    r = call(small_app, "POST", CH, content=raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


# ------------------------------------------------------------------ fuzzing: never a 5xx

JSON_LEAF = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
             | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0])
             | st.text(max_size=12)
             | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1,
                       max_size=2))
JSON = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=3)
                    | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
FIELD_VALUES = {
    "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=2),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]),
         "content": st.text(max_size=20) | JSON}), max_size=3),
    "max_tokens": st.integers(-2, 10),
    "max_completion_tokens": st.integers(-2, 10),
    "temperature": st.floats(-1, 3) | st.sampled_from([0, 1, 1e-9, 1e-300, 5e-324]),
    "top_p": st.floats(-0.5, 1.5) | st.sampled_from([1e-300, 1, 0]),
    "top_k": st.integers(-3, 50),
    "seed": st.integers(-5, 2**64),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4),
    "stream": st.booleans(),
    "n": st.integers(-1, 3),
    "method": st.sampled_from(METHODS + ("x",)),
    "lookahead": st.integers(-1, 70),
    "adaptive_lookahead": st.booleans(),
    "presence_penalty": st.sampled_from([0, 0.0, 1]),
    "logit_bias": st.sampled_from([{}, {"5": 1}]),
    "user": st.text(max_size=5),
    "echo": st.booleans(),
    "best_of": st.integers(0, 2),
    "logprobs": st.booleans() | st.integers(0, 2),
    "stream_options": st.just({"include_usage": True}),
    "tools": st.sampled_from([[], [{"type": "function"}]]),
    "unknown_field": JSON,
}


def test_fuzzed_fields_never_give_5xx(small_app, engine):
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(chat=st.booleans(), data=st.data())
    def one(chat, data):
        field = data.draw(st.sampled_from(sorted(FIELD_VALUES)), label="field")
        value = data.draw(JSON | FIELD_VALUES[field], label="value")
        body = dict(OK_CHAT if chat else OK)
        if data.draw(st.booleans(), label="stream"):
            body["stream"] = True
        body[field] = value
        raw = json.dumps(body)  # NaN/Infinity become (invalid) JSON literals on purpose
        r = call(small_app, "POST", CH if chat else C, content=raw)
        assert r.status_code in (200, 400), (r.status_code, r.text)
        if r.status_code == 400:
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error"
            assert err["param"] is None or isinstance(err["param"], str)
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = sse_events(r)
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")

    one()
    assert_no_leaks(engine)
    r = call(small_app, "POST", C, json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                         "method": "slem"})
    assert r.status_code == 200
    want = engine.generate(GenerationRequest(PROMPT, max_new_tokens=4, method="slem"))
    assert r.json()["choices"][0]["text"] == want.text
