"""`hsd-serve align` end to end on the bundled pair: a few steps, the folder it writes, --resume,
the held-out divergence, and outputs that stay exactly the target's."""

from __future__ import annotations

import json
import shutil

import pytest

from hsd_serve.cli import main
from hsd_serve.zoo import bundled_model_dir

ARGS = ["--prompts", "6", "--gen-batch", "6", "--max-new-tokens", "16", "--batch", "4",
        "--heldout", "0.3", "--lr", "1e-3", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "drafter"
    rc = main(["align", "--out", str(out), "--max-steps", "6", *ARGS])
    assert rc == 0
    return out


def _record(out):
    return json.loads((out / "align.json").read_text())


def test_align_writes_a_loadable_drafter_and_its_record(aligned):
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    rec = _record(aligned)
    assert rec["settings"]["temperatures"] == [0.6, 1.0] and rec["settings"]["max_steps"] == 6
    assert rec["training"]["steps"] == 6 and rec["training"]["first_loss"] > 0
    data = rec["data"]
    assert data["greedy"]["examples"] > 0 and data["T=1"]["examples"] > 0
    assert 0.5 < data["T=1"]["aligned_fraction"] <= 1.0
    assert data["intersection_target_ids"] > 1000
    drafter = LoadedModel(ModelSpec(str(aligned)))
    bundled = LoadedModel(ModelSpec(str(bundled_model_dir("drafter"))))
    assert drafter.vocab == bundled.vocab
    assert drafter.model.config.to_dict()["hidden_size"] == bundled.model.config.hidden_size


def test_align_lowers_the_held_out_intersection_divergence(aligned):
    rec = _record(aligned)
    before, after = rec["heldout_before"], rec["heldout_after"]
    assert before["soft_positions"] > 0 and before["soft_positions"] == after["soft_positions"]
    assert after["soft_kl"] < before["soft_kl"]


def test_resume_continues_the_checkpoint_and_refuses_other_data(aligned, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(aligned, out)
    first = _record(out)
    rc = main(["align", "--out", str(out), "--max-steps", "9", "--resume", *ARGS])
    assert rc == 0
    rec = _record(out)
    assert rec["resumed"] and rec["training"]["steps"] == 9
    assert rec["data"] == first["data"]  # the generated data was reused, not regenerated
    assert rec["heldout_before"] == first["heldout_before"]
    capsys.readouterr()
    rc = main(["align", "--out", str(out), "--max-steps", "12", "--resume", *ARGS,
               "--prompts", "7"])
    assert rc == 2 and "settings differ" in capsys.readouterr().err
    rc = main(["align", "--out", str(out), "--max-steps", "12", *ARGS])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    rc = main(["align", "--out", str(tmp_path / "none"), "--resume", *ARGS])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err


def test_missing_models_are_clean_errors(tmp_path, capsys):
    rc = main(["align", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "--target" in err and "nope" in err and len(err.strip().splitlines()) == 1
    rc = main(["align", "--drafter", "./missing-drafter", "--out", str(tmp_path / "o"), *ARGS])
    assert rc == 2 and "missing-drafter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bundle_writes_a_zoo_folder_with_a_measured_card(aligned, tmp_path, capsys):
    from hsd_serve.zoo.cli import main as zoo_main

    cmd = "hsd-serve align --max-steps 6 (the test's run)"
    rc = zoo_main(["bundle", "--from", str(aligned), "--out", str(tmp_path), "--command", cmd])
    assert rc == 0, capsys.readouterr().err
    d = tmp_path / "drafter_aligned"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "align.json", "LICENSE", "README.md", "zoo_card.json"):
        assert (d / f).is_file(), f
    assert (d / "model.safetensors").read_bytes() == (aligned / "model.safetensors").read_bytes()
    assert _record(d) == _record(aligned)
    card = (d / "README.md").read_text()
    assert cmd in card and "nats/byte" in card and "ms per step" in card
    before = _record(aligned)["heldout_before"]["soft_kl"]
    assert f"{before:.3f}" in card  # the held-out metrics are the record's
    info = json.loads((d / "zoo_card.json").read_text())
    assert info["val"]["val_nats_per_byte"] > 0 and info["base_val"]["val_nats_per_byte"] > 0
    assert set(info["latency_ms"]) == {"drafter_aligned", "drafter"}
    assert "hsd-serve align" in (d / "LICENSE").read_text()
    capsys.readouterr()
    rc = zoo_main(["bundle", "--from", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert rc == 2 and "not an `hsd-serve align` output" in capsys.readouterr().err
    for flag in ("--from", "--base"):  # never the folder it would replace: nothing is touched
        args = {"--from": str(aligned), "--base": "bundled:drafter", flag: str(d)}
        rc = zoo_main(["bundle", "--out", str(tmp_path), *[x for kv in args.items() for x in kv]])
        assert rc == 2 and "the folder the bundle replaces" in capsys.readouterr().err
        assert (d / "model.safetensors").read_bytes() == \
            (aligned / "model.safetensors").read_bytes()


def _aligned_drafters():
    """The test's own aligned drafter, and the committed ``bundled:drafter_aligned`` (as served:
    head pruned to 16384 ids) when it is built."""
    out = ["run"]
    try:
        bundled_model_dir("drafter_aligned")
        out.append("bundled")
    except FileNotFoundError:
        pass
    return out


@pytest.mark.parametrize("which", _aligned_drafters())
@pytest.mark.parametrize("method", ["slem", "tli"])
def test_greedy_outputs_with_the_aligned_drafter_equal_ar(aligned, method, which):
    from hsd_serve.engine.local import Engine
    from hsd_serve.engine.types import GenerationRequest
    from hsd_serve.models.hf import LoadedModel, ModelSpec

    target = LoadedModel(ModelSpec(str(bundled_model_dir("target"))))
    spec = (ModelSpec(str(aligned)) if which == "run" else
            ModelSpec(str(bundled_model_dir("drafter_aligned")), head_ids=16384))
    engine = Engine(target, LoadedModel(spec))
    for prompt in ("def fib(n):\n", "import os\n\nclass Config:\n    def __init__(self"):
        ar = engine.generate(GenerationRequest(prompt, max_new_tokens=24, method="ar"))
        spec = engine.generate(GenerationRequest(prompt, max_new_tokens=24, method=method,
                                                 lookahead=4))
        assert spec.token_ids == ar.token_ids
        assert spec.stats.drafted > 0
