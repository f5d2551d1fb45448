"""``TargetGenerateRequest`` / ``TargetStep`` (hsd.proto) ↔ the vLLM path's plain data."""

from __future__ import annotations

from typing import Optional

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.engine import GENERATING_METHODS
from hsd_serve.engine.methods import METHODS
from hsd_serve.engine.protocol import DraftSpec, Step
from hsd_serve.pb import hsd_pb2 as pb
from hsd_serve.serve.convert import FINISH_REASON, RESOLVED_METHOD, params_from_proto, \
    params_to_proto


# what the vLLM path drafts with (SLRS needs the HF path)
DRAFT_METHODS = tuple(m for m in GENERATING_METHODS if METHODS[m].needs_drafter)


def generate_request(rid: str, prompt_ids: list[int], params: SamplingParams,
                     max_new_tokens: int, spec: Optional[DraftSpec]) -> pb.TargetGenerateRequest:
    msg = pb.TargetGenerateRequest(request_id=rid, prompt_ids=list(prompt_ids),
                                   sampling=params_to_proto(params),
                                   max_new_tokens=int(max_new_tokens))
    if spec is not None:
        msg.drafts.CopyFrom(pb.DraftSource(method=RESOLVED_METHOD.to_proto(spec.method),
                                           drafter=spec.drafter, prompt=spec.prompt, k=spec.k,
                                           same_vocab=spec.same_vocab))
    return msg


def generate_args(msg: pb.TargetGenerateRequest) -> dict:
    """Keyword arguments of ``VllmTarget.generate``; ValueError for what cannot run."""
    if not msg.request_id:
        raise ValueError("request_id must be set")
    if not msg.prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if msg.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if min(msg.prompt_ids) < 0:
        raise ValueError("prompt_ids must be token ids >= 0")
    spec = None
    if msg.HasField("drafts"):
        d = msg.drafts
        method = RESOLVED_METHOD.from_proto(d.method)
        if method not in DRAFT_METHODS:
            raise ValueError(f"drafts.method must be one of {', '.join(DRAFT_METHODS)} on the "
                             f"vLLM executor, got {method!r}")
        if not d.drafter or d.k < 1:
            raise ValueError("drafts needs a drafter address and k >= 1")
        spec = DraftSpec(msg.request_id, method, d.drafter, d.prompt, int(d.k), d.same_vocab)
    return dict(rid=msg.request_id, prompt_ids=list(msg.prompt_ids),
                params=params_from_proto(msg.sampling), max_new_tokens=int(msg.max_new_tokens),
                spec=spec)


def step_to_proto(step: Step) -> pb.TargetStep:
    reason = pb.FINISH_REASON_UNSPECIFIED
    if step.finished:
        reason = FINISH_REASON.to_proto("stop" if step.finish_reason == "stop" else "length")
    return pb.TargetStep(token_ids=step.token_ids, finished=step.finished, finish_reason=reason,
                         drafted=step.drafted, accepted=step.accepted,
                         drafted_per_position=step.drafted_per_position,
                         accepted_per_position=step.accepted_per_position,
                         step_s=step.step_s, draft_s=step.draft_s)


def step_from_proto(msg: pb.TargetStep) -> Step:
    reason = FINISH_REASON.from_proto(msg.finish_reason) if msg.finished else None
    return Step(list(msg.token_ids), msg.finished, reason, msg.drafted, msg.accepted,
                list(msg.drafted_per_position), list(msg.accepted_per_position),
                step_s=msg.step_s, draft_s=msg.draft_s)
