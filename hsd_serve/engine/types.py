"""Plain data for one request: what was asked, what came out, and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from hsd_serve.core.sampling import SamplingParams

METHODS = ("ar", "sd", "slem", "tli", "slrs", "auto")


class RequestError(ValueError):
    """The request is invalid; ``field`` names the offending field (maps to 400/INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # picklable across processes (Ray) with both fields
        return (type(self), (self.field, self.message))


@dataclass
class GenerationRequest:
    prompt: str
    max_new_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    method: str = "auto"
    lookahead: int = 4
    adaptive_lookahead: bool = False
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise RequestError("prompt", "must be a string")
        if self.method not in METHODS:
            raise RequestError("method", f"unknown method {self.method!r}; choose one of "
                                         f"{', '.join(METHODS)}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or not 1 <= self.max_new_tokens <= 1_000_000:
            raise RequestError("max_new_tokens", f"must be an integer in [1, 1000000], got "
                                                 f"{self.max_new_tokens!r}")
        if not isinstance(self.lookahead, int) or isinstance(self.lookahead, bool) \
                or not 1 <= self.lookahead <= 64:
            raise RequestError("lookahead", f"must be an integer in [1, 64], got {self.lookahead!r}")
        if len(self.stop) > 16:
            raise RequestError("stop", "at most 16 stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError("stop", "stop strings must be non-empty strings")
            if len(s) > 1024:
                raise RequestError("stop", "a stop string is longer than 1024 characters")


@dataclass
class RequestStats:
    method: str = ""
    rounds: int = 0
    drafted: int = 0  # candidate/draft tokens checked by the target
    accepted: int = 0
    emitted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    fallback_rounds: int = 0  # rounds that ran target-only (no usable draft)
    draft_s: float = 0.0
    verify_s: float = 0.0
    bridge_s: float = 0.0
    ttft_s: float = 0.0
    wall_s: float = 0.0
    prompt_tokens: int = 0
    target_forwards: int = 0
    drafter_forwards: int = 0
    lookahead_final: int = 0
    transport_s: float = 0.0  # round wall time not spent drafting, verifying or bridging
    replicas: dict = field(default_factory=dict)  # service only: addresses leased per role
    # per-round timings (seconds) for latency histograms; not part of as_dict()
    round_draft_s: list[float] = field(default_factory=list)
    round_verify_s: list[float] = field(default_factory=list)
    round_transport_s: list[float] = field(default_factory=list)

    def record_round(self, drafted: int, accepted: int, emitted: int = 0,
                     fallback: bool = False, timing: Optional[tuple[float, float, float, float]]
                     = None) -> None:
        """Count one round; ``timing`` = (wall, draft, verify, bridge) seconds of this round."""
        if timing is not None:
            wall, draft, verify, bridge = timing
            other = max(0.0, wall - draft - verify - bridge)
            self.round_draft_s.append(draft)
            self.round_verify_s.append(verify)
            self.round_transport_s.append(other)
            self.transport_s += other
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        self.fallback_rounds += int(fallback)
        for i in range(drafted):
            if i >= len(self.drafted_per_position):
                self.drafted_per_position.append(0)
                self.accepted_per_position.append(0)
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += int(i < accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.emitted / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        return (self.wall_s - self.ttft_s) / (self.emitted - 1) if self.emitted > 1 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("round_draft_s", "round_verify_s", "round_transport_s"):
            d.pop(key)
        d.update(tpot_s=self.tpot_s, acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round,
                 tokens_per_s=self.tokens_per_s)
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    stats: RequestStats

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "stats": self.stats.as_dict()}


@dataclass
class Chunk:
    """A streamed piece: new committed target ids and the newly complete text."""

    token_ids: list[int]
    text: str
    result: Optional[GenerationResult] = None  # set on the last chunk
