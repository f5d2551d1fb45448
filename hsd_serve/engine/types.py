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


# The engine's own caps: the in-process limits, and the ceiling of any other limits (the engine
# checks every request against the in-process limits, whichever front door it came through).
MAX_NEW_TOKENS = 1_000_000
MAX_LOOKAHEAD = 64
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for, and the defaults for what it leaves out: the one place these
    are kept.  ``GenerationRequest.validate(limits)`` is the one check; the front doors (gRPC
    ``convert.request_from_proto``, the OpenAI request builders) fill defaults from here, call it
    and rename its fields.

    The class defaults are the in-process limits (``hsd-serve generate``, ``Engine``); the engine
    checks every request against them (``Coordinator.prepare``), so no limits go past the
    ``MAX_*`` caps.  The service's limits come from its config: ``AppConfig.request_limits()``.
    """

    max_prompt_chars: Optional[int] = None  # None: no limit (the target's context still applies)
    max_tokens_limit: int = MAX_NEW_TOKENS  # largest max_new_tokens
    default_max_tokens: int = 128
    max_lookahead: int = MAX_LOOKAHEAD
    default_lookahead: int = 4
    default_method: str = "auto"
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_chars: int = MAX_STOP_CHARS  # characters in one stop string
    allow_empty_prompt: bool = True  # the service refuses "" (in-process it may encode to BOS)

    def __post_init__(self) -> None:
        _check_limit("max_tokens_limit", self.max_tokens_limit, 1, MAX_NEW_TOKENS)
        _check_limit("max_lookahead", self.max_lookahead, 1, MAX_LOOKAHEAD)
        _check_limit("max_stop_strings", self.max_stop_strings, 0, MAX_STOP_STRINGS)
        _check_limit("max_stop_chars", self.max_stop_chars, 1, MAX_STOP_CHARS)
        if self.max_prompt_chars is not None:
            _check_limit("max_prompt_chars", self.max_prompt_chars, 1, None)
        _check_limit("default_max_tokens", self.default_max_tokens, 1, self.max_tokens_limit)
        _check_limit("default_lookahead", self.default_lookahead, 1, self.max_lookahead)
        if self.default_method not in METHODS:
            raise ValueError(f"RequestLimits: default_method must be one of {', '.join(METHODS)}, "
                             f"got {self.default_method!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_limit(name: str, value: object, low: int, top: Optional[int]) -> None:
    if not _is_int(value) or value < low or (top is not None and value > top):
        bound = f"in [{low}, {top}]" if top is not None else f">= {low}"
        raise ValueError(f"RequestLimits: {name} must be an integer {bound}, got {value!r}")


IN_PROCESS_LIMITS = RequestLimits()


@dataclass
class GenerationRequest:
    prompt: str
    max_new_tokens: int = IN_PROCESS_LIMITS.default_max_tokens
    params: SamplingParams = field(default_factory=SamplingParams)
    method: str = IN_PROCESS_LIMITS.default_method
    lookahead: int = IN_PROCESS_LIMITS.default_lookahead
    adaptive_lookahead: bool = False
    stop: tuple[str, ...] = ()
    trace: bool = False  # record the per-round timeline in ``RequestStats.timeline``

    def validate(self, limits: Optional[RequestLimits] = None) -> None:
        """Raise ``RequestError`` naming the first field outside ``limits`` (default: the
        in-process limits).  Field names are the engine's (``max_new_tokens``); front doors
        rename them."""
        limits = IN_PROCESS_LIMITS if limits is None else limits
        self._check_prompt(limits)
        if self.method not in METHODS:
            raise RequestError("method", f"unknown method {_quote(self.method)}; choose one of "
                                         f"{', '.join(METHODS)}")
        _check_field("max_new_tokens", self.max_new_tokens, limits.max_tokens_limit)
        _check_field("lookahead", self.lookahead, limits.max_lookahead)
        self._check_stop(limits)

    def _check_prompt(self, limits: RequestLimits) -> None:
        if not isinstance(self.prompt, str):
            raise RequestError("prompt", "must be a string")
        if not self.prompt and not limits.allow_empty_prompt:
            raise RequestError("prompt", "must not be empty")
        if limits.max_prompt_chars is not None and len(self.prompt) > limits.max_prompt_chars:
            raise RequestError("prompt", f"is {len(self.prompt)} characters; the limit is "
                                         f"{limits.max_prompt_chars}")

    def _check_stop(self, limits: RequestLimits) -> None:
        if len(self.stop) > limits.max_stop_strings:
            raise RequestError("stop", f"at most {limits.max_stop_strings} stop strings, got "
                                       f"{len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError("stop", "stop strings must be non-empty strings")
            if len(s) > limits.max_stop_chars:
                raise RequestError("stop", f"a stop string is {len(s)} characters; the limit is "
                                           f"{limits.max_stop_chars}")


def _check_field(name: str, value: object, top: int) -> None:
    if not _is_int(value) or not 1 <= value <= top:
        raise RequestError(name, f"must be an integer in [1, {top}], got {_quote(value)}")


def _quote(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut short: a refusal must not echo a client's megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
    lookahead_final: int = 0  # k for the next round when the request ended (adaptive, load-capped)
    # drafting ahead (overlap): rounds whose draft was ready (drafted while the target verified
    # the previous round), rounds that asked for a fresh one, rounds that took a plain target
    # step while the drafter drafted ahead (overlap_miss: plain), drafted-ahead tokens dropped
    ahead_ready: int = 0
    ahead_waited: int = 0
    ahead_plain: int = 0
    ahead_branch: int = 0  # ... of the ahead_ready rounds, those whose draft was a branch
    ahead_stale: int = 0
    transport_s: float = 0.0  # round wall time not spent drafting, verifying or bridging
    replicas: dict = field(default_factory=dict)  # service only: addresses leased per role
    # per-round timings (seconds) for latency histograms; not part of as_dict()
    round_draft_s: list[float] = field(default_factory=list)
    round_verify_s: list[float] = field(default_factory=list)
    round_transport_s: list[float] = field(default_factory=list)
    timeline: list["Span"] = field(default_factory=list)  # with GenerationRequest.trace

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
        if not self.timeline:
            d.pop("timeline")
        d.update(tpot_s=self.tpot_s, acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round,
                 tokens_per_s=self.tokens_per_s)
        return d


@dataclass
class Span:
    """One span of a traced request's timeline, seconds from the request's start at the
    coordinator: lane "draft" (a draft the round waited for), "draft ahead" (drafted while the
    target verified round ``round``, overlap) or "verify"."""

    lane: str
    round: int
    start_s: float
    end_s: float


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
