"""Proto conversions are exact, and client requests are validated field by field."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import re
import struct
import typing
from pathlib import Path

import pytest
import torch
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.core.speculative import truncate_proposal
from hsd_serve.engine.protocol import EXACT, ROW, SPECULATIVE, Branch, Draft, DraftSpec, SLRSOutcome, Step, \
    Verdict
from hsd_serve.engine.types import (METHODS, Chunk, GenerationRequest, GenerationResult,
                                    RequestError, RequestLimits, RequestStats, Span)
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.serve import convert
from hsd_serve.serve.config import service_limits
from hsd_serve.serve.convert import request_from_proto
from hsd_serve.serve.vllm import wire


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _roundtrip(rows: torch.Tensor) -> torch.Tensor:
    msgs = convert.rows_to_proto(rows)
    wire = [pb.SparseRow.FromString(m.SerializeToString()) for m in msgs]
    return convert.rows_from_proto(wire, rows.shape[1])


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32
    assert a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b))


def test_sparse_rows_round_trip_bit_exact():
    g = torch.Generator().manual_seed(0)
    v = 32000
    one_hot = torch.zeros(3, v)
    one_hot[0, 0] = 1.0
    one_hot[1, v - 1] = 1.0
    one_hot[2, 12345] = 1.0
    dense = torch.softmax(torch.randn(2, v, generator=g) * 3, dim=-1)
    top_m = torch.stack([truncate_proposal(torch.softmax(torch.randn(v, generator=g), -1), 64)
                         for _ in range(4)])
    assert int((top_m[0] > 0).sum()) == 64
    tiny = torch.tensor([[0.0, 1e-45, -0.0, 3.4028235e38, 1.1754944e-38, 0.5]])  # denormal, -0
    for rows in (one_hot, dense, top_m, tiny, torch.zeros(1, 7)):
        assert_bit_identical(_roundtrip(rows), rows)
    msgs = convert.rows_to_proto(top_m)
    assert [len(m.ids) for m in msgs] == [64] * 4
    assert list(msgs[0].ids) == sorted(msgs[0].ids)
    assert convert.rows_to_proto(None) == [] and convert.rows_from_proto([], v) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40)
                .map(lambda r: r + [0.0] * 5), min_size=1, max_size=4)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_sparse_rows_round_trip_any_float32(rows):
    t = torch.tensor(rows, dtype=torch.float32)
    assert_bit_identical(_roundtrip(t), t)


def test_packed_rows_equal_protobufs_own_encoding():
    import numpy as np

    edges = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**31 - 1]
    rng = np.random.default_rng(0)
    for ids in (np.array(edges), np.sort(rng.choice(2**31 - 1, 500, replace=False))):
        probs = rng.random(ids.size).astype(np.float32)
        ours = convert._sparse_row(ids, probs)
        ref = pb.SparseRow(ids=ids.tolist(), probs=probs.tolist())
        assert ours == ref and ours.SerializeToString() == ref.SerializeToString()


def test_rows_reject_inexact_or_malformed():
    with pytest.raises(ValueError):
        convert.rows_to_proto(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError):
        convert.row_to_bytes(torch.zeros(5, dtype=torch.bfloat16))
    bad = [pb.SparseRow(ids=[3, 1], probs=[0.5, 0.5]), pb.SparseRow(ids=[9], probs=[1.0]),
           pb.SparseRow(ids=[1], probs=[]), pb.SparseRow(ids=[-1], probs=[1.0]),
           pb.SparseRow(ids=[2, 2], probs=[0.5, 0.5])]
    for row in bad:
        with pytest.raises(ValueError):
            convert.rows_from_proto([row], 5)
    with pytest.raises(ValueError):
        convert.row_from_bytes(b"\x00" * 7)


def test_row_bytes_round_trip_and_little_endian():
    g = torch.Generator().manual_seed(1)
    row = torch.softmax(torch.randn(513, generator=g), -1)
    row[7] = -0.0
    data = convert.row_to_bytes(row)
    assert data[:4] == struct.pack("<f", float(row[0]))
    back = convert.row_from_bytes(data)
    assert_bit_identical(back, row)
    back[0] = 5.0  # a fresh, writable tensor
    assert convert.row_to_bytes(None) == b"" and convert.row_from_bytes(b"") is None


def test_sampling_params_round_trip():
    for p in (SamplingParams(), SamplingParams(0.7, 40, 0.9, 2**63 - 1),
              SamplingParams(temperature=1.3, top_p=0.98, seed=5)):
        wire = pb.SamplingParams.FromString(convert.params_to_proto(p).SerializeToString())
        assert convert.params_from_proto(wire) == p
    assert convert.params_from_proto(pb.SamplingParams(top_p=0.0)).top_p == 1.0


def test_engine_messages_round_trip():
    rows = truncate_proposal(torch.softmax(torch.randn(2, 100), -1)[0], 5).repeat(2, 1)
    d = Draft(drafter_ids=[5, 6], text=b"\xe6\x9d", target_ids=[1, 2], proposals=rows,
              forwards=2, draft_s=0.25,
              branches=[Branch(3, drafter_ids=[7, 8], text=b" x\xe6"),
                        Branch(0, drafter_ids=[9], target_ids=[9])])
    wire = pb.DraftReply.FromString(convert.draft_to_proto(d).SerializeToString())
    back = convert.draft_from_proto(wire, 100)
    assert_bit_identical(back.proposals, rows)
    back.proposals = d.proposals
    assert back == d
    assert convert.draft_from_proto(convert.draft_to_proto(Draft()), 100) == Draft()
    v = Verdict(accepted=2, tokens=[1, 2, 3], verify_s=0.5, batch_size=7)
    assert convert.verdict_from_proto(convert.verdict_to_proto(v)) == v
    assert convert.verdict_from_proto(pb.VerifyReply()).batch_size == 1  # a replica without it
    vr = convert.verdict_from_proto(convert.verdict_to_proto(Verdict(row=rows[0])))
    assert_bit_identical(vr.row, rows[0])
    o = SLRSOutcome(token=7, accepted=True, proposed=True, drafter_ids=[1, 2], forwards=3,
                    draft_s=0.125)
    assert convert.slrs_from_proto(convert.slrs_to_proto(o)) == o
    # no proposal possible this round: the token is absent on the wire, None in the engine
    none = SLRSOutcome(token=None, accepted=False, proposed=False, forwards=1)
    wire = pb.SLRSReply.FromString(convert.slrs_to_proto(none).SerializeToString())
    assert not wire.HasField("token") and convert.slrs_from_proto(wire) == none
    zero = convert.slrs_to_proto(SLRSOutcome(token=0, accepted=True, proposed=True))
    assert zero.HasField("token") and convert.slrs_from_proto(zero).token == 0  # 0 is a token
    for bad in (-1, -2):  # no marker values: "no token" is None
        with pytest.raises(ValueError):
            convert.slrs_to_proto(SLRSOutcome(token=bad, accepted=False, proposed=False))
    ids_req = convert.draft_request("r", 3, 4, [1, 2], None, attempt=5, branches=3, span=2)
    assert convert.draft_request_args(ids_req) == {"committed": [1, 2], "generated": None,
                                                   "attempt": 5, "branches": 3, "span": 2}
    txt_req = convert.draft_request("r", 3, 4, None, b"")
    assert convert.draft_request_args(txt_req) == {"committed": None, "generated": b"",
                                                   "attempt": 0, "branches": 0, "span": 0}
    # the oneof says which, empty values included (they are on the wire)
    for req, which in ((convert.draft_request("r", 3, 4, [], None), "committed"),
                       (txt_req, "generated")):
        wire = pb.DraftRequest.FromString(req.SerializeToString())
        assert wire.WhichOneof("context") == which
        assert convert.draft_request_args(wire) == convert.draft_request_args(req)
    with pytest.raises(ValueError, match="committed / generated"):
        convert.draft_request_args(pb.DraftRequest(request_id="r", k=3))


def test_result_and_chunks_to_proto():
    stats = RequestStats(method="tli")
    stats.record_round(3, 2, emitted=3)
    stats.wall_s = 0.5
    res = GenerationResult("abc", [1, 2, 3], "length", stats)
    msg = convert.result_to_proto(res, transport_s=0.01, seed=11)
    assert (msg.text, list(msg.token_ids), msg.finish_reason) == \
        ("abc", [1, 2, 3], pb.FINISH_REASON_LENGTH)
    assert convert.finish_reason_from_proto(msg.finish_reason) == "length"
    assert msg.stats.seed == 11 and list(msg.stats.drafted_per_position) == [1, 1, 1]
    assert (msg.stats.rounds, msg.stats.drafted, msg.stats.accepted) == (1, 3, 2)
    assert msg.stats.completion_tokens == 3 and msg.stats.tokens_per_s == 6.0
    assert math.isclose(msg.stats.acceptance_rate, 2 / 3) and msg.stats.transport_s == 0.01
    assert list(msg.stats.accepted_per_position) == [1, 1, 0]
    assert len(msg.stats.timeline) == 0  # not traced
    stats.timeline += [Span("draft", 0, 0.001, 0.004), Span("verify", 0, 0.004, 0.02),
                       Span("draft ahead", 0, 0.005, 0.011)]
    spans = convert.result_to_proto(res, seed=11).stats.timeline
    assert [Span(sp.lane, sp.round, sp.start_s, sp.end_s) for sp in spans] == stats.timeline
    mid = convert.chunk_to_proto(Chunk([1], "a"), seed=11)
    assert not mid.HasField("stats") and mid.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert convert.finish_reason_from_proto(mid.finish_reason) == ""
    last = convert.chunk_to_proto(Chunk([2, 3], "bc", result=res), seed=11)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.stats.rounds == 1 and last.stats.seed == 11
    stop = dataclasses.replace(res, finish_reason="stop")
    assert convert.result_to_proto(stop, seed=11).finish_reason == pb.FINISH_REASON_STOP
    with pytest.raises(ValueError):  # an engine reason the wire has no value for
        convert.result_to_proto(dataclasses.replace(res, finish_reason="eos"), seed=11)


# ------------------------------------------------------------------------------ enums
ENUM_TABLES = [  # (table, the engine's strings, the proto enum)
    (convert.METHOD, METHODS, pb.Method),
    (convert.RULE, (EXACT, SPECULATIVE, ROW), pb.Rule),
    (convert.FINISH_REASON, ("stop", "length"), pb.FinishReason),
]


@pytest.mark.parametrize("table,strings,enum", ENUM_TABLES, ids=[t.what for t, *_ in ENUM_TABLES])
def test_enum_tables_map_every_value_once_and_refuse_the_rest(table, strings, enum):
    values = enum.DESCRIPTOR.values
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"
    assert values[0].number == 0 and values[0].name == prefix + "UNSPECIFIED"
    assert all(v.name.startswith(prefix) for v in values)
    assert sorted(table.to_proto(s) for s in strings) == [v.number for v in values[1:]]
    for s in strings:
        assert table.from_proto(table.to_proto(s)) == s
        assert enum.Name(table.to_proto(s)) == prefix + s.upper()  # "tli" -> METHOD_TLI
    for bad in ("", "auto", "EXACT", None, 1):
        if bad not in strings:
            with pytest.raises(ValueError):
                table.to_proto(bad)
    for bad in (0, len(values), 99, -1):
        with pytest.raises(ValueError, match=table.what):
            table.from_proto(bad)


def test_finish_reason_from_proto():
    assert convert.finish_reason_from_proto(pb.FINISH_REASON_STOP) == "stop"
    assert convert.finish_reason_from_proto(pb.FINISH_REASON_LENGTH) == "length"
    assert convert.finish_reason_from_proto(pb.FINISH_REASON_UNSPECIFIED) == ""
    with pytest.raises(ValueError):
        convert.finish_reason_from_proto(7)


def test_engine_enum_strings_are_refused_before_sending():
    with pytest.raises(ValueError, match="method"):
        convert.open_request("r", "auto", "hi", SamplingParams(), [1])
    with pytest.raises(ValueError, match="rule"):
        convert.verify_request("r", [1], [], "nope", SamplingParams(), 0)
    for rule in (pb.RULE_UNSPECIFIED, 42):
        with pytest.raises(ValueError, match="rule"):
            convert.verify_request_args(pb.VerifyRequest(request_id="r", rule=rule), WIDTH)
    # a data-plane Open carries the method the request resolved to: never auto
    for method in (pb.METHOD_UNSPECIFIED, pb.METHOD_AUTO, 42):
        with pytest.raises(ValueError, match="method"):
            convert.open_request_args(pb.OpenRequest(request_id="r", method=method))
    for name in METHODS:
        if name != "auto":
            args = convert.open_request_args(convert.open_request("r", name, "hi",
                                                                  SamplingParams(), [1]))
            assert args["method"] == name


# ------------------------------------------------------------------------------ client requests
DEFAULTS = service_limits(default_max_tokens=32, default_lookahead=5, max_prompt_chars=100,
                          max_tokens_limit=256, default_method="auto")


def test_request_defaults_and_values():
    req = request_from_proto(pb.GenerateRequest(prompt="hi"), DEFAULTS)
    assert (req.prompt, req.max_new_tokens, req.lookahead, req.method) == ("hi", 32, 5, "auto")
    assert req.params == SamplingParams() and req.stop == () and req.trace is False
    assert request_from_proto(pb.GenerateRequest(prompt="hi", trace=True), DEFAULTS).trace
    req = request_from_proto(pb.GenerateRequest(
        prompt="x" * 100, max_tokens=256, method=pb.METHOD_TLI, lookahead=64,
        adaptive_lookahead=True, stop=["\n\n", "x" * 1024],
        sampling=pb.SamplingParams(temperature=0.8, top_k=5, top_p=0, seed=9)), DEFAULTS)
    assert (req.max_new_tokens, req.method, req.lookahead, req.adaptive_lookahead) == \
        (256, "tli", 64, True)
    assert req.params == SamplingParams(temperature=0.8, top_k=5, top_p=1.0, seed=9)
    assert req.stop == ("\n\n", "x" * 1024)


def _wire(**fields) -> pb.GenerateRequest:
    """A GenerateRequest as the server parses it."""
    return pb.GenerateRequest.FromString(pb.GenerateRequest(**fields).SerializeToString())


def test_request_method_is_the_wire_enum():
    """Each ``Method`` value is its engine method; UNSPECIFIED is the service's default method
    (which may be other than auto), AUTO is auto whatever the default."""
    tli_default = dataclasses.replace(DEFAULTS, default_method="tli")
    for name in METHODS:
        value = pb.Method.Value("METHOD_" + name.upper())
        for limits in (DEFAULTS, tli_default):
            assert request_from_proto(_wire(prompt="hi", method=value), limits).method == name
    assert request_from_proto(_wire(prompt="hi"), DEFAULTS).method == "auto"
    assert request_from_proto(_wire(prompt="hi"), tli_default).method == "tli"
    # unset and UNSPECIFIED are one thing on the wire
    assert pb.GenerateRequest(prompt="hi", method=pb.METHOD_UNSPECIFIED).SerializeToString() == \
        pb.GenerateRequest(prompt="hi").SerializeToString()


@pytest.mark.parametrize("value", [len(pb.Method.DESCRIPTOR.values), 99, 2**31 - 1, -1, -2**31])
def test_request_refuses_a_method_value_this_release_does_not_know(value):
    msg = _wire(prompt="hi", method=value)
    assert msg.method == value  # proto3 enums are open: the parser keeps the number
    with pytest.raises(RequestError) as info:
        request_from_proto(msg, DEFAULTS)
    assert info.value.field == "method"
    assert str(value) in info.value.message and "METHOD_TLI" in info.value.message


def test_request_refuses_a_method_name_sent_as_a_string():
    """A client built against the old schema (``string method = 4``) sends the name as a
    length-delimited field 4; the parser keeps it as an unknown field, which must not silently
    run the default method."""
    old = pb.GenerateRequest(prompt="hi").SerializeToString() + b"\x22\x03tli"
    msg = pb.GenerateRequest.FromString(old)
    assert msg.method == pb.METHOD_UNSPECIFIED
    with pytest.raises(RequestError) as info:
        request_from_proto(msg, DEFAULTS)
    assert info.value.field == "method" and "enum" in info.value.message


@pytest.mark.parametrize("value", [99, -1])
def test_grpc_answers_invalid_argument_naming_method_for_an_unknown_value(value):
    """Through the client-facing handlers (``grpc_api``), unary and streaming."""
    import asyncio

    import grpc

    from hsd_serve.serve import grpc_api

    class Ctx:
        code = details = None

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    class Dep:
        limits = DEFAULTS

        def stream(self, req):
            raise AssertionError("nothing may start for an invalid request")

    async def stream(msg, ctx):
        with pytest.raises(RequestError):
            async for _ in grpc_api.generate_stream(Dep(), msg, ctx):
                pass

    msg = _wire(prompt="hi", method=value)
    for call in (lambda m, c: grpc_api.generate_unary(Dep(), m, c), stream):
        ctx = Ctx()
        asyncio.run(call(msg, ctx))
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
        assert ctx.details.startswith("method:") and str(value) in ctx.details


def test_unseeded_sampled_requests_draw_fresh_seeds():
    sampled = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=1.0))
    assert not sampled.sampling.HasField("seed")
    seeds = {request_from_proto(sampled, DEFAULTS).params.seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    # a seed that is set is kept, 0 included (presence, not value, says "set")
    for seed in (0, 1, 2**63 - 1):
        msg = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=1.0,
                                                                         seed=seed))
        wire = pb.GenerateRequest.FromString(msg.SerializeToString())
        assert wire.sampling.HasField("seed")
        assert request_from_proto(wire, DEFAULTS).params.seed == seed
    # greedy: the seed changes nothing; unset means 0
    greedy = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_k=3))
    assert request_from_proto(greedy, DEFAULTS).params.seed == 0
    assert request_from_proto(pb.GenerateRequest(prompt="hi"), DEFAULTS).params.seed == 0
    # the client side always states the seed, so a converted request is reproduced exactly
    req = request_from_proto(sampled, DEFAULTS)
    again = request_from_proto(convert.request_to_proto(req), DEFAULTS)
    assert again == req


def test_seed_field_is_wire_compatible_with_plain_uint64():
    """``optional uint64 seed`` encodes a set seed exactly as the old ``uint64 seed`` did; an
    old client's explicit seed 0 is not on the wire, so it reads as unset (a fresh seed)."""
    assert pb.SamplingParams(seed=7).SerializeToString() == b"\x20\x07"
    assert pb.SamplingParams(seed=0).SerializeToString() == b"\x20\x00"
    assert not pb.SamplingParams.FromString(b"").HasField("seed")


