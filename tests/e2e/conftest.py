"""One local Ray instance + Serve per test session, with the service deployed on tiny models."""

from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_serve():
    ray = pytest.importorskip("ray")
    from ray import serve

    # autoscaling decisions in seconds, not tens of seconds (test_autoscaling.py): how often
    # handles and replicas push their ongoing-request counts to Serve's controller (read by
    # every Ray worker started below, which inherits this environment)
    for name in ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                 "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(name, "0.5")
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="hsd-tests",
             log_to_driver=False)
    http_port, grpc_port = _free_port(), _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [
                    "hsd_serve.pb.hsd_pb2_grpc.add_GenerationServicer_to_server",
                    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"],
                    "enable_reflection": True})
    try:
        yield {"http": http_port, "grpc": grpc_port}
    finally:
        from hsd_serve.serve.launch import shutdown_serve

        shutdown_serve()  # serve.shutdown() without its "graceful_shutdown failed" line
        ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_serve, tiny_model_dir):
    """The hsd application on a tiny Mistral-tokenizer target and a tiny GPT-2-tokenizer drafter."""
    from ray import serve

    from hsd_serve.serve.app import build_app

    target, drafter = tiny_model_dir("mistral-v0.1"), tiny_model_dir("gpt2", seed=1)
    args = {
        "target": {"path": str(target)}, "drafter": {"path": str(drafter)},
        "model_name": "tiny-pair", "default_max_tokens": 16, "max_tokens_limit": 64,
        "drafter_deployment": {"num_cpus": 0.1, "torch_threads": 1},
        "target_deployment": {"num_cpus": 0.1, "torch_threads": 1},
        "coordinator_deployment": {"num_cpus": 0.1},
    }
    serve.run(build_app(args), name="hsd", route_prefix="/")
    return dict(ray_serve, target=target, drafter=drafter, app="hsd", args=args)
