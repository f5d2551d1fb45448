"""Fast tests of the bundled model zoo (hsd_serve/zoo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hsd_serve.zoo as zoo
from hsd_serve.zoo.corpus import Corpus, list_corpus_files, split_files, stdlib_root

# ---------------------------------------------------------------- corpus


def _touch(root: Path, rel: str, text: str = "x = 1\n") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_corpus_includes_and_excludes_the_right_files(tmp_path):
    keep = ["a.py", "pkg/__init__.py", "pkg/sub/b.py", "test/test_x.py", "site_packages_like.py",
            "packages/site.py"]
    drop = ["site-packages/x.py", "lib/site-packages/pkg/y.py", "dist-packages/z.py",
            "pkg/__pycache__/c.py", "notes.txt", "a.pyc", "pkg/data.json"]
    for rel in keep + drop:
        _touch(tmp_path, rel)
    (tmp_path / "link.py").symlink_to(tmp_path / "a.py")
    assert list_corpus_files(tmp_path) == sorted(keep)


def test_corpus_split_is_deterministic_disjoint_and_complete(tmp_path):
    files = [f"m{i:04d}.py" for i in range(2000)]
    train, val = split_files(files, val_fraction=0.01, seed=0)
    assert (train, val) == split_files(list(reversed(files)), val_fraction=0.01, seed=0)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert 5 <= len(val) <= 40  # ~1 %
    assert val == sorted(val) and train != sorted(train)  # train is shuffled
    train2, val2 = split_files(files, val_fraction=0.01, seed=1)
    assert val2 == val and train2 != train  # seed changes the order, not the held-out set


def test_corpus_skips_non_utf8_files(tmp_path):
    _touch(tmp_path, "good.py", "print('é')\n")
    (tmp_path / "bad.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")
    c = Corpus.build(tmp_path, val_fraction=0.0)
    assert sorted(c.train) == ["bad.py", "good.py"]
    assert list(c.texts(sorted(c.train))) == ["print('é')\n"]


def test_stdlib_corpus_is_the_standard_library():
    files = list_corpus_files()
    assert "os.py" in files and "json/__init__.py" in files
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    assert all(f.endswith(".py") for f in files)
    assert stdlib_root().is_dir()


# ---------------------------------------------------------------- byte tokenizer


@pytest.fixture(scope="module")
def byte_tok():
    from hsd_serve.zoo.toks import build_byte_tokenizer

    return build_byte_tokenizer()


def test_byte_tokenizer_vocab(byte_tok):
    assert len(byte_tok) == 257
    assert byte_tok.eos_token == "<|endoftext|>" and byte_tok.eos_token_id == 256
    assert byte_tok.bos_token_id == 256
    assert byte_tok.encode("A\n", add_special_tokens=False) == [65, 10]


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_unicode(byte_tok, s):
    ids = byte_tok.encode(s, add_special_tokens=False)
    assert ids == list(s.encode("utf-8"))
    assert byte_tok.decode(ids) == s
    assert byte_tok.decode(byte_tok.encode(s)) == s


def test_byte_tokenizer_saves_and_reloads(byte_tok, tmp_path):
    from transformers import AutoTokenizer

    byte_tok.save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    s = "déf f(x):\n\treturn x  # 🐍 \u0000"
    assert tok.decode(tok.encode(s)) == s and len(tok) == 257 and tok.eos_token_id == 256


# ---------------------------------------------------------------- package API


def test_bundled_model_dir_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError):
        zoo.bundled_model_dir("nope")
    monkeypatch.setattr(zoo, "BUNDLED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="zoo build"):
        zoo.bundled_model_dir("target")
    with pytest.raises(FileNotFoundError, match="hsd-serve align"):
        zoo.resolve_model_path("bundled:drafter_aligned")
    with pytest.raises(ValueError, match="drafter_aligned"):
        zoo.resolve_model_path("bundled:nope")
    assert zoo.resolve_model_path("org/model") == "org/model"  # hub ids and folders pass through


def test_zoo_import_is_cheap():
    code = "import sys, hsd_serve.zoo; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_cli_parser():
    from hsd_serve.zoo.cli import build_parser

    a = build_parser().parse_args(["build", "--out", "x", "--minutes-target", "5", "--only", "drafter"])
    assert a.minutes_target == 5.0 and a.only == ["drafter"] and str(a.out) == "x"


# ---------------------------------------------------------------- bundled models

EXPECTED = {  # name -> (tokenizer length, eos id, tokenizer files)
    "target": (32000, 2, ("tokenizer.json", "tokenizer.model")),
    "drafter": (50257, 50256, ("tokenizer.json",)),
    "byte_drafter": (257, 256, ("tokenizer.json",)),
    "drafter_aligned": (50257, 50256, ("tokenizer.json",)),
}


def _built(name: str) -> bool:
    try:
        zoo.bundled_model_dir(name)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("name", zoo.BUNDLED_NAMES)
def test_bundled_model_loads_offline(name, monkeypatch):
    if not _built(name):
        pytest.skip(f"bundled {name} not built")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = zoo.bundled_model_dir(name)
    n_tok, eos, files = EXPECTED[name]
    for f in ("config.json", "generation_config.json", "README.md", "LICENSE", *files):
        assert (d / f).is_file(), f
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tok) == n_tok and model.config.vocab_size == n_tok
    assert tok.eos_token_id == eos and model.generation_config.eos_token_id == eos
    s = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    with torch.inference_mode():
        logits = model(torch.tensor([tok.encode(s)])).logits
    assert logits.shape[-1] == n_tok and torch.isfinite(logits.float()).all()
    if name == "target":
        assert model.dtype == torch.bfloat16
    card = (d / "README.md").read_text()
    assert "nats/byte" in card and "ms per step" in card


def test_bundled_weights_under_80_mb():
    dirs = [zoo.BUNDLED_DIR / n for n in zoo.BUNDLED_NAMES if _built(n)]
    if not dirs:
        pytest.skip("no bundled models built")
    total = sum(p.stat().st_size for d in dirs for p in d.glob("*.safetensors"))
    assert total <= 80 * 1000 * 1000


def test_bundled_cards_record_target_costlier_than_drafters():
    if not all(_built(n) for n in zoo.MODEL_NAMES):
        pytest.skip("bundled models not built")
    for n in ("drafter", "byte_drafter"):
        rec = json.loads((zoo.bundled_model_dir(n) / "zoo_card.json").read_text())
        assert rec["step_ratio_target_over_this"] > 1.0


def test_training_continues_from_a_previous_stage(tmp_path):
    """``train --init-from``: starts from the exported weights, reads on in the corpus, and the
    state carries both stages (steps, tokens and wall time add up; the history continues)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hsd_serve.zoo.specs import SPECS
    from hsd_serve.zoo.train import train

    corpus = tmp_path / "corpus"
    for i in range(300):
        _touch(corpus, f"m{i:03d}.py", f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 40)
    spec = SPECS["byte_drafter"]
    first = train(spec, tmp_path / "a", corpus_root=corpus, max_steps=2, minutes=5)
    assert first["steps"] == 2 and len(first["stages"]) == 1
    init = tmp_path / "a" / "byte_drafter" / "hf"
    second = train(spec, tmp_path / "b", corpus_root=corpus, max_steps=3, minutes=5, init_from=init,
                   lr=1e-4)
    assert second["steps"] == 5
    assert second["tokens_seen"] == first["tokens_seen"] + 3 * spec.batch_size * spec.seq_len
    assert [s["steps"] for s in second["stages"]] == [2, 3]
    assert second["stages"][1]["init_from"] == str(init) and second["stages"][1]["lr"] == 1e-4
    assert [h["step"] for h in second["history"]] == [2, 5]
    assert second["train_wall_s"] >= first["train_wall_s"]
    a = AutoModelForCausalLM.from_pretrained(str(init))
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b" / "byte_drafter" / "hf"))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    moved = [n for n in pa if not torch.equal(pa[n], pb[n])]
    assert moved, "the continued stage did not train"
    assert max(float((pa[n] - pb[n]).detach().abs().max()) for n in pa) < 0.05  # small steps


def test_serve_configs_name_bundled_models():
    """``bundled:NAME`` in a serve config resolves to the package's folder on each node; an
    unknown name is refused when the replica resolves it."""
    from hsd_serve.serve.config import AppConfig

    cfg = AppConfig.model_validate({"drafter": {"path": "bundled:drafter_aligned",
                                                "head_ids": 16384}})
    assert cfg.target.resolved_path() == str(zoo.BUNDLED_DIR / "target")
    assert cfg.drafter.resolved_path() == str(zoo.BUNDLED_DIR / "drafter_aligned")
    with pytest.raises(ValueError, match="unknown bundled model"):
        AppConfig.model_validate({"drafter": {"path": "bundled:nope"}}).drafter.resolved_path()
