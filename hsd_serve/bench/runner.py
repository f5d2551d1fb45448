"""Run the benchmark: methods side by side on the same prompts, interleaved prompt by prompt.

For every (dataset, temperature) AR runs as well, so every ratio is against AR from the same
process run.  After a warm-up request per method, each prompt is sent to every configured method
(the order rotates from prompt to prompt so no method always runs first), then the samples are
aggregated into one ``run`` per (dataset, method, temperature, lookahead).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from hsd_serve.bench.datasets import (LONG_CONTEXT, Prompt, context_fitter, fit_prompts,
                                      load_prompts)
from hsd_serve.bench.metrics import (alpha_from_tokens_per_round, conditional_alpha, geomean,
                                     ideal_speedup, mean, percentile, ratio, rnd, rotated)
from hsd_serve.engine.types import MAX_LOOKAHEAD

log = logging.getLogger(__name__)

BENCH_METHODS = ("ar", "sd", "slem", "tli", "slrs", "hf-uag", "hf-ar", "vllm-ar", "vllm-hetero",
                 "vllm-serve")
HF = "hf-uag"
HF_AR = "hf-ar"  # transformers' plain generate(): a reference for AR and for hf-uag
VLLM_AR = "vllm-ar"  # vLLM alone on the target (no speculative config): the vLLM executor's AR
VLLM_HETERO = "vllm-hetero"  # vLLM's own draft_model drafting with use_heterogeneous_vocab
# vLLM's own OpenAI server (`vllm serve`) on the target, measured over HTTP: the served baseline
VLLM_SERVE = "vllm-serve"
VLLM_BASELINES = (VLLM_AR, VLLM_HETERO, VLLM_SERVE)
BASELINES = (HF, HF_AR) + VLLM_BASELINES
PLAIN = ("ar", HF_AR, VLLM_AR, VLLM_SERVE)  # no drafting


# drafting ahead (--overlap on,branches,wait,off): variant -> the setting measured (True: overlap
# with the target never waiting, overlap_miss plain; "branches": the same, each draft made ahead
# also drafting branches, overlap_branches > 0; "wait": overlap, rounds that miss wait for a draft)
OVERLAP_SETTINGS = {"overlap": True, "overlap, branches": "branches", "overlap, wait": "wait",
                    "no overlap": False}
OVERLAP_VARIANTS = {v: bool(s) for v, s in OVERLAP_SETTINGS.items()}  # variant -> overlap on
OVERLAP_MISS = {"overlap": "plain", "overlap, branches": "plain",
                "overlap, wait": "wait"}  # variant -> overlap_miss
OVERLAP_LABELS = {s: v for v, s in OVERLAP_SETTINGS.items()}  # setting -> variant


def overlap_variant(setting) -> str:
    """The variant label of an ``--overlap`` setting (True, False, "branches" or "wait")."""
    return OVERLAP_LABELS[setting]


# in-process HF target, the drafter on each backend measured side by side (--drafter-executor)
DRAFTER_VARIANTS = {"drafter hf": "hf", "drafter vllm": "vllm",
                    "drafter hf-transformers": "hf-transformers"}
# what runs our drafter: hf (plain-torch forwards where the architecture allows, models.plain),
# hf-transformers (the same model through transformers' modules), vllm
DRAFTER_BACKENDS = ("hf", "hf-transformers", "vllm")


@dataclass(frozen=True)
class RunSpec:
    """One configuration measured on every prompt."""

    method: str
    temperature: float
    lookahead: int  # 0 for AR; hf-uag "default": its own num_assistant_tokens
    variant: str = ""  # hf-uag: "default" (its settings) | "matched" (its lookahead = ours);
    # ours with drafting ahead measured several ways: "overlap" | "overlap, wait" |
    # "no overlap" (OVERLAP_SETTINGS); ours with the drafter
    # on each backend: "drafter hf" | "drafter vllm"

    @property
    def label(self) -> str:
        if self.method in PLAIN:
            return self.method
        if self.method == HF and self.variant == "default":
            return f"{HF} (default, k={self.lookahead})"
        if self.variant in OVERLAP_VARIANTS or self.variant in DRAFTER_VARIANTS:
            return f"{self.method} k={self.lookahead} ({self.variant})"
        return f"{self.method} k={self.lookahead}"

    @property
    def identity_required(self) -> bool:
        """Our methods must reproduce AR token for token when greedy, and SLEM at any
        temperature (position-keyed randomness: same seed, same tokens)."""
        if self.method in ("ar",) + BASELINES:
            return False
        return self.temperature == 0 or self.method == "slem"


@dataclass
class Sample:
    """One request's measurements."""

    dataset: str
    prompt_id: str
    spec: RunSpec
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    wall_s: float
    ttft_s: float
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: Optional[list[int]] = field(default_factory=list)
    fallback_rounds: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    bridge_s: float = 0.0
    transport_s: float = 0.0
    target_forwards: int = 0
    drafter_forwards: int = 0
    server_wall_s: Optional[float] = None  # endpoint runs: the service's own wall time
    drafter_call_s: Optional[float] = None  # in-process: wall time inside drafter-port calls
    target_call_s: Optional[float] = None  # in-process: wall time inside target-port calls
    seed: int = 0
    nll: Optional[float] = None  # mean target NLL of the sampled tokens (temperature > 0)
    hf_settings: Optional[dict] = None
    concurrency: int = 1
    emitted: Optional[int] = None  # tokens emitted (defaults to len(token_ids))
    # the per-round timeline (GenerateRequest.trace; in-process on the HF executor, and one
    # stream of a gRPC endpoint): [lane, round, start_s, end_s] per span
    timeline: Optional[list] = None

    @property
    def n_tokens(self) -> int:
        return self.emitted if self.emitted is not None else len(self.token_ids)

    @property
    def tpot_s(self) -> Optional[float]:
        n = self.n_tokens
        return (self.wall_s - self.ttft_s) / (n - 1) if n > 1 else None

    def record(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("spec", "token_ids")}
        d.update(method=self.spec.method, temperature=self.spec.temperature,
                 lookahead=self.spec.lookahead, variant=self.spec.variant,
                 label=self.spec.label, tokens=self.n_tokens, tpot_s=self.tpot_s,
                 token_ids=self.token_ids)
        return rnd(d, 6)

    @classmethod
    def from_result(cls, dataset: str, prompt_id: str, spec: RunSpec, result, seed: int) -> "Sample":
        s = result.stats
        return cls(dataset=dataset, prompt_id=prompt_id, spec=spec, prompt_tokens=s.prompt_tokens,
                   token_ids=list(result.token_ids), text=result.text,
                   finish_reason=result.finish_reason, wall_s=s.wall_s, ttft_s=s.ttft_s,
                   rounds=s.rounds, drafted=s.drafted, accepted=s.accepted,
                   accepted_per_position=list(s.accepted_per_position),
                   drafted_per_position=list(s.drafted_per_position),
                   fallback_rounds=s.fallback_rounds, draft_s=s.draft_s, verify_s=s.verify_s,
                   bridge_s=s.bridge_s, transport_s=s.transport_s,
                   target_forwards=s.target_forwards, drafter_forwards=s.drafter_forwards,
                   seed=seed, timeline=span_lists(s.timeline))


