"""Client API keys: where they come from (environment, a file re-read on change), how they are
compared, and the OpenAI HTTP API refusing wrong and missing keys (401, OpenAI's error body) over
a real in-process engine, the official OpenAI client included.  Through the Ray Serve service
(HTTP and gRPC): tests/e2e/test_security_e2e.py."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd_serve.engine.local import Engine
from hsd_serve.serve.config import SecurityConfig
from hsd_serve.serve.openai_api import CoordinatorBackend, build_openai_app
from hsd_serve.serve.security import (ApiKeys, Unauthenticated, bearer_credential, client_key,
                                      parse_keys)

KEYS = ["sk-first-0123456789abcdef", "sk-second-fedcba9876543210"]


# ------------------------------------------------------------------ keys


def test_keys_from_env_and_file_and_their_checks(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# rotated weekly\n" + KEYS[1] + "\n\n")
    keys = ApiKeys.from_config(SecurityConfig(api_keys_file=str(f)),
                               {"HSD_API_KEYS": f" {KEYS[0]} , extra-key-3 "})
    assert keys.enabled and len(keys) == 3
    for k in KEYS + ["extra-key-3"]:
        assert keys.verify(k) and keys.verify_authorization(f"Bearer {k}")
        assert keys.verify_authorization(f"bearer   {k}  ")  # the scheme in any case
    for bad in (None, "", "Bearer", f"Basic {KEYS[0]}", KEYS[0], f"Bearer {KEYS[0]}x",
                f"Bearer {KEYS[0][:-1]}", "Bearer # rotated weekly", f"Bearer {KEYS[0].upper()}"):
        assert not keys.verify_authorization(bad), bad
    with pytest.raises(Unauthenticated):
        keys.check_metadata([("application", "hsd")])
    keys.check_metadata([("authorization", f"Bearer {KEYS[1]}")])
    for k in KEYS:  # never shown
        assert k not in repr(keys)


def test_no_keys_configured_means_open_and_bad_sources_are_errors(tmp_path):
    open_ = ApiKeys.from_config(SecurityConfig(), {})
    assert not open_.enabled and open_.verify(None) and open_.verify_authorization("junk")
    assert not ApiKeys.from_config(SecurityConfig(api_keys_env=None), {"HSD_API_KEYS": "k"}).enabled
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys.from_config(SecurityConfig(api_keys_file=str(tmp_path / "missing")), {})
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_config(SecurityConfig(api_keys_file=str(empty)), {})
    with pytest.raises(ValueError, match="printable ASCII") as info:
        parse_keys("good-key caf\u00e9-key", "$HSD_API_KEYS")
    assert "caf" not in str(info.value)  # the error names the source, not the key
    assert parse_keys("a,b\n# c\n d  e ", "x") == ["a", "b", "d", "e"]
    assert bearer_credential("Bearer  k ") == "k" and bearer_credential("Token k") is None
    assert client_key(None, {"HSD_API_KEY": " k "}) == "k" and client_key(None, {}) is None
    assert client_key("given", {"HSD_API_KEY": "k"}) == "given"


def test_keys_file_is_reread_on_change_and_never_falls_open(tmp_path):
    f = tmp_path / "keys"
    f.write_text(KEYS[0] + "\n")
    keys = ApiKeys(file=str(f), reload_s=0.0)
    assert keys.verify(KEYS[0]) and not keys.verify(KEYS[1])
    f.write_text(KEYS[0] + "\n" + KEYS[1] + "\n")  # rotation: add the new key ...
    os.utime(f, ns=(1, 10**18))
    assert keys.verify(KEYS[1]) and keys.verify(KEYS[0])
    f.write_text(KEYS[1] + "\n")  # ... then drop the old one
    os.utime(f, ns=(1, 2 * 10**18))
    assert keys.verify(KEYS[1]) and not keys.verify(KEYS[0])
    f.unlink()  # the file vanished: nobody gets in, the door does not open
    assert not keys.verify(KEYS[1]) and not keys.verify(None) and keys.enabled
    f.write_text(KEYS[0] + "\n")
    assert keys.verify(KEYS[0])


# ------------------------------------------------------------------ the HTTP API


@pytest.fixture(scope="module")
def engine(loaded_model, families):
    return Engine(loaded_model(families[0]), loaded_model(families[1], seed=1))


@pytest.fixture(scope="module")
def keyed_app(engine):
    refused = []
    app = build_openai_app(CoordinatorBackend(engine.coordinator, engine.target.tokenizer,
                                              "tiny-target"),
                           api_keys=ApiKeys(KEYS), on_unauthenticated=lambda: refused.append(1))
    from fastapi import Depends

    from hsd_serve.metrics import mount_metrics_route

    class Export:  # what Ray's metrics export would answer (no Ray in this test)
        async def scrape(self):
            return b"ray_hsd_requests_total 1.0\n", "text/plain; version=0.0.4"

    mount_metrics_route(app, Export(), dependencies=[Depends(app.state.key_guard)])
    app.state.refused = refused
    return app


async def _request(app, method, path, **kw) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        return await client.request(method, path, **kw)


def call(app, method, path, **kw) -> httpx.Response:
    return asyncio.run(_request(app, method, path, **kw))


BODY = {"prompt": "def fib(n):", "max_tokens": 4, "temperature": 0}
ENDPOINTS = [("POST", "/v1/completions", BODY),
             ("POST", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
             ("GET", "/v1/models", None), ("GET", "/metrics", None)]


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", KEYS[0], f"Basic {KEYS[0]}",
                                    "Bearer ", f"Bearer {KEYS[0]}-"])
def test_http_refuses_missing_and_wrong_keys_with_openai_401(keyed_app, engine, header):
    before = len(keyed_app.state.refused)
    headers = {"Authorization": header} if header is not None else {}
    for method, path, body in ENDPOINTS:
        # a bad body too: the key is checked first, and nothing is parsed or started
        resp = call(keyed_app, method, path, headers=headers,
                    **({"json": {**body, "max_tokens": -5}} if body else {}))
        assert resp.status_code == 401, (path, resp.text)
        assert resp.headers["www-authenticate"] == "Bearer"
        err = resp.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert err["param"] is None and ("missing" if header is None else "invalid") in \
            err["message"]
        for k in KEYS:
            assert k not in resp.text
    assert len(keyed_app.state.refused) == before + len(ENDPOINTS)
    assert not engine.target_worker.sessions and not engine.drafter_worker.sessions
    assert call(keyed_app, "GET", "/health", headers=headers).status_code == 200  # stays open


def test_http_valid_keys_get_the_same_answers_as_an_open_api(keyed_app, engine):
    open_app = build_openai_app(CoordinatorBackend(engine.coordinator, engine.target.tokenizer,
                                                   "tiny-target"))
    want = call(open_app, "POST", "/v1/completions", json=BODY).json()
    for k in KEYS:
        resp = call(keyed_app, "POST", "/v1/completions", json=BODY,
                    headers={"Authorization": f"Bearer {k}"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == want["choices"][0]["text"]
        # a valid key reaches validation: a bad body is still a 400 naming the field
        bad = call(keyed_app, "POST", "/v1/completions", json={**BODY, "max_tokens": -5},
                   headers={"Authorization": f"Bearer {k}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        metrics = call(keyed_app, "GET", "/metrics", headers={"Authorization": f"Bearer {k}"})
        assert metrics.status_code == 200 and "ray_hsd_requests_total" in metrics.text


def test_official_openai_client_with_and_without_a_key(keyed_app):
    openai = pytest.importorskip("openai")

    async def main():
        def client(key):
            return openai.AsyncOpenAI(
                api_key=key, base_url="http://test/v1", max_retries=0,
                http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=keyed_app)))

        good = client(KEYS[1])
        out = await good.completions.create(model="tiny-target", prompt="def fib(n):",
                                            max_tokens=4, temperature=0)
        stream = await good.chat.completions.create(
            model="tiny-target", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            temperature=0, stream=True)
        chunks = [c async for c in stream]
        with pytest.raises(openai.AuthenticationError) as info:
            await client("sk-not-a-key").completions.create(model="tiny-target", prompt="x",
                                                            max_tokens=2)
        return out, chunks, info.value

    out, chunks, err = asyncio.run(main())
    assert out.choices[0].text and out.usage.completion_tokens >= 1
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert err.status_code == 401 and err.code == "invalid_api_key"


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzzed_authorization_headers_get_401_never_a_crash(keyed_app, value):
    """Any header value (bytes 0-255, as HTTP allows through latin-1): 401 or — only for a
    valid key — 200; never a 5xx."""
    clean = value.replace("\r", "").replace("\n", "").replace("\x00", "")
    resp = call(keyed_app, "GET", "/v1/models", headers=[(b"authorization",
                                                          clean.encode("latin-1"))])
    ok = bearer_credential(clean) in KEYS
    assert resp.status_code == (200 if ok else 401)


# ------------------------------------------------------------------ binding and the launcher


def test_exposure_warnings_name_the_open_door_and_keys_silence_them(tmp_path):
    from hsd_serve.serve.launch import _once_key, exposure_warnings, read_config

    cfg = read_config("serve_config.yaml")
    assert cfg["http_options"]["host"] == "127.0.0.1"  # loopback by default
    grpc_only = exposure_warnings(cfg, "127.0.0.1", 9000, environ={})
    assert len(grpc_only) == 1 and "gRPC on every interface" in grpc_only[0]
    assert "HTTP" not in grpc_only[0] and "HSD_API_KEYS" in grpc_only[0]
    both = exposure_warnings(cfg, "0.0.0.0", 9000, environ={})
    assert "HTTP on 0.0.0.0" in both[0]
    assert exposure_warnings(cfg, "127.0.0.1", None, environ={}) == []
    assert exposure_warnings(cfg, "0.0.0.0", 9000, environ={"HSD_API_KEYS": "k1"}) == []
    app = cfg["applications"][0]
    app["args"]["security"] = {"api_keys_file": str(tmp_path / "keys"), "api_keys_env": None}
    assert exposure_warnings(cfg, "0.0.0.0", 9000, environ={}) == []
    # --once sends $HSD_API_KEY, else the first key of the app's variable as set here
    app["args"]["security"] = {"api_keys_env": "MY_KEYS"}
    old = {k: os.environ.pop(k, None) for k in ("HSD_API_KEY", "MY_KEYS")}
    try:
        assert _once_key(cfg) is None
        os.environ["MY_KEYS"] = "first-key, second-key"
        assert _once_key(cfg) == "first-key"
        os.environ["HSD_API_KEY"] = "client-key"
        assert _once_key(cfg) == "client-key"
    finally:
        for k, v in old.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def test_a_local_loopback_run_serves_grpc_on_loopback_from_the_coordinator():
    """Ray Serve's gRPC proxy listens on every interface: for a local run on loopback the hsd
    app's coordinator serves gRPC on 127.0.0.1 instead and the proxy's gRPC is off."""
    from hsd_serve.serve.app import AppConfig
    from hsd_serve.serve.launch import loopback_grpc, read_config

    cfg = read_config("serve_config.yaml")
    before = repr(cfg)
    out, proxy = loopback_grpc(cfg, dict(cfg["grpc_options"], port=9123))
    assert proxy == {} and repr(cfg) == before  # the caller's config is left alone
    args = out["applications"][0]["args"]
    assert AppConfig(**args).security.client_grpc_local_port == 9123
    # no gRPC port, or several hsd applications: the proxy as configured
    assert loopback_grpc(cfg, {})[1] == {}
    two = dict(cfg, applications=cfg["applications"] * 2)
    assert loopback_grpc(two, dict(cfg["grpc_options"]))[1] == dict(cfg["grpc_options"])
