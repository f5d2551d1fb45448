"""`hsd-serve generate`: JSON output for every method, and one-line errors for bad arguments."""

from __future__ import annotations

import json

import pytest

from hsd_serve.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return str(tiny_model_dir("mistral-v0.1")), str(tiny_model_dir("gpt2", seed=1))


@pytest.mark.parametrize("method", ["ar", "slem", "tli", "auto"])
def test_generate_json_every_method(capsys, pair, method):
    target, drafter = pair
    rc, out, err = run(capsys, "generate", "--target", target, "--drafter", drafter,
                       "--method", method, "--max-new-tokens", "8", "--json", "def fib(n):")
    assert rc == 0, err
    obj = json.loads(out)
    assert set(obj) >= {"text", "token_ids", "finish_reason", "stats"}
    assert len(obj["token_ids"]) == 8 and obj["finish_reason"] == "length"
    for key in ("rounds", "drafted", "accepted", "acceptance_rate", "tokens_per_round", "wall_s",
                "tokens_per_s", "method"):
        assert key in obj["stats"]
    assert obj["stats"]["method"] == ("slem" if method == "auto" else method)


def test_generate_sd_and_slrs(capsys, tiny_model_dir, stories_model, byte_drafter_model):
    stories = str(stories_model.spec.path)
    rc, out, err = run(capsys, "generate", "--target", stories, "--drafter", stories,
                       "--method", "sd", "--max-new-tokens", "6", "--json", "Once upon")
    assert rc == 0, err
    assert json.loads(out)["stats"]["acceptance_rate"] == 1.0
    rc, out, err = run(capsys, "generate", "--target", stories, "--drafter",
                       str(byte_drafter_model.spec.path), "--method", "slrs",
                       "--temperature", "1", "--seed", "3", "--max-new-tokens", "5", "--json",
                       "Once upon")
    assert rc == 0, err
    assert len(json.loads(out)["token_ids"]) == 5


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--method", "sd"], "share one vocabulary"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--lookahead", "0"], "lookahead"),
    (["--drafter-executor", "vllm", "--drafter-head-ids", "8"], "drafter-head-ids"),
])
def test_bad_arguments_exit_with_one_line(capsys, pair, args, needle):
    target, drafter = pair
    rc, out, err = run(capsys, "generate", "--target", target, "--drafter", drafter, *args, "x")
    assert rc == 2
    assert needle in err and err.count("\n") == 1, err


def test_missing_model_dir_and_long_prompt(capsys, pair, tmp_path):
    rc, _, err = run(capsys, "generate", "--target", str(tmp_path / "nope"), "--drafter", "none",
                     "x")
    assert rc == 2 and "nope" in err and err.count("\n") == 1
    target, drafter = pair
    rc, _, err = run(capsys, "generate", "--target", target, "--drafter", drafter,
                     "word " * 2000)
    assert rc == 2 and "prompt" in err and "context" in err


def test_slrs_over_budget_is_refused(capsys, pair):
    target, drafter = pair  # a BPE drafter against a SentencePiece target: too many paths
    rc, _, err = run(capsys, "generate", "--target", target, "--drafter", drafter,
                     "--method", "slrs", "--slrs-max-forwards", "4", "x")
    assert rc == 2 and ("budget" in err.lower() or "forwards" in err), err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_once_answers_and_shuts_down_without_alarm(pair, tmp_path):
    """`hsd-serve serve CONFIG --once PROMPT` (what `make demo` runs) on the tiny pair: both
    requests answered, exit 0, and Serve's shutdown leaves no `(raylet) Task
    ServeController.graceful_shutdown failed ... killed by ray.kill` line behind."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((root / "serve_config.yaml").read_text())
    args = cfg["applications"][0]["args"]
    target, drafter = pair
    args["target"] = {"path": target}
    args["drafter"] = {"path": drafter}
    # tiny random targets: our executor (vLLM's CPU attention needs head sizes >= 32; the vLLM
    # service is tests/e2e/test_vllm_service.py)
    args["target_executor"] = "hf"
    args.pop("vllm", None)
    for dep in ("drafter_deployment", "target_deployment", "coordinator_deployment"):
        args[dep]["num_cpus"] = 0.1
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "hsd_serve.cli", "serve", str(config), "--num-cpus", "2",
         "--http-port", str(_free_port()), "--grpc-port", str(_free_port()),
         "--metrics-export-port", "0", "--max-tokens", "4", "--once", "def fib(n):"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "--- gRPC GenerateStream" in out and "--- HTTP /v1/completions" in out, out
    assert '"completion_tokens": 4' in out, out
    # a local run on loopback: gRPC too (the coordinator serves it; Ray's proxy cannot bind
    # loopback), and nothing is exposed, so no warning
    assert "(hsd.v1.Generation, grpc.health.v1, reflection; listening on 127.0.0.1)" in out, out
    assert "WARNING ***" not in out, out
    assert "graceful_shutdown" not in out and "killed by" not in out, out
