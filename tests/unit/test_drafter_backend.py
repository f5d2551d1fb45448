"""Which methods a drafter that returns tokens only (``drafter_executor: vllm``) can draft, and
how the coordinator resolves and refuses requests for it (no vLLM needed here)."""

from __future__ import annotations

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.engine import Coordinator, TargetInfo
from hsd_serve.engine.methods import METHODS
from hsd_serve.engine.types import RequestError
from hsd_serve.serve.config import AppConfig

GREEDY, HOT = SamplingParams(), SamplingParams(temperature=0.7)


def test_argmax_drafts_by_method():
    assert METHODS["slem"].drafts_argmax(GREEDY) and METHODS["slem"].drafts_argmax(HOT)
    for m in ("tli", "sd"):
        assert METHODS[m].drafts_argmax(GREEDY) and not METHODS[m].drafts_argmax(HOT)
    assert not METHODS["slrs"].drafts_argmax(GREEDY) and not METHODS["slrs"].drafts_argmax(HOT)


def _coordinator(rows: bool, same_vocab: bool = False) -> Coordinator:
    return Coordinator(target=None, info=TargetInfo(None, frozenset(), 1024), drafter=object(),
                       same_vocab=same_vocab, drafter_rows=rows)


@pytest.mark.parametrize("same_vocab", [False, True])
def test_auto_picks_a_method_the_drafter_can_draft(same_vocab):
    rows, tokens = _coordinator(True, same_vocab), _coordinator(False, same_vocab)
    greedy = "sd" if same_vocab else "slem"
    assert rows.resolve_method("auto", GREEDY) == tokens.resolve_method("auto", GREEDY) == greedy
    assert rows.resolve_method("auto", HOT) == ("sd" if same_vocab else "tli")
    assert tokens.resolve_method("auto", HOT) == "slem"


@pytest.mark.parametrize("method,params", [("tli", HOT), ("slrs", GREEDY), ("slrs", HOT)])
def test_methods_needing_rows_are_refused_naming_the_field(method, params):
    with pytest.raises(RequestError) as err:
        _coordinator(False).resolve_method(method, params)
    assert err.value.field == "method" and "drafter_executor: vllm" in err.value.message
    assert _coordinator(True).resolve_method(method, params) == method  # an HF drafter runs it


def test_argmax_methods_pass():
    c = _coordinator(False)
    assert [c.resolve_method(m, p) for m, p in (("slem", HOT), ("slem", GREEDY), ("tli", GREEDY))
            ] == ["slem", "slem", "tli"]
    assert _coordinator(False, True).resolve_method("sd", GREEDY) == "sd"


def test_config():
    assert AppConfig().drafter_executor == "hf"
    cfg = AppConfig(drafter_executor="vllm", drafter_vllm={"enforce_eager": True})
    assert cfg.drafter_vllm.enforce_eager and cfg.drafter_vllm.cpu_kvcache_gib == 1
    with pytest.raises(ValueError, match="head_ids"):
        AppConfig(drafter_executor="vllm", drafter={"path": "bundled:drafter", "head_ids": 64})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        AppConfig(drafter_vllm={"num_speculative_tokens": 2})  # a target-only option
    with pytest.raises(ValueError, match="drafter_executor"):
        AppConfig(drafter_executor="tgi")