def test_client_sends_a_seed_only_when_given_and_prints_the_seed_used():
    from types import SimpleNamespace

    from hsd_serve.serve.client import build_request, stats_line

    args = SimpleNamespace(max_tokens=8, method="tli", lookahead=2, stop=[], temperature=1.0,
                           top_k=0, top_p=1.0, seed=None)
    assert not build_request(args, "hi").sampling.HasField("seed")
    args.seed = 0
    msg = pb.GenerateRequest.FromString(build_request(args, "hi").SerializeToString())
    assert msg.sampling.HasField("seed") and request_from_proto(msg).params.seed == 0
    assert stats_line(pb.Stats(method="tli", seed=2**62)).endswith(f"seed {2**62}")


def test_client_takes_method_names_and_sends_the_enum():
    """Callers (the CLI, ``bench``, ``launch --once``) keep giving names; "" leaves the method to
    the server; names are read as the server read them (any case, blanks around); another name
    is refused before anything is sent."""
    from types import SimpleNamespace

    from hsd_serve.serve.client import build_request

    args = SimpleNamespace(max_tokens=8, lookahead=2, stop=[], temperature=0.0, top_k=0,
                           top_p=1.0)
    for name, value in (("", pb.METHOD_UNSPECIFIED), ("tli", pb.METHOD_TLI),
                        (" SLEM ", pb.METHOD_SLEM), ("auto", pb.METHOD_AUTO), ("ar", pb.METHOD_AR)):
        args.method = name
        msg = pb.GenerateRequest.FromString(build_request(args, "hi").SerializeToString())
        assert msg.method == value
        want = name.strip().lower() or DEFAULTS.default_method
        assert request_from_proto(msg, DEFAULTS).method == want
    for bad in ("beam", "METHOD_TLI", "greedy", None):
        args.method = bad
        with pytest.raises(ValueError, match="method: unknown value .*tli, slrs, auto"):
            build_request(args, "hi")


