"""Helpers for fault, cancellation and overload tests on the local Ray instance.

Every wait here has a deadline: a test that would hang fails instead (and ``watchdog`` kills
the whole run with a traceback if something below Python's reach blocks).
"""

from __future__ import annotations

import faulthandler
import sys
import time
from typing import Any, Callable, Optional

import pytest

META_KEY = "application"


def deploy(app: str, args: dict, route_prefix: str, http_port: Optional[int] = None):
    """``serve.run`` a uniquely named hsd application; returns its Coordinator handle.  With
    ``http_port``: also wait until the HTTP proxy routes ``route_prefix`` (its route table is
    updated asynchronously after ``serve.run`` returns; until then the prefix answers 404)."""
    from ray import serve

    from hsd_serve.serve.app import build_app

    handle = serve.run(build_app(args), name=app, route_prefix=route_prefix)
    if http_port is not None:
        import httpx

        url = f"http://127.0.0.1:{http_port}{route_prefix.rstrip('/')}/health"

        def routed() -> bool:
            try:
                return httpx.get(url, timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(routed, 60, interval_s=0.2, what=f"the HTTP route {route_prefix}")
    return handle


def undeploy(app: str) -> None:
    from ray import serve

    try:
        serve.delete(app)
    except Exception:  # noqa: BLE001 - best effort at teardown
        pass


def tiny_args(service: dict, **overrides: Any) -> dict:
    """The session service's arguments (tiny pair), with longer generations allowed."""
    args = dict(service["args"])
    args.update(max_tokens_limit=480, default_max_tokens=16)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value
    return args


def wait_for(fn: Callable[[], Any], timeout_s: float, interval_s: float = 0.25,
             what: Any = "condition") -> Any:
    """Call ``fn`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)


def replica_stats(app: str, deployment: str, replicas: int, tries: int = 40) -> dict[str, dict]:
    """``stats()`` of every replica of a deployment, keyed by actor name (handle calls are
    routed at random, so call until ``replicas`` distinct replicas answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        st = handle.stats.remote().result(timeout_s=30)
        seen[st["actor_name"]] = st
        if len(seen) >= replicas:
            break
    return seen


def live_replica_names(app: str, deployment: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if f"{app}#{deployment}#" in a["name"]}


def kill_replica(name: str, namespace: str = "serve") -> None:
    """Kill a replica actor the way a node loss would (no graceful shutdown)."""
    import ray

    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)


def sessions_zero(app: str, deployment: str, replicas: int = 1) -> Optional[dict]:
    stats = replica_stats(app, deployment, replicas)
    if len(stats) >= replicas and all(s["sessions"] == 0 and s["leases_active"] == 0
                                       for s in stats.values()):
        return stats
    return None


@pytest.fixture(autouse=True)
def watchdog():
    """Kill the test run with a traceback of every thread if one test exceeds 10 minutes."""
    faulthandler.dump_traceback_later(600, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
