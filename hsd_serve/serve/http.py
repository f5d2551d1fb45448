"""The coordinator's HTTP app: the OpenAI-compatible API over leased replicas (plus /metrics)."""

from __future__ import annotations

from hsd_serve.serve.openai_api import CoordinatorBackend, build_openai_app


def build_http_app(dep):
    """``dep`` is a CoordinatorDeployment: ``dep.stream(req)`` runs one request on the cluster."""
    cfg = dep.config
    # ConnectionError: no target replica took a request over within target_failover_s → 503
    app = build_openai_app(CoordinatorBackend(dep, dep.tokenizer, cfg.model_name),
                           limits=cfg.request_limits(), unavailable_exceptions=(ConnectionError,),
                           api_keys=getattr(dep, "api_keys", None),
                           on_unauthenticated=getattr(dep, "refused", None))
    from fastapi import Depends

    from hsd_serve.metrics import mount_metrics_route

    guard = app.state.key_guard if cfg.security.metrics_requires_key else None
    # GET /metrics: this node's Ray metrics export (ray_hsd_*, ray_serve_*)
    mount_metrics_route(app, dependencies=[Depends(guard)] if guard is not None else None)
    return app
