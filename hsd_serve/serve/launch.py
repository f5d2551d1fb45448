"""`hsd-serve serve`: start or join Ray, deploy a Serve config, print the endpoints, block."""

from __future__ import annotations

import copy
import importlib
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml


def _import_attr(path: str):
    module, _, attr = path.partition(":")
    if not attr:
        module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


APP_IMPORT_PATH = "hsd_serve.serve.app:build_app"


def hsd_apps(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's applications that are hsd's (``import_path`` = ``APP_IMPORT_PATH``)."""
    return [a for a in cfg.get("applications", []) if a.get("import_path") == APP_IMPORT_PATH]


def read_config(path: str) -> dict[str, Any]:
    """Parse and validate a Serve config (Ray's schema + our strict ``AppConfig`` for args)."""
    from ray.serve.schema import ServeDeploySchema

    from hsd_serve.serve.config import load_config

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    cfg = yaml.safe_load(p.read_text()) or {}
    ServeDeploySchema.parse_obj(cfg)
    for app in hsd_apps(cfg):
        load_config(app.get("args") or {})  # unknown keys are errors here
    return cfg


def exposure_warnings(cfg: dict[str, Any], http_host: str, grpc_port: Optional[int],
                      environ=os.environ) -> list[str]:
    """What listens beyond loopback while an hsd application has no API key configured (as far
    as this process can tell: a keys file named, or the keys variable set here)."""
    from hsd_serve.serve.config import load_config
    from hsd_serve.serve.security import is_loopback

    out = []
    for app in hsd_apps(cfg):
        sec = load_config(app.get("args") or {}).security
        if sec.api_keys_file or (sec.api_keys_env and environ.get(sec.api_keys_env, "").strip()):
            continue
        where = []
        if not is_loopback(http_host):
            where.append(f"HTTP on {http_host}")
        if grpc_port:
            where.append(f"gRPC on every interface, port {grpc_port} (Ray Serve's gRPC proxy "
                         "cannot bind loopback)")
        if where:
            out.append(f"application {app.get('name')!r} has NO API KEY configured and listens "
                       f"beyond loopback ({'; '.join(where)}): anyone who can reach this host "
                       f"can generate. Set ${sec.api_keys_env or 'HSD_API_KEYS'} or "
                       f"security.api_keys_file (docs/security.md).")
    return out


def loopback_grpc(cfg: dict[str, Any], grpc_opts: dict[str, Any]) -> tuple[dict, dict]:
    """A local run on loopback: Ray Serve's gRPC proxy cannot bind loopback (it listens on every
    interface), so the hsd applications' coordinators serve ``hsd.v1.Generation`` on
    ``127.0.0.1:<grpc port>`` themselves (``security.client_grpc_local_port``) and the proxy's
    gRPC is off.  Returns (the config to deploy, the gRPC options for ``serve.start``)."""
    port = grpc_opts.get("port")
    if not port or not grpc_opts.get("grpc_servicer_functions") or len(hsd_apps(cfg)) != 1:
        return cfg, grpc_opts  # none, or several apps (one port each would be needed)
    cfg = copy.deepcopy(cfg)
    app = hsd_apps(cfg)[0]
    args = app["args"] = app.get("args") or {}
    args.setdefault("security", {})["client_grpc_local_port"] = int(port)
    return cfg, {}


def deploy(cfg: dict[str, Any], *, http_port: Optional[int] = None,
           grpc_port: Optional[int] = None, host: Optional[str] = None,
           local: bool = False) -> dict[str, Any]:
    """``serve.start`` with the config's HTTP/gRPC options (``host`` overrides
    ``http_options.host``; absent: loopback), then ``serve.run`` every app.  ``local`` (a Ray
    instance started here) with HTTP on loopback: gRPC on loopback too (``loopback_grpc``)."""
    from ray import serve

    from hsd_serve.serve.security import is_loopback

    http = dict(cfg.get("http_options") or {})
    grpc_opts = dict(cfg.get("grpc_options") or {})
    if http_port is not None:
        http["port"] = http_port
    if grpc_port is not None:
        grpc_opts["port"] = grpc_port
    if host is not None:
        http["host"] = host
    http.setdefault("port", 8000)
    http.setdefault("host", "127.0.0.1")
    grpc_at = "every interface"
    if local and is_loopback(http["host"]):
        cfg, proxy_grpc = loopback_grpc(cfg, grpc_opts)
        if not proxy_grpc and grpc_opts.get("port"):
            grpc_at = "127.0.0.1"
        grpc_opts_for_serve = proxy_grpc
    else:
        grpc_opts_for_serve = grpc_opts
    for warning in exposure_warnings(cfg, http["host"], grpc_opts_for_serve.get("port")):
        print(f"\n*** WARNING *** {warning}\n", file=sys.stderr, flush=True)
    serve.start(http_options=http, grpc_options=grpc_opts_for_serve or None)
    for app in cfg.get("applications", []):
        builder = _import_attr(app["import_path"])
        serve.run(builder(app.get("args") or {}), name=app["name"],
                  route_prefix=app.get("route_prefix", "/"), blocking=False)
    return {"http_port": http["port"], "grpc_port": grpc_opts.get("port"), "host": http["host"],
            "grpc_at": grpc_at,
            "grpc_reflection": bool(grpc_opts.get("enable_reflection", True)),  # Serve's default
            "apps": [a["name"] for a in cfg.get("applications", [])]}


def _http_once(port: int, prompt: str, max_tokens: int, key: Optional[str] = None) -> dict:
    from hsd_serve.serve.security import auth_header

    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json",
                                          **auth_header(key)})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def serve_from_config(config: str, *, address: Optional[str] = None,
                      num_cpus: Optional[float] = None, http_port: Optional[int] = None,
                      grpc_port: Optional[int] = None, host: Optional[str] = None,
                      once: Optional[str] = None,
                      once_max_tokens: int = 32, metrics_export_port: Optional[int] = 8080) -> int:
    """``metrics_export_port``: the local Ray node's Prometheus export port (8080 as on KubeRay;
    0/None: Ray picks one).  The coordinator's ``/metrics`` passes it through either way."""
    import ray

    cfg = read_config(config)
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    init_kwargs: dict[str, Any] = {"address": address or "local", "namespace": "hsd",
                                   "log_to_driver": False}
    if address is None:
        init_kwargs["include_dashboard"] = False
        if num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
        if metrics_export_port:
            if not 1024 <= metrics_export_port <= 65535:
                raise ValueError(f"--metrics-export-port must be in [1024, 65535], got "
                                 f"{metrics_export_port}")
            init_kwargs["_metrics_export_port"] = metrics_export_port
    ray.init(**init_kwargs)
    try:
        info = deploy(cfg, http_port=http_port, grpc_port=grpc_port, host=host,
                      local=address is None)
        hp, gp = info["http_port"], info["grpc_port"]
        print(f"hsd-serve: applications {info['apps']} are running", flush=True)
        print(f"  HTTP (OpenAI):  http://127.0.0.1:{hp}/v1/completions  "
              f"(/v1/chat/completions, /v1/models, /health, /metrics)", flush=True)
        if gp:
            refl = ", reflection" if info["grpc_reflection"] else ""
            print(f"  gRPC:           127.0.0.1:{gp}  (hsd.v1.Generation, grpc.health.v1{refl}; "
                  f"listening on {info['grpc_at']})  "
                  f"e.g. hsd-serve client --address 127.0.0.1:{gp} 'def fib(n):'", flush=True)
        print(f"  Metrics:        http://127.0.0.1:{hp}/metrics  (Prometheus text: ray_hsd_*, "
              f"ray_serve_*; Ray export port {_export_port(ray)})", flush=True)
        if once is not None:
            return _run_once(once, hp, gp, once_max_tokens, _once_key(cfg))
        print("  Ctrl-C to stop.", flush=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"]:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        try:
            shutdown_serve()
        finally:
            ray.shutdown()


def shutdown_serve(timeout_s: float = 60.0) -> None:
    """``serve.shutdown()`` without its alarming last line; returns once the controller exited.

    ``serve.shutdown()`` asks the controller with ``graceful_shutdown``, an actor task that never
    returns: the controller deletes the apps and proxies, then ends itself with ``ray.kill``. Serve
    submits that task with infinite retries, so its caller's Ray prints ``(raylet) Task
    ServeController.graceful_shutdown failed. There are infinite retries remaining ... killed by
    ray.kill`` on every clean shutdown. The same request without retries ends with the
    ``RayActorError`` Serve itself waits for, and nothing is printed. Any surprise in Serve's
    (private) client falls back to ``serve.shutdown()``.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        from ray.serve import context as serve_context

        client = serve_context._get_global_client(raise_if_no_controller_running=False)
        if client is None or client._shutdown:
            serve_context._disconnect()
            return
        client.shutdown_cached_handles()
        ref = client._controller.graceful_shutdown.options(max_task_retries=0).remote()
    except Exception:  # noqa: BLE001 - Serve's internals moved: its own shutdown
        serve.shutdown()
        return
    try:
        ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayActorError:
        pass  # the controller has released everything and exited: done
    except ray.exceptions.GetTimeoutError:
        print(f"hsd-serve: Serve's controller did not exit within {timeout_s:g}s",
              file=sys.stderr, flush=True)
    client._shutdown = True
    serve_context._disconnect()


def _once_key(cfg: dict[str, Any]) -> Optional[str]:
    """The key ``--once`` sends: ``$HSD_API_KEY``, else the first of the app's keys variable as
    set here (a local run's coordinator inherits this environment)."""
    from hsd_serve.serve.config import load_config
    from hsd_serve.serve.security import client_key, parse_keys

    key = client_key()
    for app in hsd_apps(cfg):
        if key is None:
            env = load_config(app.get("args") or {}).security.api_keys_env
            keys = parse_keys(os.environ.get(env, ""), f"${env}") if env else []
            key = keys[0] if keys else None
    return key


def _run_once(prompt: str, http_port: int, grpc_port: Optional[int], max_tokens: int,
              key: Optional[str] = None) -> int:
    import argparse

    from hsd_serve.serve.client import run_client

    rc = 0
    if grpc_port:
        print(f"--- gRPC GenerateStream ({prompt!r})", flush=True)
        args = argparse.Namespace(address=f"127.0.0.1:{grpc_port}", application="hsd",
                                  method="", max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                  top_k=0, seed=0, lookahead=0, stop=[], no_stream=False,
                                  json=False, timeout=300.0, api_key=key)
        rc = run_client(args, prompt)
    print(f"--- HTTP /v1/completions ({prompt!r})", flush=True)
    try:
        out = _http_once(http_port, prompt, max_tokens, key)
        print(out["choices"][0]["text"])
        print(json.dumps({"usage": out.get("usage"), "hsd": out.get("hsd")}), flush=True)
    except Exception as exc:  # noqa: BLE001 - reported as a failure of the run
        print(f"hsd-serve: HTTP request failed: {exc}", file=sys.stderr)
        rc = 1
    _print_metrics_excerpt(http_port, expect=2 if grpc_port else 1, key=key)
    return rc


def _export_port(ray) -> str:
    try:
        node_id = ray.get_runtime_context().get_node_id()
        return str(next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node_id))
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def _print_metrics_excerpt(http_port: int, expect: int = 1, wait_s: float = 40.0,
                           key: Optional[str] = None) -> None:
    """Print the ``ray_hsd_*`` counters from ``/metrics`` once Ray has exported the requests
    just made (Ray exports every ~10 s)."""
    from hsd_serve.metrics import parse_scrape, total
    from hsd_serve.serve.security import auth_header

    url = f"http://127.0.0.1:{http_port}/metrics"
    deadline = time.time() + wait_s
    text = ""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=auth_header(key)),
                                        timeout=10) as resp:
                text = resp.read().decode("utf-8")
            if total(parse_scrape(text), "ray_hsd_requests_total") >= expect:
                break
        except Exception:  # noqa: BLE001 - retried until the deadline
            pass
        time.sleep(1.0)
    keep = ("method", "outcome", "position", "component", "deployment")
    rows: dict[str, float] = {}
    for (name, labels), value in parse_scrape(text).items():
        if name.startswith("ray_hsd_") and name.endswith(("_total", "_count")):
            shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels) if k in keep)
            key = f"{name}{{{shown}}}"
            rows[key] = rows.get(key, 0.0) + value
    print(f"--- GET {url} (ray_hsd_* counters and histogram counts)", flush=True)
    if not rows:
        print("  (no hsd metrics exported yet)", flush=True)
    for key in sorted(rows):
        print(f"  {key} {rows[key]:g}", flush=True)