def span_lists(spans) -> Optional[list]:
    """A request's timeline (engine ``Span``s or their protos) as ``Sample.timeline``: [lane,
    round, start_s, end_s] per span; None when it has none."""
    return [[sp.lane, sp.round, sp.start_s, sp.end_s] for sp in spans] or None


@dataclass
class BenchConfig:
    datasets: Sequence[str] = ("humaneval",)
    data_dir: Optional[str] = None
    limit: Optional[int] = 20
    methods: Sequence[str] = ("ar", "slem", "tli", HF)
    temperatures: Sequence[float] = (0.0,)
    lookaheads: Sequence[int] = (4,)
    max_new_tokens: int = 64
    target: Optional[str] = None
    drafter: Optional[str] = None
    drafter_head_ids: int = 0  # prune our drafter's output head (hf-uag keeps the full one)
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    warmup: bool = True
    hf_default: bool = True  # also run hf-uag with its own default settings
    calibration_steps: int = 16
    threads: Optional[int] = None
    nll: bool = True  # target NLL of sampled outputs (temperature > 0), outside the timing
    # what executes the target: "hf" (our executor; the reference AR is "ar") or "vllm" (the
    # reference is vllm-ar, vLLM alone; in-process, our methods run on serve.vllm.VllmEngine)
    executor: str = "hf"
    vllm: Optional[dict] = None  # VllmOptions fields for the in-process vLLM engines
    # drafting ahead (overlap; vllm.overlap) on, off or both side by side (vLLM executor
    # in-process: one engine each; with --endpoint: what the service runs, recorded as given)
    overlap: tuple = (False,)
    # in-process: what executes the drafter, one or several side by side (DRAFTER_BACKENDS)
    drafter_executors: tuple = ("hf",)
    # endpoint mode
    endpoint: Optional[str] = None
    application: str = "hsd"
    concurrency: Sequence[int] = (1,)
    duration: Optional[float] = None
    # load phases: passes over the methods (rotated order); aggregate tok/s is their median
    repeats: int = 1
    timeout_s: float = 600.0
    command: str = ""

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in BENCH_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from "
                             f"{', '.join(BENCH_METHODS)}")
        if not self.lookaheads or any(k < 1 or k > MAX_LOOKAHEAD for k in self.lookaheads):
            raise ValueError(f"--lookahead values must be in [1, {MAX_LOOKAHEAD}]")
        if any(t < 0 for t in self.temperatures):
            raise ValueError("--temperature values must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        if self.drafter_head_ids < 0:
            raise ValueError("--drafter-head-ids must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")
        if any(c < 1 for c in self.concurrency):
            raise ValueError("--concurrency values must be >= 1")
        if self.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        if len({repr(v) for v in self.overlap}) != len(self.overlap):
            raise ValueError("--overlap: give each of on, branches, wait, off at most once")
        if "branches" in self.overlap and self.endpoint is None:
            raise ValueError("--overlap branches (drafting ahead with branches) measures a "
                             "service's HF-executor application (--endpoint); the vLLM "
                             "executor drafts one path ahead")
        if self.executor not in ("hf", "vllm"):
            raise ValueError("--executor must be hf or vllm")
        if self.endpoint is None and self.executor == "hf" and any(c != 1 for c in
                                                                   self.concurrency):
            raise ValueError("--concurrency needs --endpoint or --executor vllm (the in-process "
                             "HF engine runs one request at a time)")
        if set(self.drafter_executors) - set(DRAFTER_BACKENDS) or not self.drafter_executors:
            raise ValueError("--drafter-executor must be a comma list of "
                             + ", ".join(DRAFTER_BACKENDS))
        if self.drafter_executors != ("hf",) and self.endpoint:
            raise ValueError("--drafter-executor runs in-process (a service runs its config's "
                             "drafter_executor)")
        if self.executor == "hf" and self.endpoint is None and any(self.overlap):
            raise ValueError("--overlap on with the in-process HF executor: drafting ahead needs "
                             "the drafter in another process; measure it against a service "
                             "(--endpoint, bench/service_config_overlap_ab.yaml)")
        if self.drafter_executors != ("hf",) and len(set(self.overlap)) > 1:
            raise ValueError("--drafter-executor with --overlap on,off: measure one at a time")
        if self.executor == "hf" and self.endpoint is None and set(self.methods) & set(
                VLLM_BASELINES):
            raise ValueError("vllm-ar, vllm-hetero and vllm-serve need --executor vllm or "
                             "--endpoint")

    @property
    def reference(self) -> str:
        """The method every other run is compared with (speedup, identical output)."""
        return VLLM_AR if self.executor == "vllm" else "ar"


def per_drafter_backend(specs: list[RunSpec], backends: Sequence[str]) -> list[RunSpec]:
    """Each drafting spec once per drafter backend (variant "drafter hf" / "drafter vllm"),
    unless only the HF drafter is measured."""
    if tuple(backends) == ("hf",):
        return list(specs)
    return [RunSpec(s.method, s.temperature, s.lookahead, f"drafter {b}")
            if s.method not in PLAIN + BASELINES else s
            for s in specs for b in (backends if s.method not in PLAIN + BASELINES else [None])]


def build_specs(methods: Sequence[str], temperatures: Sequence[float], lookaheads: Sequence[int],
                *, hf_default_lookahead: Optional[int] = None,
                reference: str = "ar") -> list[RunSpec]:
    """The reference (AR, or vllm-ar), AR, and every method × lookahead at every temperature
    (the reference and AR are always included)."""
    specs: list[RunSpec] = []
    for t in temperatures:
        t = float(t)
        specs += [RunSpec(m, t, 0) for m in dict.fromkeys((reference, "ar"))]
        for m in dict.fromkeys(methods):
            if m in ("ar", reference):
                continue
            if m in PLAIN:
                specs.append(RunSpec(m, t, 0))
                continue
            if m == HF and hf_default_lookahead is not None:
                specs.append(RunSpec(HF, t, int(hf_default_lookahead), "default"))
            for k in dict.fromkeys(lookaheads):
                specs.append(RunSpec(m, t, int(k), "matched" if m == HF else ""))
    return specs


# ---------------------------------------------------------------------------- machine info


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": None}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():  # pragma: no cover - CPU machine here
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    try:
        repo = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, text=True,
                               capture_output=True, timeout=10).stdout.strip()
        if rev:
            info["git"] = rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        pass
    return info


