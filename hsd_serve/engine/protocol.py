"""What the coordinator and the drafter/target workers exchange each round (plain data).

The same objects travel in-process (``engine.local``) and, converted to ``hsd.proto`` messages, over
gRPC (``serve``).  The coordinator's committed tokens are the truth: every call carries what the
worker needs to rebuild its cache, so a worker that lost a request's session costs a prefill,
never a wrong token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# Verification rules a target worker applies.
EXACT = "exact"  # AR and SLEM: emit the target's own choices while candidates agree
SPECULATIVE = "speculative"  # SD and TLI: speculative sampling against the sent proposals
ROW = "row"  # SLRS: return the target's processed row; the drafter side decides


class DrafterFailed(Exception):
    """The drafter could not serve this round (the cause is chained): the round runs target-only.
    Raised for drafter calls and for turning what the drafter sent into candidates; a failing
    target fails the request as it would under AR."""


class SessionMissing(KeyError):
    """The worker has no session for this request (evicted or restarted): open it again."""


@dataclass
class Draft:
    """A drafter worker's answer for one round."""

    drafter_ids: list[int] = field(default_factory=list)  # drafter tokens proposed
    text: bytes = b""  # SLEM: the drafted bytes continuing the committed text
    target_ids: list[int] = field(default_factory=list)  # SD/TLI: proposals as target ids
    proposals: Optional[torch.Tensor] = None  # SD/TLI: [len(target_ids), V_target] rows sampled from
    forwards: int = 0
    draft_s: float = 0.0


@dataclass
class Verdict:
    """A target worker's answer for one round."""

    accepted: int = 0
    tokens: list[int] = field(default_factory=list)  # emitted target ids
    row: Optional[torch.Tensor] = None  # ROW rule: processed target row [V_target]
    verify_s: float = 0.0
    batch_size: int = 1  # requests verified in the same forward pass (replica load signal)


@dataclass
class SLRSOutcome:
    # the target token this round emits; None: no proposal possible (the drafter is
    # mid-character), and the coordinator takes a plain target step instead
    token: Optional[int]
    accepted: bool
    proposed: bool
    drafter_ids: list[int] = field(default_factory=list)
    forwards: int = 0
    draft_s: float = 0.0


@dataclass
class Step:
    """A target that runs whole requests itself (the vLLM executor) yields one per engine output:
    the target ids it added, the request's draft counts (its totals; vLLM reports them with the
    last step), also per position in a step's draft, and where the round's time went."""

    token_ids: list[int]
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" once finished
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    # this output's round on the target's side: seconds since its previous output (0: not
    # measured) and the part of them the engine spent getting drafts
    step_s: float = 0.0
    draft_s: float = 0.0


SPEC_KEY = "hsd"  # SamplingParams.extra_args[SPEC_KEY]: the request's DraftSpec as a dict


@dataclass(frozen=True)
class DraftSpec:
    """What a generating target's proposer needs to fetch a request's drafts (travels inside
    vLLM as ``SamplingParams.extra_args[SPEC_KEY]``: plain msgpack-able data)."""

    request_id: str
    method: str  # slem | tli | sd
    drafter: str  # "host:port" of the leased drafter replica's data plane
    prompt: str  # the prompt text (the drafter session opens on it)
    k: int
    same_vocab: bool = False

    def to_extra_args(self) -> dict:
        return {SPEC_KEY: {"request_id": self.request_id, "method": self.method,
                           "drafter": self.drafter, "prompt": self.prompt, "k": int(self.k),
                           "same_vocab": bool(self.same_vocab)}}

    @classmethod
    def from_extra_args(cls, extra: Optional[dict]) -> Optional["DraftSpec"]:
        d = (extra or {}).get(SPEC_KEY)
        return cls(**d) if d else None