def test_client_json_shows_finish_reason_as_before():
    """``hsd-serve client --json`` prints "stop" / "length" (the wire has an enum), in the
    field's place, and nothing for a chunk without one."""
    from hsd_serve.serve.client import _as_dict

    msg = pb.GenerateResponse(text="a", token_ids=[1], finish_reason=pb.FINISH_REASON_STOP,
                              stats=pb.Stats(rounds=1))
    out = _as_dict(msg)
    assert list(out) == ["text", "token_ids", "finish_reason", "stats"]
    assert out["finish_reason"] == "stop" and out["stats"] == {"rounds": 1}
    assert _as_dict(pb.GenerateChunk(text="a", finish_reason=pb.FINISH_REASON_LENGTH)) == \
        {"text": "a", "finish_reason": "length"}
    assert "finish_reason" not in _as_dict(pb.GenerateChunk(text="a"))


BAD = [
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt="x" * 101)),
    ("method", dict(method=99)),
    ("method", dict(method=-1)),
    ("max_tokens", dict(max_tokens=257)),
    ("lookahead", dict(lookahead=65)),
    ("stop", dict(stop=["a"] * 17)),
    ("stop", dict(stop=["ok", ""])),
    ("stop", dict(stop=["x" * 1025])),
    ("sampling.temperature", dict(sampling=pb.SamplingParams(temperature=-0.1))),
    ("sampling.temperature", dict(sampling=pb.SamplingParams(temperature=float("nan")))),
    ("sampling.temperature", dict(sampling=pb.SamplingParams(temperature=float("inf")))),
    ("sampling.top_p", dict(sampling=pb.SamplingParams(top_p=1.5))),
    ("sampling.top_p", dict(sampling=pb.SamplingParams(top_p=-0.5))),
    ("sampling.top_p", dict(sampling=pb.SamplingParams(top_p=float("nan")))),
    ("sampling.top_k", dict(sampling=pb.SamplingParams(top_k=-1))),
    ("sampling.seed", dict(sampling=pb.SamplingParams(seed=2**63))),
]