# ---------------------------------------------------------------------------- calibration


def _step_times(model, ids: list[int], steps: int, verify_ks: Sequence[int]) -> dict:
    """Median single-token forward time after a prefill of ``ids`` (the decode step the engine
    runs), and the time of a verification forward (``k`` candidates after the last committed
    token, ``k+1`` tokens), through ``Session.forward_from``."""
    sess = model.new_session()
    ctx = list(ids)
    sess.forward_from(ctx)  # prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = sess.forward_from(ctx)  # recomputes only the last token ...
        nxt = int(torch.argmax(logits[-1]))
        times.append(time.perf_counter() - t0)
        ctx.append(nxt)  # ... the next call then computes exactly this one token
    verify = {}
    for k in verify_ks:
        extra = [ctx[-1]] * k
        ts = []
        for _ in range(max(3, steps // 4)):
            t0 = time.perf_counter()
            sess.forward_from(ctx, extra)
            ts.append(time.perf_counter() - t0)
            sess.crop(len(ctx) - 1)
        verify[int(k)] = statistics.median(ts) * 1e3
    sess.free()
    return {"step_ms": statistics.median(times) * 1e3,
            "step_ms_p10": percentile(times, 10) * 1e3, "step_ms_p90": percentile(times, 90) * 1e3,
            "verify_ms": verify}


def calibrate(target, drafter, prompt: str, *, steps: int = 16,
              verify_ks: Sequence[int] = ()) -> dict:
    """Cost ratio ``c`` = drafter step / target step, measured on a real prompt."""
    with torch.inference_mode():
        t = _step_times(target, target.tokenizer.encode_prompt(prompt), steps, list(verify_ks))
        out = {"target_step_ms": t["step_ms"], "target_step_ms_p10": t["step_ms_p10"],
               "target_step_ms_p90": t["step_ms_p90"],
               # one forward of k candidates plus the uncached last committed token
               "target_verify_ms": {str(k): v for k, v in t["verify_ms"].items()}}
        if drafter is not None:
            d = _step_times(drafter, drafter.tokenizer.encode_prompt(prompt), steps, [])
            out.update(drafter_step_ms=d["step_ms"], drafter_step_ms_p10=d["step_ms_p10"],
                       drafter_step_ms_p90=d["step_ms_p90"],
                       c=d["step_ms"] / t["step_ms"])
    return out


def merge_calibrations(cals: Sequence[dict]) -> dict:
    """Mean of the calibrations taken at the start and the end of the run."""
    cals = [c for c in cals if c]
    if not cals:
        return {}
    out: dict = {"samples": cals}
    for key in ("target_step_ms", "drafter_step_ms"):
        vals = [c[key] for c in cals if key in c]
        if vals:
            out[key] = statistics.fmean(vals)
    if "drafter_step_ms" in out:
        out["c"] = out["drafter_step_ms"] / out["target_step_ms"]
    return out


def target_nll(target, prompt_ids: Sequence[int], gen_ids: Sequence[int],
               temperature: float) -> Optional[float]:
    """Mean negative log-likelihood of ``gen_ids`` under the target at ``temperature``."""
    if not gen_ids:
        return None
    ids = list(prompt_ids) + list(gen_ids)
    ids = ids[-target.max_context:]
    n = len(gen_ids)
    with torch.inference_mode():
        x = torch.tensor([ids], dtype=torch.long, device=target.device)
        logits = target.model(input_ids=x).logits[0, -(n + 1):-1].float()
        logp = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
        tgt = torch.tensor(ids[-n:], dtype=torch.long, device=target.device)
        return float(-logp.gather(1, tgt[:, None]).mean())


# ---------------------------------------------------------------------------- aggregation


def _sum_positions(lists: Sequence[Optional[list[int]]]) -> list[int]:
    out: list[int] = []
    for lst in lists:
        for i, v in enumerate(lst or []):
            if i >= len(out):
                out.append(0)
            out[i] += v
    return out


def aggregate(dataset: str, spec: RunSpec, samples: Sequence[Sample],
              ar: Optional[Sequence[Sample]], calibration: dict, *,
              ar_run: Optional[dict] = None) -> dict:
    """One ``run`` entry of results.json."""
    n_tok = sum(s.n_tokens for s in samples)
    wall = sum(s.wall_s for s in samples)
    rounds = sum(s.rounds for s in samples)
    drafted = sum(s.drafted for s in samples)
    accepted = sum(s.accepted for s in samples)
    acc_pos = _sum_positions([s.accepted_per_position for s in samples])
    have_dpp = all(s.drafted_per_position is not None for s in samples)
    dr_pos = _sum_positions([s.drafted_per_position for s in samples]) if have_dpp else []
    tpot = [s.tpot_s * 1e3 for s in samples if s.tpot_s is not None]
    ttft = [s.ttft_s * 1e3 for s in samples]
    tps = n_tok / wall if wall > 0 else 0.0
    tpr = n_tok / rounds if rounds else None
    is_ar = spec.method == (ar[0].spec.method if ar else "ar")
    drafting = spec.method not in PLAIN
    k = spec.lookahead
    run: dict = {
        "dataset": dataset, "method": spec.method, "label": spec.label,
        "variant": spec.variant or None, "temperature": spec.temperature,
        "overlap": OVERLAP_VARIANTS.get(spec.variant),
        "overlap_miss": OVERLAP_MISS.get(spec.variant),
        "drafter_executor": DRAFTER_VARIANTS.get(spec.variant, "hf") if drafting else None,
        "lookahead": k, "prompts": len(samples), "tokens": n_tok, "wall_s": wall,
        "tokens_per_s": tps,
        "tpot_ms": mean(tpot), "tpot_ms_p50": percentile(tpot, 50),
        "tpot_ms_p90": percentile(tpot, 90), "tpot_ms_samples": tpot,
        "ttft_ms": mean(ttft), "ttft_ms_p50": percentile(ttft, 50),
        "prompt_tokens_mean": mean([s.prompt_tokens for s in samples]),
        "rounds": rounds, "tokens_per_round": tpr,
        "acceptance_rate": (accepted / drafted if drafted else (None if drafting else None)),
        "drafted": drafted, "accepted": accepted,
        "accepted_by_position": acc_pos,
        "drafted_by_position": dr_pos if have_dpp else None,
        "acceptance_by_position": ([a / d if d else None for a, d in zip(acc_pos, dr_pos)]
                                   if have_dpp else None),
        "fallback_rounds": sum(s.fallback_rounds for s in samples),
        "target_forwards": sum(s.target_forwards for s in samples),
        "drafter_forwards": sum(s.drafter_forwards for s in samples),
        "finish_reasons": {r: sum(1 for s in samples if s.finish_reason == r)
                           for r in sorted({s.finish_reason for s in samples})},
    }
    # ---- time breakdown (ms per output token; our methods only)
    if spec.method not in BASELINES:
        draft = sum(s.draft_s for s in samples)
        verify = sum(s.verify_s for s in samples)
        bridge = sum(s.bridge_s for s in samples)
        transport = sum(s.transport_s for s in samples)
        server_wall = (sum(s.server_wall_s for s in samples)
                       if all(s.server_wall_s is not None for s in samples) else wall)
        per_tok = (lambda x: x / n_tok * 1e3 if x is not None else None) if n_tok else (lambda x: None)
        frac = (lambda x: x / wall if x is not None else None) if wall else (lambda x: None)
        timed = all(s.drafter_call_s is not None for s in samples)
        if timed:  # in-process: the port calls were timed, so the rest is the coordinator's
            d_call = sum(s.drafter_call_s for s in samples)
            t_call = sum(s.target_call_s for s in samples)
            parts = {"draft_forwards": draft,
                     "drafter_other": max(0.0, d_call - draft),
                     "verify": verify,
                     "target_call_other": max(0.0, t_call - verify),
                     "bridge": bridge,
                     "coordinator": max(0.0, wall - d_call - t_call - bridge)}
        else:  # through a service: what its statistics say, and the client's share
            outside = max(0.0, server_wall - draft - verify - bridge - transport)
            parts = {"draft_forwards": draft, "verify": verify, "bridge": bridge,
                     "transport_and_rpc": transport, "outside_rounds": outside,
                     "client_minus_server": max(0.0, wall - server_wall)}
        run["time_ms_per_token"] = {k: per_tok(v) for k, v in parts.items()}
        run["time_fraction"] = {k: frac(v) for k, v in parts.items()}
        run["ms_per_round"] = {k: (v / rounds * 1e3 if rounds else None) for k, v in parts.items()}
        df = sum(s.drafter_forwards for s in samples)
        run["drafter_forwards_per_round"] = df / rounds if rounds and df else None
        run["drafter_step_ms_in_run"] = draft / df * 1e3 if df else None
        tf = sum(s.target_forwards for s in samples)
        run["target_round_ms_in_run"] = verify / tf * 1e3 if tf else None
    # ---- acceptance model and ideal speedup
    alpha = None
    if drafting and have_dpp and dr_pos:
        alpha = conditional_alpha(acc_pos, dr_pos)
    elif drafting and tpr is not None and k:
        alpha = alpha_from_tokens_per_round(tpr, k)
    run["alpha"] = alpha
    c = calibration.get("c")
    run["cost_ratio_c"] = c if drafting else None
    if ar_run is not None and run.get("drafter_step_ms_in_run") and ar_run.get("target_round_ms_in_run"):
        run["cost_ratio_c_in_run"] = run["drafter_step_ms_in_run"] / ar_run["target_round_ms_in_run"]
    if is_ar:
        run["ideal_speedup"] = 1.0
    elif not drafting:
        run["ideal_speedup"] = None
    elif alpha is not None and c is not None:
        run["ideal_speedup"] = ideal_speedup(min(1.0, max(0.0, alpha)), k, c)
    else:
        run["ideal_speedup"] = None
    # ---- against AR from the same run
    if ar:
        by_prompt = {s.prompt_id: s for s in ar}
        ar_tps = sum(s.n_tokens for s in ar) / sum(s.wall_s for s in ar)
        run["speedup_vs_ar"] = tps / ar_tps if ar_tps else None
        paired = []
        same = []
        for s in samples:
            a = by_prompt.get(s.prompt_id)
            if a is None:
                continue
            if s.wall_s > 0 and a.wall_s > 0 and s.n_tokens and a.n_tokens:
                paired.append((s.n_tokens / s.wall_s) / (a.n_tokens / a.wall_s))
            # token ids when there are any (HTTP endpoints return only text)
            same.append(s.token_ids == a.token_ids if (s.token_ids or a.token_ids)
                        else s.text == a.text)
        run["speedup_vs_ar_paired_geomean"] = geomean(paired)
        run["identical_to_ar"] = bool(same) and all(same)
        run["identical_prompts"] = sum(same)
        run["differing_prompts"] = [s.prompt_id for s, ok in zip(samples, same) if not ok]
        ar_tpot = mean([s.tpot_s for s in ar if s.tpot_s is not None])
        run["tpot_vs_ar"] = ratio(mean([s.tpot_s for s in samples if s.tpot_s is not None]), ar_tpot)
    else:
        run.update(speedup_vs_ar=None, identical_to_ar=None)
    run["identity_required"] = spec.identity_required
    run["measured_over_ideal"] = ratio(run.get("speedup_vs_ar"), run.get("ideal_speedup"))
    nlls = [s.nll for s in samples if s.nll is not None]
    if nlls:
        w = [s.n_tokens for s in samples if s.nll is not None]
        run["sample_nll"] = sum(a * b for a, b in zip(nlls, w)) / sum(w)
        run["sample_nll_by_prompt"] = {s.prompt_id: s.nll for s in samples if s.nll is not None}
    hf = next((s.hf_settings for s in samples if s.hf_settings), None)
    if hf:
        run["hf_settings"] = hf
    return run


def check_identity(runs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(failures of our methods, mismatches of the transformers baseline)."""
    failures, baseline = [], []
    for r in runs:
        if r.get("identical_to_ar") is False:
            entry = {"dataset": r["dataset"], "label": r["label"], "temperature": r["temperature"],
                     "prompts": r.get("differing_prompts", [])}
            if r["identity_required"]:
                failures.append(entry)
            elif r["method"] in BASELINES and r["temperature"] == 0:
                baseline.append(entry)
    return failures, baseline


# ---------------------------------------------------------------------------- in-process


class _Clock:
    def __init__(self):
        self.drafter = 0.0
        self.target = 0.0

    def reset(self) -> tuple[float, float]:
        out = (self.drafter, self.target)
        self.drafter = self.target = 0.0
        return out


class _TimedPort:
    """Wraps a drafter/target port: adds the wall time of every awaited call to a clock, so the
    drafter's work outside its forwards and the coordinator's own time can be told apart."""

    def __init__(self, port, clock: _Clock, side: str):
        self._port = port
        self._clock = clock
        self._side = side

    def __getattr__(self, name):
        attr = getattr(self._port, name)
        if not callable(attr):
            return attr

        async def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                setattr(self._clock, self._side, getattr(self._clock, self._side) + dt)

        return timed


ProgressFactory = Callable[..., object]


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n=1): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


def load_pair(cfg: BenchConfig, *, target: bool = True):
    """(target, drafter) as ``LoadedModel``s (the target None unless ``target``; the drafter
    None when ``--drafter none``)."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo import bundled_model_dir

    target_path = cfg.target or str(bundled_model_dir("target"))
    drafter_path = cfg.drafter if cfg.drafter is not None else str(bundled_model_dir("drafter"))
    if target:
        target = LoadedModel(ModelSpec(target_path, dtype=cfg.dtype, device=cfg.device))
    else:
        target = None
    drafter = None
    if drafter_path and drafter_path.lower() != "none":
        drafter = LoadedModel(ModelSpec(drafter_path, dtype=cfg.dtype, device=cfg.device,
                                        head_ids=cfg.drafter_head_ids, plain_forward=True))
    return target, drafter


def drafter_for_backend(drafter, backend: str, cfg: "BenchConfig"):
    """The drafter ``backend`` runs: ``drafter`` itself (hf), the same model through
    transformers' modules (hf-transformers), or a ``VllmDraftModel`` (vllm)."""
    import dataclasses

    if backend == "hf-transformers":
        from hsd_serve.models.hf import LoadedModel

        return LoadedModel(dataclasses.replace(drafter.spec, plain_forward=False))
    if backend == "vllm":
        from hsd_serve.serve.config import VllmDrafterOptions
        from hsd_serve.serve.vllm.drafter import VllmDraftModel

        return VllmDraftModel(drafter.spec.path, VllmDrafterOptions(**{  # its engine keys only
            k: v for k, v in (cfg.vllm or {}).items() if k in VllmDrafterOptions.model_fields}),
            threads=cfg.threads or 1)
    return drafter


def prepare_prompts(cfg: BenchConfig, dataset: str, target_tok, target_ctx: int,
                    drafter_tok=None, drafter_ctx: Optional[int] = None) -> tuple[list[Prompt], dict]:
    prompts = load_prompts(dataset, cfg.data_dir, cfg.limit)
    fits = context_fitter(target_tok, target_ctx, cfg.max_new_tokens,
                          drafter_tokenizer=drafter_tok, drafter_context=drafter_ctx,
                          lookahead=max(cfg.lookaheads))
    fitted, dropped = fit_prompts(prompts, fits)
    info = {"loaded": len(prompts), "used": len(fitted), "dropped": dropped,
            "truncated": sum(p.truncated for p in fitted),
            "long_context": dataset in LONG_CONTEXT}
    return fitted, info


class _StopOnSignal:
    """Turns SIGTERM/SIGINT into a flag for the duration of the measured loop (main thread)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def run_inprocess(cfg: BenchConfig, *, target=None, drafter=None, progress: bool = True,
                  partial_path: Optional[str] = None) -> dict:
    """Measure in this process; returns the results dict (``runs``, ``samples``, …)."""
    from hsd_serve.engine.local import Engine
    from hsd_serve.engine.types import GenerationRequest, RequestError
    from hsd_serve.core.sampling import SamplingParams

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    machine = machine_info()
    if target is None:
        target, drafter = load_pair(cfg)
    clock = _Clock()
    engines = {}  # drafter backend -> Engine (the same target model)
    for backend in dict.fromkeys(cfg.drafter_executors if drafter is not None else ("hf",)):
        d = drafter_for_backend(drafter, backend, cfg) if drafter is not None else None
        engines[backend] = e = Engine(target, d)
        e.coordinator.target = _TimedPort(e.coordinator.target, clock, "target")
        if e.coordinator.drafter is not None:
            e.coordinator.drafter = _TimedPort(e.coordinator.drafter, clock, "drafter")
    engine = next(iter(engines.values()))
    hf = None
    hf_default_k = None
    if (HF in cfg.methods and drafter is not None) or HF_AR in cfg.methods:
        from hsd_serve.bench.hf_uag import HFAssisted

        hf = HFAssisted(target, drafter)
        if cfg.hf_default and HF in cfg.methods and drafter is not None:
            hf_default_k = int(hf.effective_settings(None, False)["num_assistant_tokens"])
    methods = [m for m in cfg.methods if drafter is not None or m in ("ar", HF_AR)]
    specs_all = build_specs(methods, cfg.temperatures, cfg.lookaheads,
                            hf_default_lookahead=hf_default_k)
    specs_all = per_drafter_backend(specs_all, tuple(engines))
    skipped: list[dict] = []
    if drafter is None and len(methods) < len(cfg.methods):
        skipped.append({"method": ",".join(m for m in cfg.methods if m not in methods),
                        "reason": "no drafter"})

    def run_one(spec: RunSpec, dataset: str, prompt: Prompt, seed: int, max_new: int) -> Sample:
        if spec.method in BASELINES:
            ids = target.tokenizer.encode_prompt(prompt.text)
            if spec.method == HF_AR:
                r = hf.generate_plain(ids, max_new, temperature=spec.temperature, seed=seed)
            else:
                r = hf.generate(ids, max_new, temperature=spec.temperature, seed=seed,
                                num_assistant_tokens=None if spec.variant == "default"
                                else spec.lookahead)
            return Sample(dataset=dataset, prompt_id=prompt.id, spec=spec, prompt_tokens=len(ids),
                          token_ids=r.token_ids, text=r.text, finish_reason=r.finish_reason,
                          wall_s=r.wall_s, ttft_s=r.ttft_s, rounds=r.rounds,
                          drafted_per_position=None, target_forwards=r.target_forwards,
                          drafter_forwards=r.drafter_forwards, seed=seed,
                          hf_settings=r.settings)
        req = GenerationRequest(prompt=prompt.text, max_new_tokens=max_new,
                                params=SamplingParams(temperature=spec.temperature, seed=seed),
                                method=spec.method, lookahead=max(1, spec.lookahead), trace=True)
        clock.reset()
        result = engines.get(DRAFTER_VARIANTS.get(spec.variant), engine).generate(req)
        sample = Sample.from_result(dataset, prompt.id, spec, result, seed)
        sample.drafter_call_s, sample.target_call_s = clock.reset()
        return sample

    results_runs: list[dict] = []
    all_samples: list[Sample] = []
    calibrations: list[dict] = []
    dataset_info: dict = {}
    interrupted = False
    for dataset in cfg.datasets:
        if interrupted:
            break
        prompts, info = prepare_prompts(cfg, dataset, target.tokenizer, target.max_context,
                                        drafter.tokenizer if drafter else None,
                                        drafter.max_context if drafter else None)
        dataset_info[dataset] = info
        if not prompts:
            skipped.append({"dataset": dataset, "reason": "no prompt fits the context"})
            continue
        specs = list(specs_all)
        # ---- warm-up: one short request per configuration; drop the ones refused
        if cfg.warmup:
            for spec in list(specs):
                try:
                    run_one(spec, dataset, prompts[0], cfg.seed, min(8, cfg.max_new_tokens))
                except RequestError as exc:
                    specs.remove(spec)
                    skipped.append({"dataset": dataset, "label": spec.label,
                                    "temperature": spec.temperature, "reason": str(exc)})
                except Exception as exc:  # noqa: BLE001 - the baseline may fail on a pair
                    if spec.method not in BASELINES:
                        raise
                    specs.remove(spec)
                    skipped.append({"dataset": dataset, "label": spec.label,
                                    "temperature": spec.temperature,
                                    "reason": f"{type(exc).__name__}: {exc}"})
        calibrations.append(calibrate(target, drafter, prompts[0].text,
                                      steps=cfg.calibration_steps, verify_ks=cfg.lookaheads))
        # ---- measured: prompt by prompt, every configuration, rotating the order; a SIGTERM
        # or Ctrl-C stops after the current request and keeps the prompts every method finished
        samples: list[Sample] = []
        bar = _progress(len(prompts) * len(specs), progress, f"bench {dataset}")
        with _StopOnSignal() as stop:
            for i, prompt in enumerate(prompts):
                order = rotated(specs, i)
                done: list[Sample] = []
                for spec in order:
                    if stop.requested:
                        break
                    bar.set_postfix_str(f"{spec.label} T={spec.temperature:g}")
                    done.append(run_one(spec, dataset, prompt, cfg.seed + i, cfg.max_new_tokens))
                    bar.update(1)
                if stop.requested:
                    interrupted = True
                    break
                samples += done
                if partial_path is not None:
                    with open(partial_path, "a") as f:
                        for smp in done:
                            f.write(json.dumps(smp.record()) + "\n")
        bar.close()
        if not samples:
            break
        calibrations.append(calibrate(target, drafter, prompts[-1].text,
                                      steps=cfg.calibration_steps, verify_ks=cfg.lookaheads))
        if cfg.nll and any(s.spec.temperature > 0 for s in samples):
            by_id = {p.id: p for p in prompts}
            for s in samples:
                if s.spec.temperature > 0:
                    ids = target.tokenizer.encode_prompt(by_id[s.prompt_id].text)
                    s.nll = target_nll(target, ids, s.token_ids, s.spec.temperature)
        all_samples += samples
        info["measured"] = len({smp.prompt_id for smp in samples})
        results_runs += aggregate_dataset(dataset, specs, samples, merge_calibrations(calibrations[-2:]))
    for e in engines.values():  # a drafter on vLLM: stop its engine
        getattr(e.drafter, "close", lambda: None)()
    calibration = merge_calibrations(calibrations)
    failures, baseline = check_identity(results_runs)
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return {
        "runs": results_runs, "machine": machine, "command": cfg.command,
        "mode": "in-process",
        "models": {"target": _short_path(getattr(target, "name", None)),
                   "drafter": _short_path(getattr(drafter, "name", None)) if drafter else None,
                   "target_max_context": target.max_context},
        "config": _config_dict(cfg), "calibration": calibration, "datasets": dataset_info,
        "failures": failures, "baseline_mismatches": baseline, "skipped": skipped,
        "interrupted": interrupted,
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
        "elapsed_s": time.time() - started,
        "samples": all_samples,
    }


def aggregate_dataset(dataset: str, specs: Sequence[RunSpec], samples: Sequence[Sample],
                      calibration: dict, concurrency: Optional[int] = None, *,
                      reference: str = "ar", executor: str = "hf") -> list[dict]:
    """Runs of one dataset; ``reference``: the method the others are compared with (AR of the
    same executor: ``ar``, or ``vllm-ar`` for the vLLM executor)."""
    runs = []
    ar_runs: dict[float, dict] = {}
    for spec in specs:  # the reference first so the others can refer to it
        if spec.method != reference:
            continue
        mine = [s for s in samples if s.spec == spec]
        if mine:
            ar_runs[spec.temperature] = aggregate(dataset, spec, mine, mine, calibration)
    for spec in specs:
        mine = [s for s in samples if s.spec == spec]
        if not mine:
            continue
        if spec.method == reference:
            runs.append(ar_runs[spec.temperature])
            continue
        ar = [s for s in samples
              if s.spec.method == reference and s.spec.temperature == spec.temperature]
        runs.append(aggregate(dataset, spec, mine, ar or None, calibration,
                              ar_run=ar_runs.get(spec.temperature)))
    for r in runs:
        r["concurrency"] = concurrency or 1
        r["executor"] = "vllm" if r["method"] in VLLM_BASELINES else executor
        r["reference"] = reference
    # paired comparison against transformers' baseline at the same temperature and lookahead
    for r in runs:
        if r["method"] in PLAIN + BASELINES:
            continue
        for h in runs:
            if h["method"] == HF and h["temperature"] == r["temperature"]:
                key = "vs_hf_uag_default" if h.get("variant") == "default" else None
                if key is None and h["lookahead"] == r["lookahead"]:
                    key = "vs_hf_uag_matched"
                if key:
                    r[key] = ratio(r["tokens_per_s"], h["tokens_per_s"])
    return runs


def _short_path(path: Optional[str]) -> Optional[str]:
    """A model path relative to the repository when it lies inside it."""
    if not path:
        return path
    repo = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(repo))
    except ValueError:
        return path


def _config_dict(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    d.pop("command", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
