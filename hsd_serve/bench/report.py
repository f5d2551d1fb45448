"""Benchmark outputs: ``results.json``, ``requests.jsonl``, ``results.md`` and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

from hsd_serve.bench.metrics import rnd

PLOTS = ("speedup_by_method.png", "acceptance_by_position.png", "speedup_vs_lookahead.png",
         "tpot_distribution.png")


def _f(x, digits: int = 2, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**NO**"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


def _run_key(r: dict) -> str:
    lab = r["label"]
    if r.get("endpoint"):
        lab += f" c={r.get('concurrency', 1)}"
    return lab


def results_json(results: dict) -> dict:
    """results.json content: everything but the per-request samples (those go to requests.jsonl)."""
    out = {k: v for k, v in results.items() if k != "samples"}
    out["runs"] = [{k: v for k, v in r.items()} for r in results["runs"]]
    return rnd(out, 5)


def write_outputs(results: dict, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "results.json"
    p.write_text(json.dumps(results_json(results), indent=1, sort_keys=False) + "\n")
    written.append(p)
    p = out / "requests.jsonl"
    with p.open("w") as f:
        for s in results.get("samples", []):
            f.write(json.dumps(s.record() if hasattr(s, "record") else s) + "\n")
    written.append(p)
    p = out / "results.md"
    p.write_text(markdown(results))
    written.append(p)
    if plots:
        written += write_plots(results, out)
    return written


# ---------------------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    runs = results["runs"]
    m = results.get("machine", {})
    cal = results.get("calibration", {})
    lines = [f"# hsd-serve bench: {', '.join(sorted({r['dataset'] for r in runs})) or '(no runs)'}",
             ""]
    if results.get("command"):
        lines += ["Command:", "", "```", results["command"], "```", ""]
    if results.get("interrupted"):
        lines += ["**Interrupted run**: the tables cover only the prompts that every configuration "
                  "finished (see `Prompts` at the end).", ""]
    gpu = m.get("gpu")
    lines += [f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch threads "
              f"{m.get('torch_threads', '?')}" + (f", GPU {gpu}" if gpu else ", no GPU")
              + f"; load average at start {_load(m.get('loadavg_start'))}, at end "
              f"{_load(m.get('loadavg_end'))}",
              f"- Software: torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}, "
              f"python {m.get('python', '?')}, git {m.get('git', '?')}",
              f"- Started {results.get('started', '?')}, took {_f(results.get('elapsed_s'), 0)} s; "
              f"mode: {results.get('mode', '?')}"]
    models = results.get("models") or {}
    if models:
        lines.append(f"- Target `{models.get('target')}`, drafter `{models.get('drafter')}`")
    if cal:
        verify = (cal.get("samples") or [{}])[0].get("target_verify_ms") or {}
        lines.append(f"- Calibration (single-token forwards on a real prompt, mean of start/end): "
                     f"target step {_f(cal.get('target_step_ms'))} ms, drafter step "
                     f"{_f(cal.get('drafter_step_ms'))} ms, **c = {_f(cal.get('c'), 3)}**"
                     + ("; target verify forward of k candidates: "
                        + ", ".join(f"k={k}: {_f(v)} ms" for k, v in verify.items()) if verify else ""))
    lines += ["- `ideal` = S_ideal = (1 − α^(k+1)) / ((1 − α)(k·c + 1)) with α the per-candidate "
              "acceptance (conditional on the earlier candidates being accepted); `×AR` = tokens/s "
              "over AR's tokens/s in this same run (same prompts, interleaved); `aggregate ×AR` = "
              "aggregate tokens/s of a load phase over AR's at the same concurrency (with "
              "`--repeats`: the median of the per-pass ratios, their range in brackets).", ""]
    endpoint = any(r.get("endpoint") for r in runs)
    for t in sorted({r["temperature"] for r in runs}):
        sub = [r for r in runs if r["temperature"] == t]
        lines += [f"## Temperature {t:g}" + (" (greedy)" if t == 0 else ""), ""]
        head = ["dataset", "method", "k"] + (["conc."] if endpoint else []) + [
            "prompts", "tok/s"] + (["aggregate tok/s", "aggregate ×AR"] if endpoint else []) + [
            "×AR", "ideal", "meas/ideal", "×hf-uag (same k)", "×hf-uag default",
            "TPOT ms (p50)", "TTFT ms", "α", "accept rate", "tok/round", "identical to AR"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sub:
            row = [r["dataset"], r["method"] + (f" ({r['variant']})" if r.get("variant") else ""),
                   str(r["lookahead"] or "–")]
            if endpoint:
                row.append(str(r.get("concurrency", 1)))
            row += [str(r["prompts"]), _f(r["tokens_per_s"], 1)]
            if endpoint:
                row += [_f(r.get("aggregate_tokens_per_s"), 1), _aggregate_ratio(r)]
            row += [_f(r.get("speedup_vs_ar")), _f(r.get("ideal_speedup")),
                    _f(r.get("measured_over_ideal")), _f(r.get("vs_hf_uag_matched")),
                    _f(r.get("vs_hf_uag_default")),
                    f"{_f(r.get('tpot_ms'), 1)} ({_f(r.get('tpot_ms_p50'), 1)})",
                    _f(r.get("ttft_ms"), 1), _f(r.get("alpha")), _f(r.get("acceptance_rate")),
                    _f(r.get("tokens_per_round")),
                    _identity(r)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    # ---- time breakdown
    tb = [r for r in runs if r.get("time_ms_per_token")]
    if tb:
        parts = list(dict.fromkeys(k for r in tb for k in r["time_ms_per_token"]))
        lines += ["## Where the time goes (ms per output token)", "", BREAKDOWN_LEGEND, "",
                  "| dataset | T | method | k | " + " | ".join(p.replace("_", " ") for p in parts)
                  + " | total | rounds/100 tok | drafter fwd/round | drafter step ms | "
                  "target verify ms/round | c in run |",
                  "|" + "---|" * (len(parts) + 10)]
        for r in tb:
            t = r["time_ms_per_token"]
            total = 1e3 / r["tokens_per_s"] if r["tokens_per_s"] else None
            per100 = 100 * r["rounds"] / r["tokens"] if r.get("tokens") else None
            lines.append("| " + " | ".join(
                [r["dataset"], f"{r['temperature']:g}", r["method"], str(r["lookahead"] or "–")]
                + [_f(t.get(p)) for p in parts]
                + [_f(total), _f(per100, 1), _f(r.get("drafter_forwards_per_round"), 1),
                   _f(r.get("drafter_step_ms_in_run")), _f(r.get("target_round_ms_in_run")),
                   _f(r.get("cost_ratio_c_in_run"), 3)]) + " |")
        lines.append("")
    # ---- acceptance by position
    ap = [r for r in runs if r.get("acceptance_by_position")]
    if ap:
        width = max(len(r["acceptance_by_position"]) for r in ap)
        width = min(width, 12)
        lines += ["## Acceptance by position (accepted / drafted at candidate position i)", "",
                  "| dataset | T | method | k | " + " | ".join(str(i + 1) for i in range(width)) + " |",
                  "|" + "---|" * (width + 4)]
        for r in ap:
            vals = r["acceptance_by_position"][:width]
            vals += [None] * (width - len(vals))
            lines.append("| " + " | ".join([r["dataset"], f"{r['temperature']:g}", r["method"],
                                            str(r["lookahead"])] + [_f(v) for v in vals]) + " |")
        lines.append("")
    # ---- sampled outputs
    nll = [r for r in runs if r.get("sample_nll") is not None]
    if nll:
        lines += ["## Sampled outputs: mean target NLL per token (lower is not better; a lossless "
                  "method matches AR within noise)", "",
                  "`Δ per prompt`: the mean over prompts of (this method's NLL − AR's) on the same "
                  "prompt, ± its standard error; a lossless method's is within about 2 SE of 0.",
                  "",
                  "| dataset | T | method | k | NLL | Δ vs AR | Δ per prompt ± SE |",
                  "|---|---|---|---|---|---|---|"]
        for r in nll:
            ar = next((a for a in nll if a["method"] == "ar" and a["dataset"] == r["dataset"]
                       and a["temperature"] == r["temperature"]
                       and a.get("concurrency") == r.get("concurrency")), None)
            lines.append(f"| {r['dataset']} | {r['temperature']:g} | {r['label']} | "
                         f"{r['lookahead'] or '–'} | {_f(r['sample_nll'], 3)} | "
                         f"{_f(r['sample_nll'] - ar['sample_nll'], 3) if ar else '–'} | "
                         f"{_paired_delta(r, ar)} |")
        lines.append("")
    # ---- long context
    lc = [r for r in runs if r["dataset"] == "qmsum"]
    if lc:
        lines += ["## Long context (QMSum, prompts cut to the context window): time to first token",
                  "", "| method | k | prompt tokens (mean) | TTFT ms (mean) | TTFT ms (p50) | TPOT ms |",
                  "|---|---|---|---|---|---|"]
        for r in lc:
            lines.append(f"| {r['label']} | {r['lookahead'] or '–'} | "
                         f"{_f(r.get('prompt_tokens_mean'), 0)} | {_f(r.get('ttft_ms'), 1)} | "
                         f"{_f(r.get('ttft_ms_p50'), 1)} | {_f(r.get('tpot_ms'), 1)} |")
        lines.append("")
    # ---- hf-uag settings
    hf = [r for r in runs if r.get("hf_settings")]
    if hf:
        lines += ["## transformers baseline settings", ""]
        seen = set()
        for r in hf:
            key = json.dumps(r["hf_settings"], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {r['label']} (T={r['temperature']:g}): `{key}`")
        lines.append("")
    # ---- the vLLM proposer's own counters
    lines += proposer_table(results.get("proposer_stats") or {})
    # ---- identity and skips
    lines += ["## Output identity", ""]
    fails = results.get("failures") or []
    if fails:
        lines.append("**FAILURES** (our methods differ from AR where they must not):")
        lines += [f"- {f['dataset']} T={f['temperature']:g} {f['label']}: prompts "
                  f"{', '.join(map(str, f['prompts']))}" for f in fails]
    else:
        lines.append("Every method that must reproduce AR (all at temperature 0; SLEM at any "
                     "temperature with the same seed) produced AR's exact token ids on every prompt.")
    base = results.get("baseline_mismatches") or []
    if base:
        lines.append("")
        lines.append("transformers baseline outputs that differ from AR (greedy):")
        lines += [f"- {f['dataset']} {f['label']}: prompts {', '.join(map(str, f['prompts']))}"
                  for f in base]
    skipped = results.get("skipped") or []
    if skipped:
        lines += ["", "Skipped:"]
        lines += [f"- {json.dumps(s)}" for s in skipped]
    ds = results.get("datasets") or {}
    if ds:
        lines += ["", "Prompts: " + "; ".join(
            f"{k}: {v.get('measured', v.get('used'))} measured, {v.get('used')} prepared of "
            f"{v.get('loaded')} loaded, {v.get('truncated')} cut to fit, {v.get('dropped')} dropped"
            for k, v in ds.items())]
    lines.append("")
    return "\n".join(lines)


BREAKDOWN_LEGEND = (
    "In-process: `draft forwards` = drafter model forwards; `drafter other` = the rest of the "
    "drafter calls (re-tokenizing the committed text, sampling/proposal rows, Python); `verify` "
    "= the target worker's verification (forward + logits processing + rule); `target call "
    "other` = target-port overhead; `bridge` = SLEM's re-encoding of drafted text into target "
    "ids; `coordinator` = everything else in the request (round loop, committing, detokenizing, "
    "stop checks, prompt encoding). Through a service: `transport and rpc` = round time outside "
    "the draft/verify/bridge work (RPCs between replicas), `outside rounds` = the service's time "
    "outside rounds, `client minus server` = client wall time the service did not see.")


def proposer_table(stats: dict) -> list[str]:
    """Per engine: what getting a draft cost inside vLLM's step (``DraftBroker.stats``)."""
    rows = {k: v for k, v in stats.items() if v.get("draft_calls")}
    if not rows:
        return []
    lines = ["## Drafts inside vLLM's step (the proposer, per draft call)", "",
             "`wait` = the engine step blocked on drafts; `round trip` = the gRPC call to the "
             "drafter; `drafter model` = its forwards; `bridge` = re-encoding into target ids.", "",
             "| engine | draft calls | steps | wait ms/step | round trip ms | drafter model ms "
             "| drafter forwards | bridge ms | ready | waited | plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    from hsd_serve.bench.runner import OVERLAP_LABELS

    names = {str(s): v for s, v in OVERLAP_LABELS.items()}  # engines keyed by --overlap setting
    for name, v in rows.items():
        calls, steps = max(1, v["draft_calls"]), max(1, v.get("steps", 0))
        lines.append(
            f"| {names.get(str(name), name)} | {v['draft_calls']} | {v.get('steps', 0)} "
            f"| {_f(1e3 * v.get('wait_s', 0) / steps)} | {_f(1e3 * v.get('rpc_s', 0) / calls)} "
            f"| {_f(1e3 * v.get('drafter_model_s', 0) / calls)} "
            f"| {_f(v.get('drafter_forwards', 0) / calls)} "
            f"| {_f(1e3 * v.get('bridge_s', 0) / calls)} | {v.get('ready', 0)} "
            f"| {v.get('waited', 0)} | {v.get('plain', 0)} |")
    return lines + [""]


def _paired_delta(run: dict, ar: Optional[dict]) -> str:
    """Mean ± standard error over shared prompts of run's per-prompt NLL minus AR's."""
    if ar is None or run is ar:
        return "–"
    mine, base = run.get("sample_nll_by_prompt") or {}, ar.get("sample_nll_by_prompt") or {}
    d = [mine[p] - base[p] for p in mine if p in base]
    if len(d) < 2:
        return "–"
    return f"{statistics.mean(d):+.3f} ± {statistics.stdev(d) / math.sqrt(len(d)):.3f}"


def _identity(r: dict) -> str:
    v = r.get("identical_to_ar")
    if v is None or r["method"] == "ar":
        return "–"
    n = r.get("identical_prompts")
    s = f"{n}/{r['prompts']}" if n is not None else ""
    if v:
        return f"yes {s}".strip()
    if r.get("identity_required"):
        return f"**NO** {s}".strip()
    if r["method"] in ("hf-uag", "hf-ar") and r["temperature"] == 0:
        return f"no (baseline) {s}".strip()
    return f"n/a (sampled) {s}".strip()


def _load(x) -> str:
    return "/".join(f"{v:.1f}" for v in x) if x else "?"


# ---------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict, out: Path) -> list[Path]:
    plt = _plt()
    runs = results["runs"]
    paths = []
    for name, fn in (("speedup_by_method.png", _plot_speedup),
                     ("acceptance_by_position.png", _plot_acceptance),
                     ("speedup_vs_lookahead.png", _plot_lookahead),
                     ("tpot_distribution.png", _plot_tpot),
                     ("aggregate_throughput.png", _plot_concurrency),
                     ("timeline.png",
                      lambda plt, _: _plot_timeline(plt, results.get("samples", [])))):
        fig = fn(plt, runs)
        if fig is None:
            continue
        p = out / name
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


TIMELINE_LANES = ("verify", "draft", "draft ahead")


def _plot_timeline(plt, samples, rounds: int = 12):
    """Per drafting configuration (label), the first ``rounds`` rounds of its first traced
    request as seen by the coordinator: when the target verified, when a round waited for a
    draft, and when the drafter drafted ahead (overlap) — bars on one time axis."""
    by_label: dict = {}  # label -> prompt id -> its first traced request with no fallback round
    for s in samples:
        if getattr(s, "timeline", None) and s.spec.method != "ar" and not s.fallback_rounds:
            by_label.setdefault(s.spec.label, {}).setdefault(s.prompt_id, s)
    if not by_label:
        return None
    common = [p for p in next(iter(by_label.values())) if all(p in d for d in by_label.values())]
    first = {label: d[common[0]] if common else next(iter(d.values()))
             for label, d in by_label.items()}  # the same prompt for every label when possible
    fig, axes = plt.subplots(len(first), 1, figsize=(10, 1.6 + 1.1 * len(first)), squeeze=False)
    colors = {"verify": "tab:blue", "draft": "tab:orange", "draft ahead": "tab:green"}
    for ax, (label, s) in zip(axes[:, 0], first.items()):
        spans = [sp for sp in s.timeline if sp[1] < rounds]
        t_end = max(sp[3] for sp in spans) * 1e3
        for y, lane in enumerate(TIMELINE_LANES):
            bars = [(sp[2] * 1e3, (sp[3] - sp[2]) * 1e3) for sp in spans if sp[0] == lane]
            ax.broken_barh(bars, (y - 0.35, 0.7), color=colors[lane])
        ax.set_yticks(range(len(TIMELINE_LANES)), TIMELINE_LANES)
        ax.set_xlim(0, t_end * 1.01)
        ax.set_title(f"{label} — {s.prompt_id}, rounds 0–{rounds - 1}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms since the request reached the coordinator")
    fig.tight_layout()
    return fig


def _temps(runs):
    return sorted({r["temperature"] for r in runs})


def _grid(plt, n: int, w: float = 6.5, h: float = 4.2, ncols_max: int = 3):
    ncols = min(ncols_max, max(1, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _aggregate_ratio(r: dict) -> str:
    """``aggregate_vs_ar``, with the range of its per-pass ratios when there were several."""
    passes = r.get("aggregate_vs_ar_passes") or []
    out = _f(r.get("aggregate_vs_ar"))
    if len(passes) > 1:
        out += f" ({_f(min(passes))}–{_f(max(passes))})"
    return out


def _plot_speedup(plt, runs):
    if not runs:
        return None
    temps = _temps(runs)
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    n_labels = max(len({_run_key(r) for r in runs if r["temperature"] == t}) for t in temps)
    width_in = min(18.0, 3.0 + len(datasets) * (0.32 * n_labels + 0.6))
    fig, axes = plt.subplots(len(temps), 1, figsize=(width_in, 4.2 * len(temps)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, t in zip(axes[:, 0], temps):
        sub = [r for r in runs if r["temperature"] == t]
        labels = list(dict.fromkeys(_run_key(r) for r in sub))
        width = 0.8 / max(1, len(labels))
        for j, lab in enumerate(labels):
            xs, ys, ideals = [], [], []
            for i, d in enumerate(datasets):
                r = next((r for r in sub if r["dataset"] == d and _run_key(r) == lab), None)
                if r is None or r.get("speedup_vs_ar") is None:
                    continue
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ys.append(r["speedup_vs_ar"])
                ideals.append(r.get("ideal_speedup"))
            bars = ax.bar(xs, ys, width * 0.95, label=lab, color=cmap(j % 20))
            if len(datasets) == 1:
                ax.bar_label(bars, fmt="%.2f", fontsize=7)
            ix = [(x, v) for x, v in zip(xs, ideals) if v is not None]
            if ix:
                ax.scatter([x for x, _ in ix], [v for _, v in ix], marker="_", s=250,
                           color="black", zorder=3, label="S_ideal" if j == 0 else None)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(datasets)))
        ax.set_xticklabels(datasets)
        ax.set_ylabel("tokens/s ÷ AR tokens/s")
        ax.set_title(f"Speedup over AR by method and dataset, T={t:g} (black tick: S_ideal)")
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _plot_acceptance(plt, runs):
    sub = [r for r in runs if r.get("acceptance_by_position")]
    if not sub:
        return None
    datasets = list(dict.fromkeys(r["dataset"] for r in sub))
    fig, axes = _grid(plt, len(datasets))
    for ax, d in zip(axes, datasets):
        for r in sub:
            if r["dataset"] != d:
                continue
            ys = r["acceptance_by_position"]
            ax.plot(range(1, len(ys) + 1), ys, marker="o",
                    label=f"{_run_key(r)} T={r['temperature']:g}")
        ax.set_xlabel("candidate position in the round")
        ax.set_ylabel("accepted / drafted")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Acceptance by position: {d}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_lookahead(plt, runs):
    groups: dict = {}
    for r in runs:
        if r["method"] in ("ar", "hf-ar") or r.get("variant") == "default" \
                or r.get("speedup_vs_ar") is None:
            continue
        groups.setdefault(r["dataset"], {}).setdefault(
            (r["method"], r["temperature"], r.get("concurrency")), []).append(r)
    if not groups:
        return None
    fig, axes = _grid(plt, len(groups))
    cmap = plt.get_cmap("tab10")
    for ax, (dataset, by_method) in zip(axes, groups.items()):
        for j, (key, rs) in enumerate(sorted(by_method.items(), key=lambda kv: str(kv[0]))):
            rs = sorted(rs, key=lambda r: r["lookahead"])
            name = f"{key[0]} T={key[1]:g}" + (f" c={key[2]}" if key[2] else "")
            ax.plot([r["lookahead"] for r in rs], [r["speedup_vs_ar"] for r in rs], marker="o",
                    color=cmap(j % 10), label=name)
            ideal = [(r["lookahead"], r["ideal_speedup"]) for r in rs if r.get("ideal_speedup")]
            if ideal and key[0] != "hf-uag":
                ax.plot([k for k, _ in ideal], [v for _, v in ideal], ls="--",
                        color=cmap(j % 10), alpha=0.7, label=f"{name} S_ideal")
        for r in runs:
            if r["dataset"] == dataset and r.get("variant") == "default" \
                    and r.get("speedup_vs_ar") is not None:
                ax.axhline(r["speedup_vs_ar"], ls=":", color="grey")
                ax.annotate(f"hf-uag default (k={r['lookahead']}) T={r['temperature']:g}",
                            (0.01, r["speedup_vs_ar"]), xycoords=("axes fraction", "data"),
                            fontsize=7, va="bottom")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("lookahead k")
        ax.set_ylabel("speedup over AR")
        ax.set_title(f"Speedup vs lookahead: {dataset} (dashed: S_ideal)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_tpot(plt, runs):
    sub = [r for r in runs if r.get("tpot_ms_samples")]
    if not sub:
        return None
    datasets = list(dict.fromkeys(r["dataset"] for r in sub))
    n_max = max(sum(1 for r in sub if r["dataset"] == d) for d in datasets)
    fig, axes = _grid(plt, len(datasets), w=max(6.5, 0.55 * n_max + 2), ncols_max=2)
    for ax, d in zip(axes, datasets):
        rs = [r for r in sub if r["dataset"] == d]
        ax.boxplot([r["tpot_ms_samples"] for r in rs], showfliers=True)
        ax.set_xticks(range(1, len(rs) + 1))
        ax.set_xticklabels([f"{_run_key(r)} T={r['temperature']:g}" for r in rs], rotation=60,
                           ha="right", fontsize=7)
        ax.set_ylabel("TPOT per request (ms)")
        ax.set_title(f"Time per output token over prompts: {d}")
    fig.tight_layout()
    return fig


def _plot_concurrency(plt, runs):
    sub = [r for r in runs if r.get("endpoint") and r.get("aggregate_tokens_per_s")]
    if len({r.get("concurrency") for r in sub}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict = {}
    for r in sub:
        groups.setdefault((r["dataset"], r["label"], r["temperature"]), []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["concurrency"])
        ax.plot([r["concurrency"] for r in rs], [r["aggregate_tokens_per_s"] for r in rs],
                marker="o", label=f"{key[0]} {key[1]} T={key[2]:g}")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Service throughput under load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