@pytest.mark.parametrize("field,kwargs", BAD)
def test_request_rejects_bad_field(field, kwargs):
    kwargs = {"prompt": "hello", **kwargs}
    msg = pb.GenerateRequest.FromString(pb.GenerateRequest(**kwargs).SerializeToString())
    with pytest.raises(RequestError) as info:
        request_from_proto(msg, DEFAULTS)
    assert info.value.field == field, info.value


@settings(max_examples=80, deadline=None)
@given(temperature=st.floats(), top_p=st.floats(), top_k=st.integers(-2**31, 2**31 - 1),
       max_tokens=st.integers(0, 2**32 - 1), lookahead=st.integers(0, 2**32 - 1),
       method=st.sampled_from(range(-2, len(pb.Method.DESCRIPTOR.values) + 2)))
def test_request_fuzz_accepts_exactly_the_valid(temperature, top_p, top_k, max_tokens,
                                                lookahead, method):
    msg = pb.GenerateRequest(prompt="p", max_tokens=max_tokens, lookahead=lookahead,
                             method=method, sampling=pb.SamplingParams(
                                 temperature=temperature, top_p=top_p, top_k=top_k))
    errors = []
    if method not in pb.Method.values():
        errors.append("method")
    if max_tokens > DEFAULTS.max_tokens_limit:
        errors.append("max_tokens")
    if lookahead > 64:
        errors.append("lookahead")
    if not (math.isfinite(temperature) and temperature >= 0):
        errors.append("sampling.temperature")
    if top_k < 0:
        errors.append("sampling.top_k")
    if not (math.isfinite(top_p) and 0 <= top_p <= 1):
        errors.append("sampling.top_p")
    if errors:
        with pytest.raises(RequestError) as info:
            request_from_proto(msg, DEFAULTS)
        assert info.value.field in errors
    else:
        req = request_from_proto(msg, DEFAULTS)
        assert req.params.temperature == temperature and 0 < req.params.top_p <= 1
        assert 1 <= req.max_new_tokens <= DEFAULTS.max_tokens_limit
        assert 1 <= req.lookahead <= 64


