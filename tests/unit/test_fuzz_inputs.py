"""Hostile gRPC input, property-based: every ``GenerateRequest`` a client can send — any field
value, any wire bytes that parse — is either refused with ``RequestError`` naming a proto field
(→ ``INVALID_ARGUMENT``) or becomes a request the engine can run; nothing else escapes.  Also:
model loading never runs a repository's own code unless ``trust_remote_code`` is set."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd_serve.engine.engine import Coordinator, TargetInfo
from hsd_serve.engine.types import (MAX_LOOKAHEAD, MAX_STOP_CHARS, MAX_STOP_STRINGS, METHODS,
                                    GenerationRequest, RequestError)
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.serve.config import service_limits
from hsd_serve.serve.convert import request_from_proto

DEFAULTS = service_limits(default_max_tokens=16, max_tokens_limit=64, default_lookahead=4,
                          max_prompt_chars=200_000)
FIELDS = {"prompt", "method", "max_tokens", "lookahead", "stop", "sampling",
          "sampling.temperature", "sampling.top_k", "sampling.top_p", "sampling.seed"}
FAST = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.large_base_example])

# text a proto string can hold: any code point but surrogates (a lone surrogate is not UTF-8;
# protobuf refuses it on the client side and in the parser, tested below)
CHARS = st.characters(blacklist_categories=("Cs",))
NASTY = st.sampled_from([
    "\x00", "\x00" * 64, "\u202e", "\u202edcba\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd",
    "\ufeff", "\ufffe", "\uffff", "e\u0301" * 50, "\U0001f469\u200d\U0001f4bb", "\U0010ffff",
    "</s>", "<s>", "<|endoftext|>", "<unk>", "\r\n" * 20, "\t", " " * 300, "\\u0000", "%s%n",
    "A" * 1025, "é" * 2000])
TEXT = st.one_of(st.text(CHARS, max_size=40), NASTY,
                 st.lists(NASTY | st.text(CHARS, max_size=8), max_size=6).map("".join))
FLOATS = st.one_of(st.floats(), st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e-300, 1e308, 1.0000001, 2.0, -1.0]))
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 64, 65, 2**31, 2**32 - 1]))
# the Method enum: every value, values this release does not know (proto3 keeps any int32)
METHOD = st.one_of(st.sampled_from(pb.Method.values()),
                   st.integers(-2**31, 2**31 - 1),
                   st.sampled_from([-1, len(pb.Method.values()), 99, 2**31 - 1, -2**31]))
SAMPLING = st.builds(
    pb.SamplingParams, temperature=FLOATS, top_k=st.integers(-2**31, 2**31 - 1),
    top_p=FLOATS, seed=st.integers(0, 2**64 - 1))
STOPS = st.lists(st.one_of(TEXT, st.just(""), st.text(CHARS, min_size=1000, max_size=1100)),
                 max_size=MAX_STOP_STRINGS + 3)


@st.composite
def requests(draw):
    kwargs = {}
    if draw(st.booleans()):
        kwargs["prompt"] = draw(TEXT)
    else:
        kwargs["prompt"] = draw(st.text(CHARS, min_size=1, max_size=6))
    if draw(st.booleans()):
        kwargs["method"] = draw(METHOD)
    if draw(st.booleans()):
        kwargs["max_tokens"] = draw(UINT32)
    if draw(st.booleans()):
        kwargs["lookahead"] = draw(UINT32)
    if draw(st.booleans()):
        kwargs["adaptive_lookahead"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["stop"] = draw(STOPS)
    if draw(st.booleans()):
        kwargs["sampling"] = draw(SAMPLING)
    data = pb.GenerateRequest(**kwargs).SerializeToString()
    if draw(st.integers(0, 9)) == 0:  # a client of the old schema: `string method = 4`
        name = draw(st.sampled_from(METHODS + ("beam", "x" * 100))).encode()
        data += b"\x22" + bytes([len(name)]) + name
    return pb.GenerateRequest.FromString(data)  # exactly what a server sees


def check_valid(req: GenerationRequest) -> None:
    """What the engine relies on for a request that passed validation."""
    assert isinstance(req.prompt, str) and 0 < len(req.prompt) <= DEFAULTS.max_prompt_chars
    req.prompt.encode("utf-8")  # valid Unicode (no lone surrogates)
    assert req.method in METHODS
    assert 1 <= req.max_new_tokens <= DEFAULTS.max_tokens_limit
    assert 1 <= req.lookahead <= MAX_LOOKAHEAD
    assert len(req.stop) <= MAX_STOP_STRINGS
    assert all(0 < len(s) <= MAX_STOP_CHARS for s in req.stop)
    p = req.params
    assert math.isfinite(p.temperature) and p.temperature >= 0
    assert math.isfinite(p.top_p) and 0 < p.top_p <= 1
    assert p.top_k >= 0 and 0 <= p.seed < 2**63
    req.validate()


def outcome(msg: pb.GenerateRequest):
    try:
        req = request_from_proto(msg, DEFAULTS)
    except RequestError as exc:
        assert exc.field in FIELDS, exc
        assert exc.message and str(exc).startswith(exc.field)
        json.dumps(str(exc))  # reportable as a status detail
        return exc
    check_valid(req)
    return req


@settings(max_examples=2500, **FAST)
@given(msg=requests())
def test_any_generate_request_is_refused_by_field_or_valid(msg):
    outcome(msg)


@settings(max_examples=1000, **FAST)
@given(data=st.binary(max_size=300))
def test_any_parsable_wire_bytes_are_refused_by_field_or_valid(data):
    try:
        msg = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return  # refused by the protobuf layer before our code runs
    outcome(msg)


def test_lone_surrogates_cannot_reach_the_server():
    bad_utf8 = b"\x0a\x03\xed\xa0\x80"  # field 1 (prompt) = the UTF-8-style bytes of U+D800
    with pytest.raises(DecodeError):
        pb.GenerateRequest.FromString(bad_utf8)
    with pytest.raises(Exception):  # the client library refuses to build such a message
        pb.GenerateRequest(prompt="\ud800").SerializeToString()


@pytest.fixture(scope="module")
def coordinator(loaded_model):
    """prepare() (tokenization, context check) on a real tokenizer; no rounds are run."""
    target = loaded_model("mistral-v0.1")
    return Coordinator(target=None, drafter=object(),
                       info=TargetInfo(target.tokenizer, target.eos_ids, target.max_context))


@settings(max_examples=600, **FAST)
@given(msg=requests())
def test_validated_requests_tokenize_or_are_refused(coordinator, msg):
    req = outcome(msg)
    if isinstance(req, RequestError):
        return
    try:
        method, ids = coordinator.prepare(req)
    except RequestError as exc:
        assert exc.field in ("prompt", "method"), exc
        return
    assert method in ("ar", "slem", "tli", "slrs") and ids
    assert len(ids) < coordinator.info.max_context


@pytest.mark.parametrize("prompt", ["x" * 1_000_000, "é" * 999_999, "\x00" * 1_000_000,
                                    "\u202e" * 1_000_000])
def test_megabyte_prompts_are_refused_cleanly(coordinator, prompt):
    msg = pb.GenerateRequest(prompt=prompt, max_tokens=4)
    with pytest.raises(RequestError) as info:  # over the 200k-character limit of DEFAULTS
        request_from_proto(msg, DEFAULTS)
    assert info.value.field == "prompt"
    req = request_from_proto(msg, service_limits())  # the 1M-character default admits it...
    with pytest.raises(RequestError) as info:  # ...and the target's context refuses it
        coordinator.prepare(req)
    assert info.value.field == "prompt"


# ------------------------------------------------------------------ no remote code by default

SENTINEL_CODE = '''
import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("yes")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture()
def remote_code_model(tmp_path, tiny_model_dir):
    """A copy of a tiny model whose config asks for its own code (``auto_map``)."""
    import shutil

    src = tiny_model_dir("gpt2", seed=1)
    out = tmp_path / "evil"
    shutil.copytree(src, out)
    (out / "evil_model.py").write_text(SENTINEL_CODE)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "evil-llama"
    cfg["architectures"] = ["EvilForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig",
                       "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (out / "config.json").write_text(json.dumps(cfg))
    tcfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    tcfg["auto_map"] = {"AutoTokenizer": ["evil_model.EvilTokenizer", None]}
    tcfg_path.write_text(json.dumps(tcfg))
    return out


def test_model_asking_for_custom_code_is_refused_without_trust(remote_code_model):
    from hsd_serve.models.hf import LoadedModel, ModelLoadError, ModelSpec, describe_model
    from hsd_serve.serve.config import ModelConfig

    assert ModelConfig(path=str(remote_code_model)).trust_remote_code is False  # the default
    with pytest.raises(ModelLoadError):
        LoadedModel(ModelSpec(str(remote_code_model)))
    with pytest.raises(ModelLoadError):
        describe_model(ModelSpec(str(remote_code_model)))
    assert not (remote_code_model / "REMOTE_CODE_RAN").exists()


def test_known_architecture_with_auto_map_loads_builtin_code_only(remote_code_model):
    """A config that names a built-in architecture *and* carries an ``auto_map`` loads with the
    library's own class; the repository's file is never imported."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    cfg = json.loads((remote_code_model / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (remote_code_model / "config.json").write_text(json.dumps(cfg))
    model = LoadedModel(ModelSpec(str(remote_code_model)))
    assert type(model.model).__name__ == "LlamaForCausalLM"
    assert not (remote_code_model / "REMOTE_CODE_RAN").exists()
