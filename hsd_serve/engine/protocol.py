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
    token: int
    accepted: bool
    proposed: bool
    drafter_ids: list[int] = field(default_factory=list)
    forwards: int = 0
    draft_s: float = 0.0