def test_request_defaults_validate_themselves():
    with pytest.raises(ValueError):
        RequestLimits(default_lookahead=65)
    with pytest.raises(ValueError):
        RequestLimits(default_max_tokens=10, max_tokens_limit=5)
    with pytest.raises(ValueError):
        RequestLimits(default_method="beam")


# ------------------------------------------------------------------------------ every field crosses
# Every message type of hsd.proto, every field set to a non-default value: whatever has a converter
# pair must come back equal (proto → engine → proto and engine → proto → engine); whatever the
# server only sends (Stats, GenerateResponse, GenerateChunk) must have every proto field filled and
# every engine field accounted for.  New messages and fields are covered without editing this test
# (and fail it until their converters carry them).
WIDTH = 64  # target vocabulary width of the proposal rows in these round trips
SEED = 2**62 + 12345  # the seed the service echoes in Stats
# engine strings a converter validates (GenerateRequest.method) or maps to an enum value
STRINGS = {"method": "tli", "rule": SPECULATIVE, "finish_reason": "length"}
# enum fields that refuse their enum's last value (the default filler): what to fill instead
ENUM_FILL = {"hsd.v1.OpenRequest.method": pb.METHOD_TLI,  # a resolved method: never METHOD_AUTO
             "hsd.v1.DraftSource.method": pb.METHOD_TLI}
