"""Proto conversions are exact, and client requests are validated field by field."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.core.speculative import truncate_proposal
from hsd_serve.engine.protocol import Draft, SLRSOutcome, Verdict
from hsd_serve.engine.types import Chunk, GenerationResult, RequestError, RequestStats
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.serve import convert
from hsd_serve.serve.convert import RequestDefaults, request_from_proto


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
              forwards=2, draft_s=0.25)
    wire = pb.DraftReply.FromString(convert.draft_to_proto(d).SerializeToString())
    back = convert.draft_from_proto(wire, 100)
    assert_bit_identical(back.proposals, rows)
    back.proposals = d.proposals
    assert back == d
    assert convert.draft_from_proto(convert.draft_to_proto(Draft()), 100) == Draft()
    v = Verdict(accepted=2, tokens=[1, 2, 3], verify_s=0.5)
    assert convert.verdict_from_proto(convert.verdict_to_proto(v)) == v
    vr = convert.verdict_from_proto(convert.verdict_to_proto(Verdict(row=rows[0])))
    assert_bit_identical(vr.row, rows[0])
    o = SLRSOutcome(token=7, accepted=True, proposed=True, drafter_ids=[1, 2], forwards=3,
                    draft_s=0.125)
    assert convert.slrs_from_proto(convert.slrs_to_proto(o)) == o
    ids_req = convert.draft_request("r", 3, 4, [1, 2], None)
    assert convert.draft_request_args(ids_req) == {"committed": [1, 2], "generated": None}
    txt_req = convert.draft_request("r", 3, 4, None, b"")
    assert convert.draft_request_args(txt_req) == {"committed": None, "generated": b""}


def test_result_and_chunks_to_proto():
    stats = RequestStats(method="tli")
    stats.record_round(3, 2, emitted=3)
    stats.wall_s = 0.5
    res = GenerationResult("abc", [1, 2, 3], "length", stats)
    msg = convert.result_to_proto(res, transport_s=0.01)
    assert (msg.text, list(msg.token_ids), msg.finish_reason) == ("abc", [1, 2, 3], "length")
    assert (msg.stats.rounds, msg.stats.drafted, msg.stats.accepted) == (1, 3, 2)
    assert msg.stats.completion_tokens == 3 and msg.stats.tokens_per_s == 6.0
    assert math.isclose(msg.stats.acceptance_rate, 2 / 3) and msg.stats.transport_s == 0.01
    assert list(msg.stats.accepted_per_position) == [1, 1, 0]
    mid = convert.chunk_to_proto(Chunk([1], "a"))
    assert not mid.HasField("stats") and mid.finish_reason == ""
    last = convert.chunk_to_proto(Chunk([2, 3], "bc", result=res))
    assert last.finish_reason == "length" and last.stats.rounds == 1


# ------------------------------------------------------------------------------ client requests
DEFAULTS = RequestDefaults(max_tokens=32, lookahead=5, max_prompt_chars=100, max_max_tokens=256,
                           method="auto")


def test_request_defaults_and_values():
    req = request_from_proto(pb.GenerateRequest(prompt="hi"), DEFAULTS)
    assert (req.prompt, req.max_new_tokens, req.lookahead, req.method) == ("hi", 32, 5, "auto")
    assert req.params == SamplingParams() and req.stop == ()
    req = request_from_proto(pb.GenerateRequest(
        prompt="x" * 100, max_tokens=256, method="TLI", lookahead=64, adaptive_lookahead=True,
        stop=["\n\n", "x" * 1024], sampling=pb.SamplingParams(temperature=0.8, top_k=5, top_p=0,
                                                              seed=9)), DEFAULTS)
    assert (req.max_new_tokens, req.method, req.lookahead, req.adaptive_lookahead) == \
        (256, "tli", 64, True)
    assert req.params == SamplingParams(temperature=0.8, top_k=5, top_p=1.0, seed=9)
    assert req.stop == ("\n\n", "x" * 1024)


BAD = [
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt="x" * 101)),
    ("method", dict(method="beam")),
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
       method=st.sampled_from(["", "ar", "sd", "slem", "tli", "slrs", "auto", "x", "gready"]))
def test_request_fuzz_accepts_exactly_the_valid(temperature, top_p, top_k, max_tokens,
                                                lookahead, method):
    msg = pb.GenerateRequest(prompt="p", max_tokens=max_tokens, lookahead=lookahead,
                             method=method, sampling=pb.SamplingParams(
                                 temperature=temperature, top_p=top_p, top_k=top_k))
    errors = []
    if method not in ("", "ar", "sd", "slem", "tli", "slrs", "auto"):
        errors.append("method")
    if max_tokens > DEFAULTS.max_max_tokens:
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
        assert 1 <= req.max_new_tokens <= DEFAULTS.max_max_tokens
        assert 1 <= req.lookahead <= 64


def test_request_defaults_validate_themselves():
    with pytest.raises(ValueError):
        RequestDefaults(lookahead=65)
    with pytest.raises(ValueError):
        RequestDefaults(max_tokens=10, max_max_tokens=5)
    with pytest.raises(ValueError):
        RequestDefaults(method="beam")
