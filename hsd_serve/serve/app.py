"""The builder that ``serve run`` / ``serve_config.yaml`` points at (``import_path``)."""

from __future__ import annotations

from typing import Any, Optional

from hsd_serve.serve.config import AppConfig, load_config


def build_app(args: Optional[dict[str, Any]] = None):
    """``args`` (validated strictly as ``AppConfig``) → the Ray Serve application."""
    from hsd_serve.serve.deployments import build_deployments

    return build_deployments(load_config(args))


__all__ = ["AppConfig", "build_app"]