_INTS = (FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_SINT32,
         FD.TYPE_SINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64, FD.TYPE_SFIXED32, FD.TYPE_SFIXED64)


def _msg_class(desc):
    return message_factory.GetMessageClass(desc)


def _proto_scalar(f, i: int):
    """A non-default value for scalar field ``f`` (``i``: element index in a repeated field);
    values differ between fields so that swapped fields are caught too."""
    if f.type in _INTS:
        return f.number + 2 + i  # ascending in a repeated field (SparseRow ids), < WIDTH
    if f.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return 0.125 * (f.number + 1 + i)  # exact in float32
    if f.type == FD.TYPE_BOOL:
        return True
    if f.type == FD.TYPE_STRING:
        return STRINGS.get(f.name, f"{f.name}-{f.number}") + (f"-{i}" if i else "")
    if f.type == FD.TYPE_BYTES:
        return struct.pack("<2f", 0.5, f.number + i + 0.25)  # also a valid float32 row
    if f.type == FD.TYPE_ENUM:
        return ENUM_FILL.get(f.full_name, f.enum_type.values[-1].number)
    raise AssertionError(f"no filler for {f.full_name} (type {f.type})")


def _real_oneofs(desc) -> list:
    """``desc``'s oneofs, without the synthetic ones protoc makes for proto3 ``optional``."""
    dp = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(dp)
    synthetic = {desc.oneofs[f.oneof_index].name for f in dp.field
                 if f.proto3_optional and f.HasField("oneof_index")}
    return [o for o in desc.oneofs if o.name not in synthetic]


def fill_proto_variants(desc) -> list:
    """Instances of ``desc`` with every field set to a non-default value, one per alternative
    of its oneofs (variant ``j`` sets alternative ``j`` of each, or its last): together they set
    every field.  A message without oneofs has one variant."""
    oneofs = _real_oneofs(desc)
    n = max((len(o.fields) for o in oneofs), default=1)
    return [fill_proto(desc, {o.name: o.fields[min(j, len(o.fields) - 1)].name for o in oneofs})
            for j in range(n)]


def fill_proto(desc, choice=None):
    """An instance of message type ``desc`` with every field set to a non-default value; a
    oneof sets the alternative ``choice[oneof name]`` names (default: its first)."""
    msg = _msg_class(desc)()
    choice = choice or {}
    for f in desc.fields:
        o = f.containing_oneof
        if o is not None and o.name in {r.name for r in _real_oneofs(desc)} and \
                f.name != choice.get(o.name, o.fields[0].name):
            continue
        if f.message_type is not None:
            assert not f.message_type.GetOptions().map_entry, f"teach fill_proto maps: {f.name}"
            if f.is_repeated:
                for _ in range(2):
                    getattr(msg, f.name).add().CopyFrom(fill_proto(f.message_type))
            else:
                getattr(msg, f.name).CopyFrom(fill_proto(f.message_type))
        elif f.is_repeated:
            getattr(msg, f.name).extend(_proto_scalar(f, i) for i in range(2))
        else:
            setattr(msg, f.name, _proto_scalar(f, 0))
    return msg


def _set_fields(msg) -> set:
    return {f.name for f, _ in msg.ListFields()}


def _all_fields(desc) -> set:
    return {f.name for f in desc.fields}


def _proto_diff(want, got) -> list:
    return sorted(f.name for f in want.DESCRIPTOR.fields
                  if getattr(want, f.name) != getattr(got, f.name)
                  or (f.has_presence and want.HasField(f.name) != got.HasField(f.name)))


# ---- engine side
def _tensor(name: str) -> torch.Tensor:
    if name == "proposals":  # [n, V] proposal rows
        rows = torch.zeros(2, WIDTH)
        rows[0, 3], rows[0, 7], rows[1, 5], rows[1, WIDTH - 1] = 0.25, 0.75, 0.5, 0.5
        return rows
    if name == "row":  # one processed target row [V]
        return torch.arange(1, WIDTH + 1, dtype=torch.float32) / WIDTH
    raise AssertionError(f"no tensor filler for {name!r}: add one")


