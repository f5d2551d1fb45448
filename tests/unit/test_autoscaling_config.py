"""Autoscaling settings: every field reaches Ray Serve as Ray's own AutoscalingConfig accepts it,
only the drafter may scale to zero, bounds hold together, and the blocks operators copy from the
README and docs/autoscaling.md are valid configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from hsd_serve.serve.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
DRAFTER = {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2,
           "upscale_delay_s": 0, "downscale_delay_s": 3, "downscale_to_zero_delay_s": 5,
           "metrics_interval_s": 0.5, "look_back_period_s": 1.0, "initial_replicas": 1}


def test_fields_reach_ray_serve_as_ray_accepts_them():
    from ray.serve.config import AutoscalingConfig as RayAutoscaling

    cfg = AppConfig(drafter_deployment={"num_replicas": None, "autoscaling_config": DRAFTER})
    opts = cfg.drafter_deployment.serve_options()
    assert "num_replicas" not in opts and opts["autoscaling_config"] == DRAFTER
    ray_cfg = RayAutoscaling(**opts["autoscaling_config"])  # Ray's own validation
    for k, v in DRAFTER.items():
        assert getattr(ray_cfg, k) == v, k


@pytest.mark.parametrize("field", ["target_deployment", "coordinator_deployment"])
def test_only_the_drafter_may_scale_to_zero(field):
    with pytest.raises(ValidationError, match="only the drafter may scale to zero"):
        AppConfig(**{field: {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}})
    AppConfig(**{field: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}})


@pytest.mark.parametrize("bad,match", [
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}, "initial_replicas"),
    ({"max_replicas": 2, "metrics_interval_s": 0}, "metrics_interval_s"),
    ({"max_replicas": 2, "upscale_delay_s": -1}, "upscale_delay_s"),
    ({"max_replicas": 2, "target_ongoing_requests": 0}, "target_ongoing_requests"),
    ({"max_replicas": 2, "surprise": 1}, "surprise"),
])
def test_bounds_are_checked_naming_the_field(bad, match):
    with pytest.raises(ValidationError, match=match):
        AppConfig(drafter_deployment={"autoscaling_config": bad})


@pytest.mark.parametrize("doc", ["README.md", "docs/autoscaling.md"])
def test_the_blocks_operators_copy_are_valid(doc):
    text = (ROOT / doc).read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S)
              if "autoscaling_config" in b and "drafter_deployment" in b]
    assert blocks, f"{doc} shows no autoscaling block"
    for block in blocks:
        args = yaml.safe_load(re.sub(r"^# .*\n", "", block))
        cfg = AppConfig(**args)
        d, t = cfg.drafter_deployment.autoscaling_config, cfg.target_deployment.autoscaling_config
        assert d.min_replicas == 0 and t.min_replicas >= 1 and d.max_replicas > 1
