"""The coordinator's HTTP app: the OpenAI-compatible API over leased replicas (plus /metrics)."""

from __future__ import annotations

from hsd_serve.serve.openai_api import CoordinatorBackend, build_openai_app


def build_http_app(dep):
    """``dep`` is a CoordinatorDeployment: ``dep.stream(req)`` runs one request on the cluster."""
    cfg = dep.config
    # ConnectionError: no target replica took a request over within target_failover_s → 503
    app = build_openai_app(CoordinatorBackend(dep, dep.tokenizer, cfg.model_name),
                           limits=cfg.request_limits(), unavailable_exceptions=(ConnectionError,))
    from hsd_serve.metrics import mount_metrics_route

    mount_metrics_route(app)  # GET /metrics: this node's Ray metrics export (ray_hsd_*, ray_serve_*)
    return app
