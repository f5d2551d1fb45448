"""`python -m hsd_serve.bench.dataplane_ab`: overlap settings side by side over the real gRPC data
plane, the workers in processes of their own, every output checked against AR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsd_serve.bench.dataplane_ab import summarize

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "hsd_serve.bench.dataplane_ab", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_settings_side_by_side_with_rotated_passes_all_equal_to_ar(assets, tmp_path):
    from hsd_serve.bench.datasets import available_datasets

    if "humaneval" not in available_datasets():
        pytest.skip("HumanEval not in the shared assets")
    out = tmp_path / "ab"
    # sampled: SLEM's output is AR's own keyed sample path, drafted ahead or not
    proc = _run("--limit", "2", "--max-new-tokens", "10", "--lookahead", "2", "--repeats", "2",
                "--settings", "off,on,branches", "--temperature", "0.8", "--seed", "3",
                "--drafter-head-ids", "16384", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is False
    assert res["config"]["settings"] == ["off", "on", "branches"]
    runs = res["runs"]
    # 2 passes x 3 settings, pass 1 starting at the second setting
    assert [(r["pass"], r["setting"]) for r in runs] == [
        (0, "off"), (0, "on"), (0, "branches"), (1, "on"), (1, "branches"), (1, "off")]
    for r in runs:
        assert r["requests"] == 2 and r["identical_to_ar"] == 2, r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0
    assert res["ar"]["tokens"] == runs[0]["tokens"]
    off = [r for r in runs if r["setting"] == "off"]
    on = [r for r in runs if r["setting"] != "off"]
    # the switch engaged: drafts made ahead only where overlap is on
    assert all(r["ahead_ready"] + r["ahead_plain"] + r["ahead_waited"] == 0 for r in off)
    assert all(r["ahead_ready"] + r["ahead_plain"] > 0 for r in on)
    summary = {r["setting"]: r for r in res["summary"]}
    assert summary["off"]["vs_off"] == 1.0
    assert all(0 < r["verify_share"] <= 1.0 for r in res["summary"])  # one stream
    assert len(summary["on"]["vs_passes"]) == 2
    assert "| 1 | 2 | branches |" in (out / "results.md").read_text()


def test_bad_settings_are_refused_before_anything_starts(tmp_path):
    proc = _run("--settings", "off,sideways", "--out", str(tmp_path / "x"), timeout=60)
    assert proc.returncode != 0
    assert "--settings" in proc.stderr and "sideways" in proc.stderr
    proc = _run("--settings", "on,on", timeout=60)
    assert proc.returncode != 0 and "at most once" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_summary_pairs_ratios_by_pass():
    runs = [{"concurrency": 1, "lookahead": 2, "setting": s, "pass": p, "tokens_per_s": t,
             "identical_to_ar": 1, "requests": 1, "ahead_ready": 0, "ahead_branch": 0,
             "rounds": 1, "verify_s": 0.5, "wall_s": 1.0}
            for s, p, t in [("off", 0, 10.0), ("on", 0, 12.0), ("on", 1, 30.0), ("off", 1, 20.0),
                            ("on", 2, 9.0), ("off", 2, 10.0)]]
    rows = {r["setting"]: r for r in summarize(runs, "off")}
    assert rows["on"]["vs_passes"] == [1.2, 1.5, 0.9]
    assert rows["on"]["vs_off"] == 1.2  # the median of the per-pass ratios
    assert rows["on"]["tokens_per_s"] == 12.0
    assert rows["off"]["vs_off"] == 1.0 and rows["off"]["requests"] == 3
    assert rows["on"]["verify_share"] == 0.5