def fill_value(tp, name: str, i: int):
    """A non-default value of type ``tp`` for engine field/argument ``name`` (index ``i``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return fill_value(next(a for a in args if a is not type(None)), name, i)
    if tp is bool:
        return True
    if tp is int:
        return i + 2
    if tp is float:
        return 0.125 * (i + 1)
    if tp is str:
        return STRINGS.get(name, f"{name}-{i}")
    if tp is bytes:
        return bytes([0xE6, 0x9D, i])
    if tp is torch.Tensor:
        return _tensor(name)
    if dataclasses.is_dataclass(tp):
        return fill_engine(tp)
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        return [fill_value(args[0], name, i + j) for j in range(2)]
    if origin is tuple:
        return tuple(fill_value(args[0], name, i + j) for j in range(2))
    if tp is dict or origin is dict:
        return {name: f"{name}-{i}"}
    raise AssertionError(f"no filler for {name}: {tp!r}")


def fill_engine(kind, **overrides):
    """A dataclass instance, or (``kind`` a function) its keyword arguments, with every field /
    argument set to a non-default value."""
    hints = typing.get_type_hints(kind)
    if dataclasses.is_dataclass(kind):
        names = [f.name for f in dataclasses.fields(kind)]
    else:
        names = list(inspect.signature(kind).parameters)
    values = {n: fill_value(hints[n], n, i) for i, n in enumerate(names)}
    values.update(overrides)
    return kind(**values) if dataclasses.is_dataclass(kind) else values


def _engine_fields(obj) -> dict:
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return dict(obj)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype == torch.float32 and a.shape == b.shape
                and torch.equal(_bits(a), _bits(b)))
    if dataclasses.is_dataclass(a) or isinstance(a, dict):
        return type(a) is type(b) and not _engine_diff(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and \
            all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _engine_diff(want, got) -> list:
    w, g = _engine_fields(want), _engine_fields(got)
    return sorted(k for k in set(w) | set(g) if k not in w or k not in g or not _same(w[k], g[k]))


# ---- which converters apply
@dataclasses.dataclass
class Pair:
    """A converter pair: ``to_proto(engine) -> message`` and ``from_proto(message) -> engine``;
    ``engine``: the engine dataclass, or the builder whose keyword arguments are the engine side."""

    to_proto: typing.Callable
    from_proto: typing.Callable
    engine: typing.Any
    make_engine: typing.Optional[typing.Callable] = None  # instead of fill_engine(engine)
    # alternatives that cannot be set together: proto fields to clear / engine values per variant
    proto_variants: tuple = ((),)
    engine_variants: tuple = ({},)
    # fields the converters leave to the port (transport signals, not data)
    control: tuple = ()


def _draft_call(m):  # what DrafterServicer.Draft passes to DraftCall
    return dict(rid=m.request_id, k=m.k, position=m.position, **convert.draft_request_args(m))


PAIRS = {
    "SamplingParams": Pair(convert.params_to_proto, convert.params_from_proto, SamplingParams),
    "SparseRow": Pair(lambda rows: convert.rows_to_proto(rows)[0],
                      lambda m: convert.rows_from_proto([m], WIDTH), torch.Tensor,
                      make_engine=lambda: _tensor("proposals")[:1]),
    "GenerateRequest": Pair(lambda r: convert.request_to_proto(r),
                            lambda m: convert.request_from_proto(m, service_limits()),
                            GenerationRequest),
    "OpenRequest": Pair(lambda a: convert.open_request(**a),
                        lambda m: convert.open_request_args(m), convert.open_request),
    # the context oneof: committed (ids) or generated (bytes); None = the other one is sent
    "DraftRequest": Pair(lambda a: convert.draft_request(**a), _draft_call, convert.draft_request,
                         engine_variants=({"generated": None}, {"committed": None})),
    "TokenIds": Pair(lambda ids: convert.draft_request("r", 1, 0, ids, None).committed,
                     lambda m: _draft_call(pb.DraftRequest(committed=m))["committed"], list,
                     make_engine=lambda: [3, 5, 8]),
    "DraftReply": Pair(convert.draft_to_proto, lambda m: convert.draft_from_proto(m, WIDTH),
                       Draft, control=("session_missing",)),  # GrpcDrafter: SessionMissing
    "DraftBranch": Pair(lambda b: convert.draft_to_proto(Draft(branches=[b])).branches[0],
                        lambda m: convert.draft_from_proto(pb.DraftReply(branches=[m]),
                                                           WIDTH).branches[0], Branch),
    "SLRSRequest": Pair(lambda a: convert.slrs_request(**a),
                        lambda m: convert.slrs_request_args(m), convert.slrs_request),
    "SLRSReply": Pair(convert.slrs_to_proto, convert.slrs_from_proto, SLRSOutcome,
                      # no token: no proposal possible this round (engine: None)
                      proto_variants=((), ("token",)),
                      engine_variants=({}, {"token": None}),
                      control=("session_missing",)),  # GrpcDrafter: SessionMissing
    "VerifyRequest": Pair(lambda a: convert.verify_request(**a),
                          lambda m: convert.verify_request_args(m, WIDTH),
                          convert.verify_request),
    "VerifyReply": Pair(convert.verdict_to_proto, convert.verdict_from_proto, Verdict),
    # the vLLM executor's Target.Generate (serve/vllm/wire.py); the drafts' request id is the
    # request's own
    "TargetGenerateRequest": Pair(lambda a: wire.generate_request(**a), wire.generate_args,
                                  wire.generate_request,
                                  engine_variants=({"spec": DraftSpec("rid-0", "slem", "h:1",
                                                                      "déf", 3, True)},
                                                   {"spec": None})),
    "DraftSource": Pair(lambda s: wire.generate_request("r", [1], SamplingParams(), 1, s).drafts,
                        lambda m: wire.generate_args(pb.TargetGenerateRequest(
                            request_id="r", prompt_ids=[1], max_new_tokens=1, drafts=m))["spec"],
                        DraftSpec, make_engine=lambda: DraftSpec("r", "sd", "h:1", "p", 2, True)),
    "TargetStep": Pair(wire.step_to_proto, wire.step_from_proto, Step),
}


@dataclasses.dataclass
class ToProto:
    """A server → client message built from an engine object (no engine-side decoder)."""

    engine: type
    to_proto: typing.Callable
    expect: dict = dataclasses.field(default_factory=dict)  # proto field -> f(engine object)
    consumed: frozenset = frozenset()  # engine fields sent under another name
    not_sent: dict = dataclasses.field(default_factory=dict)  # engine field -> why it stays


def _stats_of(s):
    return convert.stats_to_proto(s, seed=SEED)


FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


TO_ONLY = {
    "Stats": ToProto(RequestStats, _stats_of,
                     expect={"completion_tokens": lambda s: s.emitted, "seed": lambda s: SEED,
                             "timeline": lambda s: [convert.span_to_proto(x) for x in s.timeline]},
                     consumed=frozenset({"emitted"}),
                     not_sent={"replicas": "replica addresses stay inside the service",
                               "round_draft_s": "per-round series for the latency histograms",
                               "round_verify_s": "per-round series for the latency histograms",
                               "round_transport_s": "per-round series for the latency histograms"}),
    "Span": ToProto(Span, convert.span_to_proto),
    "GenerateResponse": ToProto(GenerationResult, lambda r: convert.result_to_proto(r, seed=SEED),
                                expect={"finish_reason": lambda r: FINISH[r.finish_reason],
                                        "stats": lambda r: _stats_of(r.stats)}),
    "GenerateChunk": ToProto(Chunk, lambda c: convert.chunk_to_proto(c, seed=SEED),
                             expect={"finish_reason": lambda c: FINISH[c.result.finish_reason],
                                     "stats": lambda c: _stats_of(c.result.stats)},
                             consumed=frozenset({"result"})),
}

# no engine-side type: built and read field by field where they are used (dataplane.py)
PASS_THROUGH = {"OpenReply", "FreeRequest", "FreeReply"}

MESSAGES = sorted(pb.DESCRIPTOR.message_types_by_name)


def test_every_message_type_is_mapped_once():
    mapped = [*PAIRS, *TO_ONLY, *PASS_THROUGH]
    assert len(mapped) == len(set(mapped)), "a message is mapped twice"
    assert set(MESSAGES) == set(mapped), (
        f"unmapped: {sorted(set(MESSAGES) - set(mapped))}; "
        f"stale: {sorted(set(mapped) - set(MESSAGES))}")
    # a message that convert.py builds or reads must have its converters exercised here
    source = Path(convert.__file__).read_text()
    converted = set(re.findall(r"\bpb\.([A-Z]\w*)", source)) & set(MESSAGES)
    assert not converted & PASS_THROUGH, sorted(converted & PASS_THROUGH)
    assert converted <= set(PAIRS) | set(TO_ONLY), sorted(converted - set(PAIRS) - set(TO_ONLY))


@pytest.mark.parametrize("name", MESSAGES)
def test_every_field_of_every_message_crosses(name):
    desc = pb.DESCRIPTOR.message_types_by_name[name]
    variants = fill_proto_variants(desc)
    assert set().union(*map(_set_fields, variants)) == _all_fields(desc), \
        "the filler missed a field"
    for full in variants:
        assert type(full).FromString(full.SerializeToString()) == full
    if name in PASS_THROUGH:
        return
    if name in TO_ONLY:
        spec = TO_ONLY[name]
        obj = fill_engine(spec.engine)
        msg = spec.to_proto(obj)
        assert isinstance(msg, _msg_class(desc))
        missing = _all_fields(desc) - _set_fields(msg)
        assert not missing, f"{name}: the converter leaves {sorted(missing)} unset"
        for f in desc.fields:
            want = spec.expect.get(f.name, lambda o, n=f.name: getattr(o, n))(obj)
            got = getattr(msg, f.name)
            if f.is_repeated:
                want, got = list(want), list(got)
            assert got == want, f"{name}.{f.name}: {got!r} != {want!r}"
        accounted = _all_fields(desc) | spec.consumed | set(spec.not_sent)
        dropped = {f.name for f in dataclasses.fields(spec.engine)} - accounted
        assert not dropped, f"{spec.engine.__name__} fields that never reach {name}: " \
                            f"{sorted(dropped)}"
        return
    assert name in PAIRS, f"{name} is not mapped"
    pair = PAIRS[name]
    assert set(pair.control) <= _all_fields(desc)
    # proto -> engine -> proto
    covered = set()
    for full in variants:
        for clear in pair.proto_variants:
            msg = type(full)()
            msg.CopyFrom(full)
            for f in (*clear, *pair.control):
                msg.ClearField(f)
            covered |= _set_fields(msg)
            wire = type(msg).FromString(msg.SerializeToString())
            back = pair.to_proto(pair.from_proto(wire))
            assert back == msg, \
                f"{name}: proto → engine → proto changed {_proto_diff(msg, back)}"
    assert covered == _all_fields(desc) - set(pair.control)
    # engine -> proto -> engine
    for overrides in pair.engine_variants:
        obj = pair.make_engine() if pair.make_engine else fill_engine(pair.engine, **overrides)
        msg = pair.to_proto(obj)
        back = pair.from_proto(type(msg).FromString(msg.SerializeToString()))
        if not (dataclasses.is_dataclass(obj) or isinstance(obj, dict)):  # a tensor, a list
            assert _same(obj, back), f"{name}: {obj!r} came back as {back!r}"
        else:
            assert not _engine_diff(obj, back), \
                f"{name}: engine → proto → engine lost {_engine_diff(obj, back)}"
