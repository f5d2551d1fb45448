"""Two drafter and two target replicas: concurrent requests are correct and use both of each."""

from __future__ import annotations

import asyncio

import pytest

from hsd_serve.engine.local import Engine
from hsd_serve.engine.types import GenerationRequest
from hsd_serve.models.hf import LoadedModel, ModelSpec

PROMPTS = [f"def f{i}(x):\n    return x * {i}" for i in range(8)]


@pytest.fixture(scope="module")
def app_2x2(service):
    from ray import serve

    from hsd_serve.serve.app import build_app

    args = dict(service["args"])
    args["drafter_deployment"] = dict(args["drafter_deployment"], num_replicas=2)
    args["target_deployment"] = dict(args["target_deployment"], num_replicas=2)
    handle = serve.run(build_app(args), name="hsd-2x2", route_prefix="/x2")
    yield handle
    serve.delete("hsd-2x2")


def test_concurrent_requests_use_both_replicas_and_stay_exact(service, app_2x2):
    engine = Engine(LoadedModel(ModelSpec(str(service["target"]))),
                    LoadedModel(ModelSpec(str(service["drafter"]))))
    want = [engine.generate(GenerationRequest(p, max_new_tokens=10, method="ar")).token_ids
            for p in PROMPTS]

    async def one(prompt, method):
        result = None
        gen = app_2x2.options(stream=True).stream.remote(
            GenerationRequest(prompt, max_new_tokens=10, method=method))
        async for chunk in gen:
            result = chunk.result or result
        return result

    async def run_all():
        return await asyncio.gather(*[one(p, m) for p in PROMPTS for m in ("slem", "tli")])

    results = asyncio.run(asyncio.wait_for(run_all(), 300))
    targets, drafters = set(), set()
    for i, res in enumerate(results):
        assert res.token_ids == want[i // 2], (PROMPTS[i // 2], i % 2)
        targets.update(res.stats.replicas["target"])
        drafters.update(res.stats.replicas["drafter"])
    assert len(targets) == 2, targets
    assert len(drafters) == 2, drafters
