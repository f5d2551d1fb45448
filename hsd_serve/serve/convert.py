"""Exact conversions between the engine's plain data and the ``hsd.proto`` messages.

Everything that crosses the data plane must come back *identical*: the target verifies drafts
against exactly the proposal rows they were sampled from, so a proposal row survives
dense float32 → ``SparseRow`` → dense float32 bit for bit (entries are selected by their bit
pattern, so ``-0.0`` and NaN payloads travel too; float32 → Python float → proto ``float`` is
exact).  Only float32 tensors are accepted: converting another dtype would change the arithmetic
on the other side.

The client-facing ``request_from_proto`` validates a ``GenerateRequest`` completely and raises
``RequestError(field, message)`` naming the proto field (``sampling.temperature``, ``max_tokens``,
...), which the service maps to ``INVALID_ARGUMENT``.  A sampled request without
``sampling.seed`` gets a fresh random seed (as over HTTP); the response echoes the seed used in
``Stats.seed`` (``result_to_proto`` / ``chunk_to_proto`` take it), so resending it reproduces the
output.

The engine keeps its strings (method names, verification rules, finish reasons); the wire has
enums.  Each is converted here through one ``EnumTable`` that refuses, with ``ValueError``, an
engine string it has no wire value for and a wire value it has no string for (``*_UNSPECIFIED``
or one this release does not know), so a data-plane servicer answers ``INVALID_ARGUMENT``.  Client
code reads a response's ``finish_reason`` with ``finish_reason_from_proto`` ("stop" / "length")
and turns a method name into ``GenerateRequest.method`` with ``method_to_proto``.  A client's
``GenerateRequest.method`` may be ``METHOD_UNSPECIFIED`` (the service's default method) or
``METHOD_AUTO``; a data-plane ``OpenRequest`` carries the method the request resolved to
(``RESOLVED_METHOD``: neither of those).

Every field of every message crosses: ``tests/unit/test_convert.py`` fills each field of each
message type with a non-default value and round-trips it through these converters.

Protobuf types stay inside ``hsd_serve.serve``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from google.protobuf.unknown_fields import UnknownFieldSet

from hsd_serve.core.sampling import SamplingParams, seed_for
from hsd_serve.engine.protocol import EXACT, ROW, SPECULATIVE, Branch, Draft, SLRSOutcome, Verdict
from hsd_serve.engine.types import (Chunk, GenerationRequest, GenerationResult, RequestError,
                                    RequestLimits, RequestStats, Span)
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.serve.config import service_limits

_F32_LE = np.dtype("<f4")


# ------------------------------------------------------------------------------ enums
class EnumTable:
    """An engine string ↔ a proto enum value, one to one, covering every value of the enum but
    its ``*_UNSPECIFIED`` zero; anything else raises ``ValueError`` (both directions)."""

    def __init__(self, what: str, enum, pairs: dict[str, int]):
        self.what, self.enum = what, enum
        self._to = dict(pairs)
        self._from = {v: k for k, v in pairs.items()}
        named = {v.number for v in enum.DESCRIPTOR.values if v.number != 0}
        if len(self._from) != len(self._to) or set(self._from) != named:
            raise RuntimeError(f"{what}: the table does not map every value of "
                               f"{enum.DESCRIPTOR.full_name} exactly once")

    def to_proto(self, value: str) -> int:
        try:
            return self._to[value]
        except (KeyError, TypeError):
            raise ValueError(f"{self.what}: unknown value {value!r}; expected one of "
                             f"{', '.join(self._to)}") from None

    def from_proto(self, number: int) -> str:
        try:
            return self._from[number]
        except (KeyError, TypeError):
            try:
                name = self.enum.Name(number)
            except (ValueError, TypeError):
                name = repr(number)
            raise ValueError(f"{self.what}: {name} is not one of {self.names()}") from None

    def names(self) -> str:
        """The wire names of the values this table maps, comma-separated (for messages)."""
        return ", ".join(self.enum.Name(n) for n in self._from)

    def without(self, *values: str) -> "EnumTable":
        """This table for a field where ``values`` are no valid choice (refused both ways)."""
        sub = copy.copy(self)
        sub._to = {k: v for k, v in self._to.items() if k not in values}
        sub._from = {v: k for k, v in sub._to.items()}
        return sub


METHOD = EnumTable("method", pb.Method, {"ar": pb.METHOD_AR, "sd": pb.METHOD_SD,
                                         "slem": pb.METHOD_SLEM, "tli": pb.METHOD_TLI,
                                         "slrs": pb.METHOD_SLRS, "auto": pb.METHOD_AUTO})
# OpenRequest.method: the method a request resolved to (``Coordinator.resolve_method``), never auto
RESOLVED_METHOD = METHOD.without("auto")
RULE = EnumTable("rule", pb.Rule, {EXACT: pb.RULE_EXACT, SPECULATIVE: pb.RULE_SPECULATIVE,
                                   ROW: pb.RULE_ROW})
FINISH_REASON = EnumTable("finish_reason", pb.FinishReason,
                          {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH})


def method_to_proto(name: str) -> int:
    """A method name as a client gives it → ``GenerateRequest.method``: "" →
    ``METHOD_UNSPECIFIED`` (the service's default method); ar | sd | slem | tli | slrs | auto, in
    any case and with blanks around it (as the service read names before the wire had an enum) →
    its value.  Raises ValueError naming the choices for any other name."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "":
        return pb.METHOD_UNSPECIFIED
    try:
        return METHOD.to_proto(key)
    except ValueError as exc:
        raise ValueError(f"{exc} (or \"\": the service's default)") from None


def finish_reason_from_proto(value: int) -> str:
    """A response's / chunk's ``finish_reason`` → "stop" | "length" ("" for UNSPECIFIED: a
    chunk before the last).  Raises ValueError on a value this release does not know."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return ""
    return FINISH_REASON.from_proto(value)


# ------------------------------------------------------------------------------ sampling
def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=float(params.temperature), top_k=int(params.top_k),
                             top_p=float(params.top_p), seed=int(params.seed))


def params_from_proto(msg: Optional[pb.SamplingParams]) -> SamplingParams:
    """Data-plane decode (the coordinator already validated): ``top_p`` 0 means off (1.0).
    Raises ValueError on invalid values (``SamplingParams`` validates itself)."""
    if msg is None:
        return SamplingParams()
    top_p = 1.0 if msg.top_p == 0.0 else msg.top_p
    return SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=top_p,
                          seed=msg.seed)


# ------------------------------------------------------------------------------ rows
def _require_f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{what} must be float32 to travel exactly, got {t.dtype}")
    return t.detach().to("cpu").contiguous()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varints(a: np.ndarray) -> bytes:
    """Protobuf varints of non-negative integers < 2**35, vectorised."""
    a = a.astype(np.uint64)
    nbytes = np.ones(a.shape, dtype=np.int64)
    for j in range(1, 5):
        nbytes += a >= (1 << (7 * j))
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(5):
        m = nbytes > j
        if not m.any():
            break
        byte = (a[m] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[m] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[m] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _sparse_row(ids: np.ndarray, probs: np.ndarray) -> pb.SparseRow:
    """A SparseRow parsed from its packed wire form (field 1: varint ids; field 2: fixed32
    little-endian floats) — the same message as ``SparseRow(ids=..., probs=...)``, built without
    a Python object per entry."""
    if ids.size == 0:
        return pb.SparseRow()
    id_bytes = _varints(ids)
    prob_bytes = probs.astype(_F32_LE, copy=False).tobytes()
    return pb.SparseRow.FromString(b"\x0a" + _varint(len(id_bytes)) + id_bytes +
                                   b"\x12" + _varint(len(prob_bytes)) + prob_bytes)


def rows_to_proto(rows: Optional[torch.Tensor]) -> list[pb.SparseRow]:
    """``[n, V]`` float32 rows → ``n`` SparseRows holding the entries whose bits are nonzero,
    ids ascending.  ``None`` → no rows."""
    if rows is None:
        return []
    rows = _require_f32(rows, "proposal rows")
    if rows.dim() != 2:
        raise ValueError(f"proposal rows must be 2-D [n, V], got shape {tuple(rows.shape)}")
    if rows.shape[1] >= 2**31:
        raise ValueError("proposal rows are too wide for int32 ids")
    dense = rows.numpy()
    r_idx, c_idx = np.nonzero(dense.view(np.int32))  # row-major: ids ascending within a row
    vals = dense[r_idx, c_idx]
    bounds = np.searchsorted(r_idx, np.arange(rows.shape[0] + 1))
    return [_sparse_row(c_idx[a:b], vals[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def rows_from_proto(rows: Sequence[pb.SparseRow], width: int) -> Optional[torch.Tensor]:
    """SparseRows → dense ``[n, width]`` float32 (zeros elsewhere); no rows → ``None``.
    Raises ValueError on malformed rows (length mismatch, ids out of range or not ascending)."""
    if len(rows) == 0:
        return None
    if width <= 0:
        raise ValueError(f"row width must be positive, got {width}")
    out = np.zeros((len(rows), width), dtype=np.float32)
    for r, row in enumerate(rows):
        if len(row.ids) != len(row.probs):
            raise ValueError(f"proposal row {r}: {len(row.ids)} ids but {len(row.probs)} probs")
        if len(row.ids) == 0:
            continue
        ids = np.array(row.ids, dtype=np.int64)
        if ids[0] < 0 or ids[-1] >= width or (ids.size > 1 and not (ids[1:] > ids[:-1]).all()):
            raise ValueError(f"proposal row {r}: ids must be ascending and in [0, {width})")
        out[r, ids] = np.array(row.probs, dtype=np.float32)  # proto float -> float32: exact
    return torch.from_numpy(out)


def row_to_bytes(row: Optional[torch.Tensor]) -> bytes:
    """A 1-D float32 row → little-endian float32 bytes (``None`` → ``b""``)."""
    if row is None:
        return b""
    row = _require_f32(row, "row")
    if row.dim() != 1:
        raise ValueError(f"row must be 1-D, got shape {tuple(row.shape)}")
    return row.numpy().astype(_F32_LE, copy=False).tobytes()


def row_from_bytes(data: bytes) -> Optional[torch.Tensor]:
    """Little-endian float32 bytes → a fresh 1-D float32 tensor (``b""`` → ``None``)."""
    if not data:
        return None
    if len(data) % 4:
        raise ValueError(f"row bytes must be a multiple of 4 long, got {len(data)}")
    return torch.from_numpy(np.frombuffer(data, dtype=_F32_LE).astype(np.float32))


# ------------------------------------------------------------------------------ drafter messages
def open_request(rid: str, method: str, prompt: str, params: SamplingParams,
                 prompt_ids: Iterable[int]) -> pb.OpenRequest:
    """Raises ValueError for a method a request cannot run with (``auto``: unresolved)."""
    return pb.OpenRequest(request_id=rid, method=RESOLVED_METHOD.to_proto(method), prompt=prompt,
                          sampling=params_to_proto(params), prompt_ids=list(prompt_ids))


def open_request_args(msg: pb.OpenRequest) -> dict:
    """Keyword arguments of ``DrafterWorker.open`` (the inverse of ``open_request``).  Raises
    ValueError on an UNSPECIFIED, AUTO or unknown method."""
    return {"rid": msg.request_id, "method": RESOLVED_METHOD.from_proto(msg.method),
            "prompt": msg.prompt, "params": params_from_proto(msg.sampling),
            "prompt_ids": list(msg.prompt_ids)}


def draft_request(rid: str, k: int, position: int, committed: Optional[Sequence[int]],
                  generated: Optional[bytes], attempt: int = 0, branches: int = 0,
                  span: int = 0) -> pb.DraftRequest:
    """The ``context`` oneof holds ``committed`` (target ids) when it is not ``None``, else
    ``generated`` (bytes; ``None`` sends ``b""``, which is still set)."""
    extra = {"attempt": attempt, "branches": branches, "branch_span": span}
    if committed is not None:
        return pb.DraftRequest(request_id=rid, k=k, position=position,
                               committed=pb.TokenIds(ids=list(committed)), **extra)
    return pb.DraftRequest(request_id=rid, k=k, position=position,
                           generated=bytes(generated or b""), **extra)


def draft_request_args(msg: pb.DraftRequest) -> dict:
    """Keyword arguments of ``DrafterWorker.draft`` after ``rid, k, position`` (the one of
    ``committed`` / ``generated`` not on the wire is ``None``).  Raises ValueError when the
    ``context`` oneof is unset."""
    context = msg.WhichOneof("context")
    extra = {"attempt": msg.attempt, "branches": msg.branches, "span": msg.branch_span}
    if context == "committed":
        return {"committed": list(msg.committed.ids), "generated": None, **extra}
    if context == "generated":
        return {"committed": None, "generated": bytes(msg.generated), **extra}
    raise ValueError("DraftRequest: set one of committed / generated")


def draft_to_proto(d: Draft) -> pb.DraftReply:
    return pb.DraftReply(drafter_ids=list(d.drafter_ids), text=bytes(d.text),
                         target_ids=list(d.target_ids), proposals=rows_to_proto(d.proposals),
                         forwards=int(d.forwards), draft_s=float(d.draft_s),
                         branches=[pb.DraftBranch(at=b.at, drafter_ids=list(b.drafter_ids),
                                                  text=bytes(b.text),
                                                  target_ids=list(b.target_ids))
                                   for b in d.branches])


def draft_from_proto(msg: pb.DraftReply, width: int) -> Draft:
    """``width``: the target vocabulary size the proposal rows span."""
    return Draft(drafter_ids=list(msg.drafter_ids), text=bytes(msg.text),
                 target_ids=list(msg.target_ids), proposals=rows_from_proto(msg.proposals, width),
                 forwards=msg.forwards, draft_s=msg.draft_s,
                 branches=[Branch(b.at, drafter_ids=list(b.drafter_ids), text=bytes(b.text),
                                  target_ids=list(b.target_ids)) for b in msg.branches])


def slrs_request(rid: str, generated: bytes, row: torch.Tensor, position: int) -> pb.SLRSRequest:
    return pb.SLRSRequest(request_id=rid, generated=bytes(generated), row=row_to_bytes(row),
                          position=position)


def slrs_request_args(msg: pb.SLRSRequest) -> dict:
    """Keyword arguments of ``DrafterWorker.slrs_step`` (the inverse of ``slrs_request``;
    ``row`` is ``None`` when none was sent)."""
    return {"rid": msg.request_id, "generated": bytes(msg.generated),
            "row": row_from_bytes(msg.row), "position": msg.position}


def slrs_to_proto(o: SLRSOutcome) -> pb.SLRSReply:
    """``o.token`` ``None`` (no proposal possible this round) leaves ``token`` unset; a negative
    token raises ValueError."""
    msg = pb.SLRSReply(accepted=bool(o.accepted), proposed=bool(o.proposed),
                       drafter_ids=list(o.drafter_ids), forwards=int(o.forwards),
                       draft_s=float(o.draft_s))
    if o.token is not None:
        if o.token < 0:
            raise ValueError(f"SLRS token must be a target id >= 0 or None, got {o.token}")
        msg.token = int(o.token)
    return msg


def slrs_from_proto(msg: pb.SLRSReply) -> SLRSOutcome:
    token = msg.token if msg.HasField("token") else None
    return SLRSOutcome(token=token, accepted=msg.accepted, proposed=msg.proposed,
                       drafter_ids=list(msg.drafter_ids), forwards=msg.forwards,
                       draft_s=msg.draft_s)


# ------------------------------------------------------------------------------ target messages
def verify_request(rid: str, committed: Sequence[int], candidates: Sequence[int], rule: str,
                   params: SamplingParams, position: int,
                   proposals: Optional[torch.Tensor] = None) -> pb.VerifyRequest:
    """Raises ValueError for a rule with no wire value."""
    return pb.VerifyRequest(request_id=rid, committed=list(committed),
                            candidates=list(candidates), rule=RULE.to_proto(rule),
                            sampling=params_to_proto(params), position=position,
                            proposals=rows_to_proto(proposals))


def verify_request_args(msg: pb.VerifyRequest, width: int) -> dict:
    """Keyword arguments of ``VerifyCall`` (the inverse of ``verify_request``); ``width``: the
    target vocabulary size the proposal rows span.  Raises ValueError on malformed rows and on
    an UNSPECIFIED or unknown rule."""
    return {"rid": msg.request_id, "committed": list(msg.committed),
            "candidates": list(msg.candidates), "rule": RULE.from_proto(msg.rule),
            "params": params_from_proto(msg.sampling), "position": msg.position,
            "proposals": rows_from_proto(msg.proposals, width)}


def verdict_to_proto(v: Verdict) -> pb.VerifyReply:
    return pb.VerifyReply(accepted=int(v.accepted), tokens=list(v.tokens),
                          row=row_to_bytes(v.row), verify_s=float(v.verify_s),
                          batch_size=int(v.batch_size))


def verdict_from_proto(msg: pb.VerifyReply) -> Verdict:
    # batch_size 0: a replica that predates the field; it verified this request at least
    return Verdict(accepted=msg.accepted, tokens=list(msg.tokens), row=row_from_bytes(msg.row),
                   verify_s=msg.verify_s, batch_size=max(1, msg.batch_size))


# ------------------------------------------------------------------------------ client-facing
def _client_params(msg: pb.GenerateRequest) -> SamplingParams:
    if not msg.HasField("sampling"):
        return SamplingParams()
    s = msg.sampling
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise RequestError("sampling.temperature",
                           f"must be a finite number >= 0 (0 = greedy), got {s.temperature!r}")
    if s.top_k < 0:
        raise RequestError("sampling.top_k", f"must be >= 0 (0 = off), got {s.top_k}")
    if not math.isfinite(s.top_p) or not 0.0 <= s.top_p <= 1.0:
        raise RequestError("sampling.top_p", f"must be in (0, 1] (0 or 1 = off), got {s.top_p!r}")
    if s.HasField("seed") and s.seed >= 2**63:
        raise RequestError("sampling.seed", f"must be < 2**63, got {s.seed}")
    seed = s.seed if s.HasField("seed") else seed_for(s.temperature)  # as over HTTP
    try:
        return dataclasses.replace(params_from_proto(s), seed=seed)
    except ValueError as exc:  # defensive: SamplingParams' own checks
        raise RequestError("sampling", str(exc)) from exc


_PROTO_FIELDS = {"max_new_tokens": "max_tokens"}  # engine field -> GenerateRequest field
_METHOD_FIELD = pb.GenerateRequest.DESCRIPTOR.fields_by_name["method"].number
_LENGTH_DELIMITED = 2  # the wire type of a string


def _client_method(msg: pb.GenerateRequest, limits: RequestLimits) -> str:
    """``GenerateRequest.method`` → the engine's name: UNSPECIFIED → ``limits.default_method``.
    Raises ``RequestError("method", ...)`` on a value this release does not know (proto3 keeps
    unknown numbers) and on a method name sent as a string (``method`` was a ``string`` before:
    the parser keeps it as an unknown field, which would otherwise run the default method)."""
    if any(f.field_number == _METHOD_FIELD and f.wire_type == _LENGTH_DELIMITED
           for f in UnknownFieldSet(msg)):
        raise RequestError("method", f"a method name sent as a string is no longer accepted; "
                                     f"send the Method enum: one of {METHOD.names()}")
    if msg.method == pb.METHOD_UNSPECIFIED:
        return limits.default_method
    try:
        return METHOD.from_proto(msg.method)
    except ValueError:
        raise RequestError("method", f"unknown value {msg.method}; choose one of "
                                     f"{METHOD.names()}, or leave it unset for the service's "
                                     f"default ({limits.default_method})") from None


def request_from_proto(msg: pb.GenerateRequest,
                       limits: Optional[RequestLimits] = None) -> GenerationRequest:
    """Validate a client ``GenerateRequest`` and build the engine's request.

    Unset (0 / ``METHOD_UNSPECIFIED``) ``max_tokens``, ``lookahead`` and ``method`` take the
    defaults of ``limits`` (default: the service's, ``service_limits()``), which the request is
    then checked against (a ``method`` value this release does not know is refused first).  A
    sampled request without ``sampling.seed`` gets a fresh random seed (``req.params.seed``; echo
    it with ``result_to_proto`` / ``chunk_to_proto``); a greedy one gets 0.

    Raises ``RequestError(field, message)`` with ``field`` the proto field path.  Token-level
    checks (prompt encodes to nothing / exceeds the context, method needs a drafter) happen later
    in ``Coordinator.prepare`` and also raise ``RequestError``.
    """
    limits = service_limits() if limits is None else limits
    req = GenerationRequest(prompt=msg.prompt,
                            max_new_tokens=int(msg.max_tokens or limits.default_max_tokens),
                            method=_client_method(msg, limits),
                            lookahead=int(msg.lookahead or limits.default_lookahead),
                            adaptive_lookahead=bool(msg.adaptive_lookahead), stop=tuple(msg.stop),
                            trace=bool(msg.trace))
    try:
        req.validate(limits)
    except RequestError as exc:  # engine-side names → proto names
        raise RequestError(_PROTO_FIELDS.get(exc.field, exc.field), exc.message) from exc
    req.params = _client_params(msg)  # checked after the limits, as the fields are ordered
    return req


def request_to_proto(req: GenerationRequest) -> pb.GenerateRequest:
    """The client side of ``request_from_proto``: the seed and the method are always set
    (explicitly; ``auto`` is ``METHOD_AUTO``).  Raises ValueError for an unknown method."""
    return pb.GenerateRequest(prompt=req.prompt, max_tokens=int(req.max_new_tokens),
                              sampling=params_to_proto(req.params),
                              method=METHOD.to_proto(req.method),
                              lookahead=int(req.lookahead),
                              adaptive_lookahead=bool(req.adaptive_lookahead),
                              stop=list(req.stop), trace=bool(req.trace))


def stats_to_proto(stats: RequestStats, transport_s: Optional[float] = None, *,
                   seed: int) -> pb.Stats:
    """``seed``: the seed the request ran with (``GenerationRequest.params.seed``)."""
    if transport_s is None:
        transport_s = float(getattr(stats, "transport_s", 0.0))
    return pb.Stats(method=stats.method, rounds=stats.rounds, drafted=stats.drafted,
                    accepted=stats.accepted, acceptance_rate=stats.acceptance_rate,
                    tokens_per_round=stats.tokens_per_round, wall_s=stats.wall_s,
                    tokens_per_s=stats.tokens_per_s, ttft_s=stats.ttft_s,
                    fallback_rounds=stats.fallback_rounds,
                    accepted_per_position=list(stats.accepted_per_position),
                    draft_s=stats.draft_s, verify_s=stats.verify_s, bridge_s=stats.bridge_s,
                    prompt_tokens=stats.prompt_tokens, completion_tokens=stats.emitted,
                    transport_s=transport_s, seed=int(seed),
                    drafted_per_position=list(stats.drafted_per_position),
                    target_forwards=stats.target_forwards,
                    drafter_forwards=stats.drafter_forwards,
                    lookahead_final=stats.lookahead_final, ahead_ready=stats.ahead_ready,
                    ahead_waited=stats.ahead_waited, ahead_stale=stats.ahead_stale,
                    ahead_plain=stats.ahead_plain, ahead_branch=stats.ahead_branch,
                    timeline=[span_to_proto(sp) for sp in stats.timeline])


def span_to_proto(span: Span) -> pb.Span:
    return pb.Span(lane=span.lane, round=span.round, start_s=span.start_s, end_s=span.end_s)


def result_to_proto(result: GenerationResult, transport_s: Optional[float] = None, *,
                    seed: int) -> pb.GenerateResponse:
    """``seed``: the seed the request ran with, echoed in ``stats.seed``."""
    return pb.GenerateResponse(text=result.text, token_ids=list(result.token_ids),
                               finish_reason=FINISH_REASON.to_proto(result.finish_reason),
                               stats=stats_to_proto(result.stats, transport_s, seed=seed))


def chunk_to_proto(chunk: Chunk, transport_s: Optional[float] = None, *,
                   seed: int) -> pb.GenerateChunk:
    """A streamed piece; the last one (``chunk.result`` set) carries finish_reason and stats
    (with ``seed``, the seed the request ran with)."""
    msg = pb.GenerateChunk(text=chunk.text, token_ids=list(chunk.token_ids))
    if chunk.result is not None:
        msg.finish_reason = FINISH_REASON.to_proto(chunk.result.finish_reason)
        msg.stats.CopyFrom(stats_to_proto(chunk.result.stats, transport_s, seed=seed))
    return msg
