"""Offline checks of k8s/: every manifest parses; core kinds validate against the Kubernetes API
schemas (kubernetes-validate, strict); the RayService and the PodMonitor validate against their
CRDs' OpenAPI schemas (tests/data/k8s, jsonschema), with the RayService's pod templates checked
as core PodTemplates; the embedded serve config is serve_config.yaml plus sync.py's overrides;
placement, Services and the PodMonitor point at what exists; the API keys Secret is mounted on
every Ray pod where the serve config looks for it and holds no usable key in git; the
NetworkPolicies select the Ray pods and let in what must get in; kustomization lists every
manifest but the Secret template, and generates that Secret from the git-ignored k8s/api-keys
under the name the pods mount; replica autoscaling (Serve) fits node autoscaling (the worker
groups' min/max pods) and every Ray pod pushes autoscaling metrics often enough.  Each check also
fails on a deliberately broken copy.  No
cluster, no kubectl."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

from hsd_serve import metrics as M

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DATA = ROOT / "tests" / "data" / "k8s"
KUBE_VERSION = "1.33"  # Kubernetes API schemas used for core kinds
CRDS = ("ray.io_rayservices.subset.yaml", "monitoring.coreos.com_podmonitors.subset.yaml")
KEYS_VOLUME = "hsd-api-keys"  # the API keys Secret's volume on every Ray pod
# Templates that kustomization must NOT list: applied, their keyless placeholder would replace
# the real Secret.  Still validated like the manifests.
TEMPLATES = {"secret.yaml": "its keyless placeholder would overwrite the real hsd-api-keys"}
KEYS_SECRET = "hsd-api-keys"  # what kustomization's secretGenerator makes
KEYS_FILE = "k8s/api-keys"  # the generator's source, created by the operator, git-ignored
MODEL_DEPLOYMENTS = ("target_deployment", "drafter_deployment")
# Only these may autoscale to zero replicas (hsd_serve.serve.config refuses it for the others).
MAY_SCALE_TO_ZERO = {"drafter_deployment"}
# How often handles and replicas push ongoing-request counts to the Serve controller (Ray's
# default 10 s); every Ray pod sets both, to one value <= every metrics_interval_s.
PUSH_INTERVAL_ENVS = ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                      "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S")
HANDLE_PUSH, REPLICA_PUSH = PUSH_INTERVAL_ENVS
RAY_METRICS_INTERVAL_S = 10.0  # Ray Serve's default autoscaling_config.metrics_interval_s


def _load_sync():
    spec = importlib.util.spec_from_file_location("k8s_sync", K8S / "sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sync = _load_sync()


# ------------------------------------------------------------------ validators


def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as JSON Schema: objects that list ``properties``
    reject other fields (what ``kubectl apply``'s strict field validation does), unless they
    say ``x-kubernetes-preserve-unknown-fields``; int-or-string and nullable are spelled out."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and \
            not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def load_crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """{(apiVersion, kind): validator} for every CRD kept in tests/data/k8s."""
    out = {}
    for name in CRDS:
        crd = yaml.safe_load((DATA / name).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
            jsonschema.Draft7Validator.check_schema(schema)
            out[(f"{group}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


CRD_VALIDATORS = load_crd_validators()


def _where(err: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in err.absolute_path) or "(root)"


def core_errors(doc: dict, what: str) -> list[str]:
    import kubernetes_validate as kv

    try:
        kv.validate(doc, KUBE_VERSION, strict=True)
    except kv.ValidationError as exc:
        first = str(exc).splitlines()[0]
        return [f"{what}: {first}"]
    except kv.SchemaNotFoundError:
        return [f"{what}: no schema for {doc.get('apiVersion')}/{doc.get('kind')}"]
    return []


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    cluster = doc["spec"].get("rayClusterConfig") or {}
    out = [("headGroupSpec", (cluster.get("headGroupSpec") or {}).get("template"))]
    out += [(f"workerGroupSpecs[{g.get('groupName')}]", g.get("template"))
            for g in cluster.get("workerGroupSpecs") or []]
    return [(w, t) for w, t in out if t is not None]


def manifest_errors(doc: Any) -> list[str]:
    """Schema errors of one manifest document (empty: valid)."""
    if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
        return ["not a Kubernetes object (apiVersion, kind, metadata)"]
    what = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name')}"
    key = (doc["apiVersion"], doc["kind"])
    if key not in CRD_VALIDATORS:
        return core_errors(doc, what)
    errors = [f"{what}: {_where(e)}: {e.message}"
              for e in sorted(CRD_VALIDATORS[key].iter_errors(doc), key=str)]
    if doc["kind"] == "RayService" and not errors:
        for where, template in pod_templates(doc):
            errors += core_errors({"apiVersion": "v1", "kind": "PodTemplate",
                                   "metadata": {"name": "t"}, "template": template},
                                  f"{what} {where}.template")
    return errors


def serve_config_errors(doc: dict, serve_config: dict) -> list[str]:
    """The RayService's serveConfigV2 is serve_config.yaml + sync.py's overrides, and valid."""
    from ray.serve.schema import ServeDeploySchema

    from hsd_serve.serve.config import load_config

    try:
        embedded = sync.embedded_serve_config(doc)
    except yaml.YAMLError as exc:
        return [f"serveConfigV2 does not parse: {exc}"]
    errors = []
    want = sync.gpu_serve_config(serve_config)
    if embedded != want:
        errors.append("serveConfigV2 differs from serve_config.yaml + the overrides of sync.py at "
                      f"{sorted(_diff_paths(embedded, want))}; run `python k8s/sync.py`")
    try:
        ServeDeploySchema.parse_obj(embedded)
        for app in embedded.get("applications", []):
            load_config(app.get("args"))
    except Exception as exc:  # noqa: BLE001 - reported
        errors.append(f"serveConfigV2 invalid: {str(exc).splitlines()[0]}")
    return errors


def _diff_paths(a: Any, b: Any, path: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff_paths(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return set().union(*[_diff_paths(x, y, f"{path}[{i}]")
                             for i, (x, y) in enumerate(zip(a, b))]) if a else set()
    return set() if a == b else {path or "."}


def _app_args(serve_cfg: dict) -> dict:
    return next(a for a in serve_cfg["applications"]
                if a["import_path"] == sync.APP_IMPORT_PATH)["args"]


def _group_resources(group: dict) -> dict[str, float]:
    """A worker group's custom resources (rayStartParams.resources: a quoted JSON object)."""
    raw = (group.get("rayStartParams") or {}).get("resources", '"{}"')
    return json.loads(json.loads(raw))


def _group_gpus(group: dict) -> int:
    """GPUs per pod of a worker group (its containers' nvidia.com/gpu limits)."""
    return max(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in group["template"]["spec"]["containers"])


def placement_errors(doc: dict) -> list[str]:
    """Each model deployment's custom resource is advertised by exactly one worker group with
    enough GPUs; the head advertises none (autoscaling_errors: the group's size)."""
    errors = []
    args = _app_args(sync.embedded_serve_config(doc))
    cluster = doc["spec"]["rayClusterConfig"]
    if cluster.get("enableInTreeAutoscaling") is not True:
        errors.append("enableInTreeAutoscaling is not true")
    head = cluster["headGroupSpec"].get("rayStartParams") or {}
    if "resources" in head or head.get("num-gpus", "0") != "0":
        errors.append("the head group advertises model resources")
    groups = {g["groupName"]: (_group_resources(g), g)
              for g in cluster.get("workerGroupSpecs") or []}
    for dep in MODEL_DEPLOYMENTS:
        opts = args[dep]
        for res, amount in (opts.get("resources") or {}).items():
            having = [n for n, (r, _) in groups.items() if r.get(res, 0) >= amount]
            if len(having) != 1:
                errors.append(f"{dep}: resource {res} is offered by groups {having}, want one")
                continue
            gpus = _group_gpus(groups[having[0]][1])
            if gpus < opts.get("num_gpus", 0):
                errors.append(f"{dep}: needs {opts.get('num_gpus')} GPU, group {having[0]} "
                              f"has {gpus}")
        if not opts.get("resources"):
            errors.append(f"{dep}: no custom resource pins it to a worker group")
    return errors


def _replica_bounds(opts: dict) -> tuple[int, int]:
    """(min, max) replicas of a deployment: its autoscaling bounds, else num_replicas."""
    auto = opts.get("autoscaling_config")
    if auto:
        return auto.get("min_replicas", 1), auto.get("max_replicas", 1)
    n = opts.get("num_replicas", 1)
    return n, n


def autoscaling_errors(doc: dict) -> list[str]:
    """Replica autoscaling (Serve) fits node autoscaling (the Ray autoscaler, in the worker
    groups): the group that advertises a model deployment's custom resource has room for its
    max_replicas (pods needed = ceil(max_replicas / replicas per pod), a pod holding
    floor(GPUs / num_gpus) and floor(resource / amount) replicas); it keeps no pod (minReplicas
    0) exactly when the deployment may have no replica (min_replicas 0, so that the GPUs are
    freed), and only the drafter may; every Ray pod's Ray container (the first, as KubeRay
    takes it) sets both metric push intervals, to one value <= every metrics_interval_s (the
    controller would decide on stale counts)."""
    args = _app_args(sync.embedded_serve_config(doc))
    cluster = doc["spec"]["rayClusterConfig"]
    groups = cluster.get("workerGroupSpecs") or []
    errors, intervals = [], {}
    for dep in MODEL_DEPLOYMENTS:
        opts = args.get(dep) or {}
        lo, hi = _replica_bounds(opts)
        if opts.get("autoscaling_config"):
            intervals[dep] = opts["autoscaling_config"].get("metrics_interval_s",
                                                           RAY_METRICS_INTERVAL_S)
        if lo < 1 and dep not in MAY_SCALE_TO_ZERO:
            errors.append(f"{dep}: autoscaling min_replicas {lo}; only "
                          f"{sorted(MAY_SCALE_TO_ZERO)} may scale to zero")
        res = opts.get("resources") or {}
        having = [g for g in groups if res and
                  all(_group_resources(g).get(r, 0) >= a for r, a in res.items())]
        if len(having) != 1:
            continue  # placement_errors says so
        g, name = having[0], having[0]["groupName"]
        per_pod = [int(_group_resources(g)[r] // a) for r, a in res.items()]
        if opts.get("num_gpus"):
            per_pod.append(int(_group_gpus(g) // opts["num_gpus"]))
        if min(per_pod) < 1:
            continue  # placement_errors: not enough GPUs on a pod
        need = math.ceil(hi / min(per_pod))
        if g.get("maxReplicas", 0) < need:
            errors.append(f"{dep}: up to {hi} replicas ({min(per_pod)} a pod) need {need} pods "
                          f"of group {name}, whose maxReplicas is {g.get('maxReplicas')}")
        keeps = g.get("minReplicas", 0)
        if lo == 0 and keeps > 0:
            errors.append(f"{dep}: scales to zero replicas but group {name} keeps minReplicas "
                          f"{keeps} pods: their GPUs are never freed; want minReplicas 0")
        if lo > 0 and keeps == 0:
            errors.append(f"{dep}: keeps min_replicas {lo} but group {name} has minReplicas 0: "
                          f"want minReplicas >= 1 (only a deployment that scales to zero may "
                          f"leave its group empty)")
    values = {}
    for where, t in pod_templates(doc):
        c = t["spec"]["containers"][0]
        env = {e.get("name"): e.get("value") for e in c.get("env") or []}
        for var in PUSH_INTERVAL_ENVS:
            if var not in env:
                errors.append(f"{where} container {c['name']}: no {var} (Ray's default 10 s "
                              "is slower than the autoscaling decisions)")
                continue
            try:
                values[(where, var)] = float(env[var])
            except (TypeError, ValueError):
                errors.append(f"{where} container {c['name']}: {var} {env[var]!r} is not a "
                              "number of seconds")
    if len(set(values.values())) > 1:
        by_value: dict[float, list[str]] = {}
        for (where, var), x in values.items():
            by_value.setdefault(x, []).append(f"{where} {var.split('_')[2]}")
        errors.append("autoscaling metric push intervals differ: " + "; ".join(
            f"{x:g} s on {len(w)}" + (f" ({', '.join(w)})" if len(w) < len(values) / 2 else "")
            for x, w in sorted(by_value.items())))
    for dep, every in intervals.items():
        slow = sorted({x for x in values.values() if x > every})
        if slow:
            errors.append(f"{dep}: metrics_interval_s {every:g} < metric push interval "
                          f"{slow[-1]:g} s (decisions on stale counts)")
    return errors


def selector_errors(docs: list[dict]) -> list[str]:
    """Services and PodMonitors select pods the RayService creates, on ports they declare."""
    rs = next(d for d in docs if d["kind"] == "RayService")
    templates = [t for _, t in pod_templates(rs)]
    kuberay_labels = {"ray.io/serve": "true"}  # set by KubeRay on pods ready to serve
    errors = []
    for d in docs:
        if d["kind"] == "Service":
            sel = dict(d["spec"].get("selector") or {})
            hit = [t for t in templates
                   if {**t["metadata"].get("labels", {}), **kuberay_labels}.items() >=
                   sel.items()]
            if not hit:
                errors.append(f"Service/{d['metadata']['name']}: selector {sel} matches no pod")
            names = {p.get("name") for t in hit for c in t["spec"]["containers"]
                     for p in c.get("ports", [])}
            for p in d["spec"]["ports"]:
                if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                    errors.append(f"Service/{d['metadata']['name']}: targetPort "
                                  f"{p['targetPort']} is not a container port of its pods")
        if d["kind"] == "PodMonitor":
            sel = d["spec"]["selector"].get("matchLabels", {})
            for t in templates:
                if not t["metadata"].get("labels", {}).items() >= sel.items():
                    errors.append(f"PodMonitor/{d['metadata']['name']}: misses a Ray pod")
                ports = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
                for ep in d["spec"].get("podMetricsEndpoints", []):
                    if ep.get("port") not in ports:
                        errors.append(f"PodMonitor: port {ep.get('port')} missing on a Ray pod")
    return errors


def _labels(template: dict) -> dict:
    return (template.get("metadata") or {}).get("labels") or {}


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels only; matchExpressions is not used here) matches labels."""
    return "matchExpressions" not in selector and \
        (selector.get("matchLabels") or {}).items() <= labels.items()


def security_errors(docs: list[dict]) -> list[str]:
    """HTTP listens beyond loopback; every Ray pod mounts the API keys Secret read-only at
    sync.API_KEYS_MOUNT, readable by the ray user; security.api_keys_file is a file of that
    mount; the Secret exists, has the key the volume names, and holds no usable key in git."""
    from hsd_serve.serve.security import parse_keys

    rs = next(d for d in docs if d["kind"] == "RayService")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    cfg = sync.embedded_serve_config(rs)
    errors = []
    host = (cfg.get("http_options") or {}).get("host")
    if host != "0.0.0.0":
        errors.append(f"serveConfigV2 http_options.host is {host!r}: the Services cannot reach "
                      "the proxies; want 0.0.0.0")
    keys_file = (_app_args(cfg).get("security") or {}).get("api_keys_file")
    if not keys_file:
        errors.append("serveConfigV2: security.api_keys_file is unset (the APIs are open)")
    for name, secret in secrets.items():
        for key, value in (secret.get("stringData") or {}).items():
            if parse_keys(value, f"Secret/{name} {key}"):
                errors.append(f"Secret/{name}: {key} holds a usable key; keep real keys out of "
                              "git and the placeholder a comment")
        if secret.get("data"):
            errors.append(f"Secret/{name}: data in git; keep real keys out of it")
    for where, t in pod_templates(rs):
        spec = t["spec"]
        vol = next((v for v in spec.get("volumes") or [] if v.get("name") == KEYS_VOLUME), {})
        src = vol.get("secret")
        if not src:
            errors.append(f"{where}: no volume {KEYS_VOLUME} from a Secret")
            continue
        name = src.get("secretName")
        if name not in secrets:
            errors.append(f"{where}: volume {KEYS_VOLUME} refers to Secret {name}, which k8s/ "
                          "does not define")
            continue
        data = {**(secrets[name].get("data") or {}), **(secrets[name].get("stringData") or {})}
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        errors += [f"{where}: Secret/{name} has no key {it.get('key')}"
                   for it in items if it.get("key") not in data]
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        for it in items:
            mode = it.get("mode", src.get("defaultMode", 0o644))
            if not (mode & 0o004 or (mode & 0o040 and fs_group is not None)):
                errors.append(f"{where}: {KEYS_VOLUME} file mode {mode:o} (fsGroup {fs_group}): "
                              "the ray user cannot read it")
        files = {it.get("path") for it in items if it.get("key") in data}
        for c in spec["containers"]:
            mount = next((m for m in c.get("volumeMounts") or [] if m["name"] == KEYS_VOLUME),
                         None)
            if mount is None:
                errors.append(f"{where} container {c['name']}: does not mount {KEYS_VOLUME}")
                continue
            if mount.get("mountPath") != sync.API_KEYS_MOUNT:
                errors.append(f"{where} container {c['name']}: {KEYS_VOLUME} mounted at "
                              f"{mount.get('mountPath')}, want {sync.API_KEYS_MOUNT}")
            if not mount.get("readOnly"):
                errors.append(f"{where} container {c['name']}: {KEYS_VOLUME} mounted writable")
            if mount.get("subPath") or mount.get("subPathExpr"):
                errors.append(f"{where} container {c['name']}: {KEYS_VOLUME} mounted by subPath "
                              "(Kubernetes would not update the keys)")
            paths = {f"{mount.get('mountPath', '').rstrip('/')}/{f}" for f in files}
            if keys_file and keys_file not in paths:
                errors.append(f"{where} container {c['name']}: security.api_keys_file "
                              f"{keys_file} is none of the {KEYS_VOLUME} files {sorted(paths)}")
    return errors


def _port_allowed(rule: dict, number: int, name: str | None) -> bool:
    ports = rule.get("ports") or []
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        port = p.get("port")
        if port is None or port == number or (name is not None and port == name) or \
                (isinstance(port, int) and isinstance(number, int) and
                 port <= number <= p.get("endPort", port)):
            return True
    return False


def networkpolicy_errors(docs: list[dict]) -> list[str]:
    """The NetworkPolicies select Ray pods and, on each Ray pod, allow every port from the pods
    of the same Ray cluster, the Services' ports from anywhere, the PodMonitor's port from a
    namespace (Prometheus'), and the head's dashboard to the KubeRay operator."""
    rs = next(d for d in docs if d["kind"] == "RayService")
    templates = pod_templates(rs)
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not pols:
        return ["no NetworkPolicy"]
    errors = []
    for pol in pols:
        what = f"NetworkPolicy/{pol['metadata']['name']}"
        if not any(_selects(pol["spec"]["podSelector"], _labels(t)) for _, t in templates):
            errors.append(f"{what}: podSelector {pol['spec']['podSelector']} selects no Ray pod")
        if "Ingress" not in (pol["spec"].get("policyTypes") or ["Ingress"]):
            errors.append(f"{what}: policyTypes without Ingress")

    def same_cluster(peer: dict) -> bool:  # this namespace, and every Ray pod
        return set(peer) == {"podSelector"} and \
            all(_selects(peer["podSelector"], _labels(t)) for _, t in templates)

    common = set.intersection(*[set(_labels(t).items()) for _, t in templates])

    def within_cluster(peer: dict) -> bool:  # this namespace, only pods with the Ray pods' label
        return set(peer) == {"podSelector"} and bool(
            common & set((peer["podSelector"].get("matchLabels") or {}).items()))

    service_ports = []  # (Service selector, targetPort)
    for d in docs:
        if d["kind"] == "Service":
            service_ports += [(d["spec"].get("selector") or {}, p.get("targetPort", p["port"]))
                              for p in d["spec"]["ports"]]
    monitor_ports = [ep.get("port") for d in docs if d["kind"] == "PodMonitor"
                     for ep in d["spec"].get("podMetricsEndpoints", [])]
    for where, t in templates:
        rules = [r for pol in pols if _selects(pol["spec"]["podSelector"], _labels(t))
                 for r in pol["spec"].get("ingress") or []]
        if not rules:
            errors.append(f"{where}: no NetworkPolicy selects it")
            continue
        cports = {p["name"]: p["containerPort"] for c in t["spec"]["containers"]
                  for p in c.get("ports", []) if "name" in p}
        numbers = {v: k for k, v in cports.items()}

        def allowed(port, peer_ok) -> bool:
            number = cports.get(port, port)
            return any(_port_allowed(r, number, numbers.get(number)) and
                       (peer_ok(r.get("from") or []))
                       for r in rules)

        if not any(not r.get("ports") and any(same_cluster(p) for p in r.get("from") or [])
                   for r in rules):
            errors.append(f"{where}: NetworkPolicy does not allow every port from the pods of "
                          "its own Ray cluster (Ray's ports, the data plane)")
        if any(not r.get("ports") and not all(within_cluster(p) for p in r.get("from") or [{}])
               for r in rules):
            errors.append(f"{where}: NetworkPolicy opens every port (Ray's, the data plane) "
                          "beyond the pods of its own Ray cluster")
        labels = {**_labels(t), "ray.io/serve": "true"}
        for sel, port in service_ports:
            if sel.items() <= labels.items() and not allowed(port, lambda peers: not peers):
                errors.append(f"{where}: NetworkPolicy blocks client port {port} "
                              f"({cports.get(port, port)})")
        for port in monitor_ports:
            if not allowed(port, lambda peers: not peers or
                           any("namespaceSelector" in p for p in peers)):
                errors.append(f"{where}: NetworkPolicy keeps Prometheus from port {port}")
        if where == "headGroupSpec" and "dashboard" in cports and \
                not allowed("dashboard", lambda peers: not peers or
                            any("namespaceSelector" in p for p in peers)):
            errors.append(f"{where}: NetworkPolicy keeps the KubeRay operator from the dashboard")
    return errors


def dashboard_errors(dash: dict) -> list[str]:
    errors = []
    panels = dash.get("panels") or []
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        errors.append("panel ids are not unique")
    titles = " | ".join(p.get("title", "") for p in panels).lower()
    for need in ("acceptance rate", "tokens per round", "time to first token",
                 "time per output token", "draft vs verify", "fallback", "replicas per deployment"):
        if need not in titles:
            errors.append(f"no panel about {need!r}")
    exposed = {}
    for m in M.METRICS.values():
        base = m.exposed(ray=True)
        for name in ([base + s for s in ("_bucket", "_count", "_sum")]
                     if m.kind == "histogram" else [base]):
            exposed[name] = m
    for p in panels:
        if not p.get("targets") or "gridPos" not in p:
            errors.append(f"panel {p.get('title')!r} has no targets or gridPos")
        for t in p.get("targets", []):
            for name in re.findall(r"\b(ray_hsd_[a-z0-9_]+)\b", t.get("expr", "")):
                if name not in exposed:
                    errors.append(f"panel {p.get('title')!r}: unknown metric {name}")
            if "histogram_quantile" in t.get("expr", "") and "_bucket" not in t["expr"]:
                errors.append(f"panel {p.get('title')!r}: quantile without _bucket")
    return errors


def _generator_keys(gen: dict) -> dict[str, str]:
    """{key: source file} of a kustomize generator's ``files`` (``key=path`` or ``path``)."""
    out = {}
    for f in gen.get("files") or []:
        key, _, src = f.partition("=") if "=" in f else (f.rsplit("/", 1)[-1], "", f)
        out[key] = src
    return out


def secret_generator_errors(k: dict, rs: dict) -> list[str]:
    """kustomization generates the API keys Secret from a file (so `kubectl apply -k` fails
    without it and never applies a placeholder) under a fixed name, the one every Ray pod's
    keys volume refers to, with every key the volumes take."""
    gens = [g for g in k.get("secretGenerator") or [] if g.get("name") == KEYS_SECRET]
    if len(gens) != 1:
        return [f"kustomization.yaml: want one secretGenerator {KEYS_SECRET}, found {len(gens)}"]
    gen, errors = gens[0], []
    keys = _generator_keys(gen)
    if (gen.get("type") or "Opaque") != "Opaque":
        errors.append(f"kustomization.yaml: secretGenerator {KEYS_SECRET} type {gen['type']}, "
                      "want Opaque")
    if gen.get("literals") or gen.get("envs") or gen.get("env"):
        errors.append(f"kustomization.yaml: secretGenerator {KEYS_SECRET} takes keys from "
                      "literals or env files (keys in git); use files only")
    if keys != {"keys": KEYS_FILE.split("/", 1)[1]}:
        errors.append(f"kustomization.yaml: secretGenerator {KEYS_SECRET} files {keys}, want "
                      f"key keys from {KEYS_FILE.split('/', 1)[1]}")
    if (gen.get("options") or {}).get("disableNameSuffixHash") is not True:
        errors.append(f"kustomization.yaml: secretGenerator {KEYS_SECRET} without "
                      "options.disableNameSuffixHash: true (the RayService names it as is)")
    for where, t in pod_templates(rs):
        vol = next((v for v in t["spec"].get("volumes") or [] if v.get("name") == KEYS_VOLUME),
                   {})
        src = vol.get("secret") or {}
        if src.get("secretName") != gen.get("name"):
            errors.append(f"{where}: volume {KEYS_VOLUME} refers to Secret "
                          f"{src.get('secretName')}, not the generated {gen.get('name')}")
        errors += [f"{where}: volume {KEYS_VOLUME} takes key {it.get('key')}, which "
                   f"secretGenerator {KEYS_SECRET} does not make"
                   for it in src.get("items") or [] if it.get("key") not in keys]
    return errors


def gitignore_errors(gitignore_text: str) -> list[str]:
    """The generator's source of real keys is git-ignored."""
    lines = {ln.strip() for ln in gitignore_text.splitlines()}
    if not {KEYS_FILE, "/" + KEYS_FILE} & lines:
        return [f".gitignore does not list {KEYS_FILE} (real keys would end up in git)"]
    return []


def _is_object(doc: Any) -> bool:
    return isinstance(doc, dict) and {"apiVersion", "kind"} <= set(doc)


def all_errors(files: dict[str, str], serve_config_text: str) -> list[str]:
    """Every check over the k8s/ file contents (name -> text); empty when all pass."""
    errors, docs, parsed = [], [], {}
    for name, text in sorted(files.items()):
        if name.endswith(".json"):
            try:
                errors += [f"{name}: {e}" for e in dashboard_errors(json.loads(text))]
            except json.JSONDecodeError as exc:
                errors.append(f"{name}: does not parse: {exc}")
            continue
        try:
            parsed[name] = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            errors.append(f"{name}: does not parse: {str(exc).splitlines()[0]}")
    k = (parsed.pop("kustomization.yaml", None) or [{}])[0]
    listed = list(k.get("resources", [])) + [f for g in k.get("configMapGenerator", [])
                                              for f in g.get("files", [])]
    errors += [f"kustomization.yaml: lists missing {f}" for f in listed if f not in files]
    errors += [f"kustomization.yaml: lists {f}, a template: {why}"
               for f, why in TEMPLATES.items() if f in listed]
    for name, loaded in parsed.items():
        # a file of Kubernetes objects is a manifest: kustomization must apply it (templates
        # excepted, checked all the same); any other YAML (a patch, values) is not checked here
        # unless kustomization lists it as a resource
        if name not in listed and name not in TEMPLATES and any(_is_object(d) for d in loaded):
            errors.append(f"kustomization.yaml: does not list {name}")
        if name not in listed and name not in TEMPLATES and \
                not any(_is_object(d) for d in loaded):
            continue
        for d in loaded:
            errors += [f"{name}: {e}" for e in manifest_errors(d)]
            docs.append(d)
    if errors:
        return errors
    rs = [d for d in docs if d["kind"] == "RayService"]
    if len(rs) != 1:
        return [f"want one RayService, found {len(rs)}"]
    errors += serve_config_errors(rs[0], yaml.safe_load(serve_config_text))
    errors += secret_generator_errors(k, rs[0])
    errors += placement_errors(rs[0])
    errors += autoscaling_errors(rs[0])
    errors += selector_errors(docs)
    errors += security_errors(docs)
    errors += networkpolicy_errors(docs)
    for kind in ("Service", "PodMonitor", "Secret"):
        if not any(d["kind"] == kind for d in docs):
            errors.append(f"no {kind}")
    ports = {p["port"] for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]}
    if not {8000, 9000} <= ports:
        errors.append(f"Services expose ports {sorted(ports)}, want 8000 (HTTP) and 9000 (gRPC)")
    return errors


def _files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(K8S.iterdir())
            if p.suffix in (".yaml", ".yml", ".json")}


SERVE_CONFIG_TEXT = (ROOT / "serve_config.yaml").read_text()
GITIGNORE_TEXT = (ROOT / ".gitignore").read_text()


# ------------------------------------------------------------------ the real manifests


def test_k8s_manifests_pass_every_check():
    files = _files()
    assert {"rayservice.yaml", "services.yaml", "podmonitor.yaml", "grafana-dashboard.json",
            "kustomization.yaml", "secret.yaml", "networkpolicy.yaml"} <= set(files)
    assert all_errors(files, SERVE_CONFIG_TEXT) == []


def test_the_keys_file_is_git_ignored():
    assert gitignore_errors(GITIGNORE_TEXT) == []
    broken = "\n".join(ln for ln in GITIGNORE_TEXT.splitlines() if ln.strip() != KEYS_FILE)
    assert any(KEYS_FILE in e for e in gitignore_errors(broken))


def test_sync_script_reports_no_drift(capsys):
    assert sync.main(["--check"]) == 0
    assert "matches" in capsys.readouterr().out


def test_the_overrides_are_the_only_differences():
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    embedded = sync.embedded_serve_config(rs)
    base = yaml.safe_load(SERVE_CONFIG_TEXT)
    diff = _diff_paths(embedded, base)
    app = next(i for i, a in enumerate(base["applications"])
               if a["import_path"] == sync.APP_IMPORT_PATH)
    allowed = {f".applications[{app}].args.{k}.{f}" for k, v in sync.GPU_OVERRIDES.items()
               for f in v}
    allowed |= {f".{k}.{f}" for k, v in sync.TOP_LEVEL_OVERRIDES.items() for f in v}
    assert diff and diff <= allowed | {p for p in diff for a in allowed if p.startswith(a + ".")}
    args = _app_args(embedded)
    assert embedded["http_options"]["host"] == "0.0.0.0"
    assert args["security"]["api_keys_file"] == sync.API_KEYS_FILE
    assert args["target"]["device"] == args["drafter"]["device"] == "cuda"
    assert args["target"]["dtype"] == args["drafter"]["dtype"] == "bfloat16"
    assert args["target_deployment"]["resources"] == {"target_node": 1}
    assert args["drafter_deployment"]["resources"] == {"drafter_node": 1}
    assert args["target_deployment"]["num_gpus"] == args["drafter_deployment"]["num_gpus"] == 1


def test_sync_rewrites_a_drifted_manifest(tmp_path):
    rs, sc = tmp_path / "rayservice.yaml", tmp_path / "serve_config.yaml"
    rs.write_text((K8S / "rayservice.yaml").read_text())
    sc.write_text(SERVE_CONFIG_TEXT.replace("default_lookahead: 4", "default_lookahead: 6"))
    argv = ["--rayservice", str(rs), "--serve-config", str(sc)]
    assert sync.main(argv + ["--check"]) == 1
    assert sync.main(argv) == 0
    assert sync.main(argv + ["--check"]) == 0
    text = rs.read_text()
    assert "default_lookahead: 6" in text and text.count("serveConfigV2: |") == 1
    # everything outside the block is kept as written (comments included)
    assert text.split("serveConfigV2")[0] == \
        (K8S / "rayservice.yaml").read_text().split("serveConfigV2")[0]
    assert all_errors({**_files(), "rayservice.yaml": text}, sc.read_text()) == []


# ------------------------------------------------------------------ broken copies fail


def _yaml_edit(name: str, fn: Callable[[list[dict]], None]) -> Callable[[dict], dict]:
    def apply(files: dict) -> dict:
        docs = list(yaml.safe_load_all(files[name]))
        fn(docs)
        return {**files, name: yaml.safe_dump_all(docs, sort_keys=False)}
    return apply


def _rs(fn):
    return _yaml_edit("rayservice.yaml", lambda docs: fn(docs[0]))


def _cluster(d):
    return d["spec"]["rayClusterConfig"]


def _set_args(d, key, value):
    cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
    _app_args(cfg)[key] = value
    d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def _set_target_dtype(d):
    cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
    _app_args(cfg)["target"]["dtype"] = "float16"
    d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def _swap_group_resources(d):
    a, b = _cluster(d)["workerGroupSpecs"][:2]
    a["rayStartParams"]["resources"], b["rayStartParams"]["resources"] = \
        b["rayStartParams"]["resources"], a["rayStartParams"]["resources"]
    a["rayStartParams"]["resources"] = '"{}"'


def _set_security(d, **kw):
    cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
    _app_args(cfg)["security"].update(kw)
    d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def _set_http_host(d, host):
    cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
    cfg["http_options"]["host"] = host
    d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def _template(d, group=None):
    c = _cluster(d)
    return c["headGroupSpec"]["template"] if group is None else \
        next(g for g in c["workerGroupSpecs"] if g["groupName"] == group)["template"]


def _keys_volume(d, group=None):
    return next(v for v in _template(d, group)["spec"]["volumes"] if v["name"] == KEYS_VOLUME)


def _drop_keys_mount(d, group=None):
    c = _template(d, group)["spec"]["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != KEYS_VOLUME]


def _drop_keys_volume(d, group):
    spec = _template(d, group)["spec"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != KEYS_VOLUME]


def _keys_mount(d, group=None):
    c = _template(d, group)["spec"]["containers"][0]
    return next(m for m in c["volumeMounts"] if m["name"] == KEYS_VOLUME)


def _netpol(name, fn):
    def edit(docs):
        fn(next(d for d in docs if d["metadata"]["name"] == name)["spec"])
    return _yaml_edit("networkpolicy.yaml", edit)


def _drop_port(spec, port):
    for r in spec["ingress"]:
        if r.get("ports"):
            r["ports"] = [p for p in r["ports"] if p.get("port") != port] or \
                [{"protocol": "UDP", "port": 53}]


def _with_secret_template(name, edit):
    """edit, with a second Secret template named name (so only the generator check fails)."""
    def apply(files: dict) -> dict:
        extra = files["secret.yaml"].split("\napiVersion:", 1)[1].replace(
            "name: hsd-api-keys", f"name: {name}")
        return edit({**files, "secret.yaml": f"{files['secret.yaml']}---\napiVersion:{extra}"})
    return apply


def _group(d, name):
    return next(g for g in _cluster(d)["workerGroupSpecs"] if g["groupName"] == name)


def _set_autoscaling(d, dep, **kw):
    cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
    _app_args(cfg)[dep]["autoscaling_config"].update(kw)
    d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def _ray_env(d, group=None):
    return _template(d, group)["spec"]["containers"][0]["env"]


def _drop_env(d, var, group=None):
    c = _template(d, group)["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] != var]


def _set_env(d, var, value, groups=(None, "target-gpu", "drafter-gpu")):
    for g in groups:
        next(e for e in _ray_env(d, g) if e["name"] == var)["value"] = value


def _take_key(d, key):
    for _, t in pod_templates(d):
        vol = next(v for v in t["spec"]["volumes"] if v["name"] == KEYS_VOLUME)
        vol["secret"]["items"][0]["key"] = key


BROKEN = {
    "yaml syntax": (lambda f: {**f, "services.yaml": f["services.yaml"] + "\n  bad: [unclosed\n"},
                    "does not parse"),
    "rayStartParams value not a string": (
        _rs(lambda d: _cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 4})),
        "is not of type 'string'"),
    "no headGroupSpec": (_rs(lambda d: _cluster(d).pop("headGroupSpec")),
                         "'headGroupSpec' is a required property"),
    "unknown RayService field": (
        _rs(lambda d: _cluster(d).update({"enableInTreeAutoscalling": True})),
        "Additional properties are not allowed"),
    "bad upgrade strategy": (_rs(lambda d: d["spec"]["upgradeStrategy"].update(type="Rolling")),
                             "is not one of"),
    "worker group without maxReplicas": (
        _rs(lambda d: _cluster(d)["workerGroupSpecs"][0].pop("maxReplicas")),
        "'maxReplicas' is a required property"),
    "pod template container without a name": (
        _rs(lambda d: _cluster(d)["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
            .pop("name")),
        "'name' is a required property"),
    "pod template with an unknown field": (
        _rs(lambda d: _cluster(d)["headGroupSpec"]["template"]["spec"].update(nodeSelecter={})),
        "headGroupSpec.template"),
    "serve config drifted": (_rs(_set_target_dtype), "differs from serve_config.yaml"),
    "serve config with an unknown arg": (_rs(lambda d: _set_args(d, "lookahed", 3)),
                                         "serveConfigV2 invalid"),
    "model resource on no group": (_rs(_swap_group_resources), "want one"),
    "autoscaling off": (_rs(lambda d: _cluster(d).update(enableInTreeAutoscaling=False)),
                        "enableInTreeAutoscaling"),
    # ---- autoscaling: Serve's replicas within the worker groups' pods
    "target group too small for max_replicas": (
        _rs(lambda d: _group(d, "target-gpu").update(maxReplicas=3)),
        "target_deployment: up to 4 replicas (1 a pod) need 4 pods of group target-gpu, whose "
        "maxReplicas is 3"),
    "drafter max_replicas beyond its group": (
        _rs(lambda d: _set_autoscaling(d, "drafter_deployment", max_replicas=6)),
        "drafter_deployment: up to 6 replicas (1 a pod) need 6 pods"),
    "drafter group keeps a pod while drafters scale to zero": (
        _rs(lambda d: _group(d, "drafter-gpu").update(minReplicas=1, replicas=1)),
        "group drafter-gpu keeps minReplicas 1 pods: their GPUs are never freed"),
    "drafters keep a replica in an empty group": (
        _rs(lambda d: _set_autoscaling(d, "drafter_deployment", min_replicas=1)),
        "drafter_deployment: keeps min_replicas 1 but group drafter-gpu has minReplicas 0"),
    "target group may be empty": (
        _rs(lambda d: _group(d, "target-gpu").update(minReplicas=0, replicas=0)),
        "target_deployment: keeps min_replicas 1 but group target-gpu has minReplicas 0"),
    "target scales to zero": (
        _rs(lambda d: (_set_autoscaling(d, "target_deployment", min_replicas=0),
                       _group(d, "target-gpu").update(minReplicas=0, replicas=0))),
        "target_deployment: autoscaling min_replicas 0; only ['drafter_deployment'] may"),
    "handle push interval missing on a worker group": (
        _rs(lambda d: _drop_env(d, HANDLE_PUSH, "drafter-gpu")),
        f"workerGroupSpecs[drafter-gpu] container ray-worker: no {HANDLE_PUSH}"),
    "replica push interval missing on the head": (
        _rs(lambda d: _drop_env(d, REPLICA_PUSH)),
        f"headGroupSpec container ray-head: no {REPLICA_PUSH}"),
    "push intervals differ": (
        _rs(lambda d: _set_env(d, REPLICA_PUSH, "1", groups=("target-gpu",))),
        "autoscaling metric push intervals differ"),
    "push interval slower than the decisions": (
        _rs(lambda d: [_set_env(d, v, "5") for v in PUSH_INTERVAL_ENVS]),
        "metrics_interval_s 2 < metric push interval 5 s"),
    "push interval not a number": (
        _rs(lambda d: [_set_env(d, v, "2s") for v in PUSH_INTERVAL_ENVS]),
        "'2s' is not a number of seconds"),
    "Service port not a number": (
        _yaml_edit("services.yaml", lambda docs: docs[1]["spec"]["ports"][0].update(port="grpc")),
        "is not of type 'integer'"),
    "Service unknown field": (
        _yaml_edit("services.yaml", lambda docs: docs[0]["spec"].update(selectr={})),
        "Service/hsd-http"),
    "Service selects no pod": (
        _yaml_edit("services.yaml", lambda docs: docs[0]["spec"]["selector"].update(
            {"app.kubernetes.io/component": "coordinator"})),
        "matches no pod"),
    "Service on a port the pods lack": (
        _yaml_edit("services.yaml", lambda docs: docs[1]["spec"]["ports"][0].update(
            targetPort="grpcs")),
        "not a container port"),
    "no gRPC Service": (_yaml_edit("services.yaml", lambda docs: docs.pop(1)), "9000"),
    "PodMonitor bad interval": (
        _yaml_edit("podmonitor.yaml",
                   lambda docs: docs[0]["spec"]["podMetricsEndpoints"][0].update(
                       interval="15 seconds")),
        "does not match"),
    "PodMonitor without selector": (
        _yaml_edit("podmonitor.yaml", lambda docs: docs[0]["spec"].pop("selector")),
        "'selector' is a required property"),
    "dashboard metric misspelt": (
        lambda f: {**f, "grafana-dashboard.json": f["grafana-dashboard.json"].replace(
            "ray_hsd_accepted_tokens_total", "ray_hsd_acepted_tokens_total")},
        "unknown metric ray_hsd_acepted_tokens_total"),
    "dashboard without a fallback panel": (
        lambda f: {**f, "grafana-dashboard.json": f["grafana-dashboard.json"].replace(
            "Fallbacks to target-only", "Other")},
        "fallback"),
    # ---- API keys: the Secret, its mounts, the serve config
    "HTTP on loopback in the pods": (_rs(lambda d: _set_http_host(d, "127.0.0.1")),
                                     "http_options.host is '127.0.0.1'"),
    "keys file outside the mount": (
        _rs(lambda d: _set_security(d, api_keys_file="/etc/hsd/keys")),
        "security.api_keys_file /etc/hsd/keys is none of"),
    "no keys file": (_rs(lambda d: _set_security(d, api_keys_file=None)),
                     "api_keys_file is unset"),
    "head without the keys mount": (_rs(_drop_keys_mount), "does not mount hsd-api-keys"),
    "worker group without the keys volume": (
        _rs(lambda d: _drop_keys_volume(d, "drafter-gpu")),
        "workerGroupSpecs[drafter-gpu]: no volume hsd-api-keys"),
    "keys mounted elsewhere": (
        _rs(lambda d: _keys_mount(d, "target-gpu").update(mountPath="/keys")),
        "mounted at /keys"),
    "keys mounted writable": (_rs(lambda d: _keys_mount(d).pop("readOnly")), "mounted writable"),
    "keys mounted by subPath": (
        _rs(lambda d: _keys_mount(d).update(subPath="keys")), "subPath"),
    "keys unreadable by ray": (
        _rs(lambda d: _keys_volume(d)["secret"].update(defaultMode=0o400)),
        "the ray user cannot read it"),
    "keys volume names another Secret": (
        _rs(lambda d: _keys_volume(d, "target-gpu")["secret"].update(secretName="api-keys")),
        "refers to Secret api-keys"),
    "Secret without the key": (
        _yaml_edit("secret.yaml", lambda docs: docs[0].update(
            stringData={"api-keys": docs[0]["stringData"]["keys"]})),
        "has no key keys"),
    "Secret in git holds a key": (
        _yaml_edit("secret.yaml", lambda docs: docs[0]["stringData"].update(
            keys="replace-me-with-a-long-random-key\n")),
        "holds a usable key"),
    "Secret in git with data": (
        _yaml_edit("secret.yaml", lambda docs: docs[0].update(data={"old": "a2V5"})),
        "data in git"),
    "Secret with an unknown field": (
        _yaml_edit("secret.yaml", lambda docs: docs[0].update(stringdata={})),
        "Secret/hsd-api-keys"),
    "no Secret template": (
        lambda f: {k: v for k, v in f.items() if k != "secret.yaml"},
        "which k8s/ does not define"),
    # ---- NetworkPolicy
    "NetworkPolicy with an unknown field": (
        _netpol("hsd-ray", lambda spec: spec["ingress"][0].update(frm=[])),
        "NetworkPolicy/hsd-ray"),
    "NetworkPolicy port not a port": (
        _netpol("hsd-head", lambda spec: spec["ingress"][0]["ports"][0].update(port=[8000])),
        "NetworkPolicy/hsd-head"),
    "NetworkPolicy for egress only": (
        _netpol("hsd-ray", lambda spec: spec.update(policyTypes=["Egress"])),
        "policyTypes without Ingress"),
    "NetworkPolicy selects other pods": (
        _netpol("hsd-ray", lambda spec: spec["podSelector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "hsd"})),
        "selects no Ray pod"),
    "NetworkPolicy without the same-cluster rule": (
        _netpol("hsd-ray", lambda spec: spec["ingress"].pop(0)), "its own Ray cluster"),
    "NetworkPolicy same-cluster rule for one group": (
        _netpol("hsd-ray", lambda spec: spec["ingress"][0]["from"][0]["podSelector"][
            "matchLabels"].update({"app.kubernetes.io/component": "head"})),
        "its own Ray cluster"),
    "NetworkPolicy opens every port to everyone": (
        _netpol("hsd-head", lambda spec: spec["ingress"].append({})), "opens every port"),
    "NetworkPolicy opens every port to a namespace": (
        _netpol("hsd-ray", lambda spec: spec["ingress"][1].pop("ports")), "opens every port"),
    "NetworkPolicy closes gRPC": (_netpol("hsd-head", lambda spec: _drop_port(spec, 9000)),
                                  "client port grpc (9000)"),
    "NetworkPolicy closes HTTP to outsiders": (
        _netpol("hsd-head", lambda spec: spec["ingress"][0].update(
            {"from": [{"podSelector": {}}]})),
        "client port serve (8000)"),
    "NetworkPolicy keeps Prometheus out": (
        _netpol("hsd-ray", lambda spec: _drop_port(spec, 8080)), "Prometheus"),
    "NetworkPolicy keeps the operator out": (
        _netpol("hsd-head", lambda spec: _drop_port(spec, 8265)), "KubeRay operator"),
    "no NetworkPolicy": (
        lambda f: {**{k: v for k, v in f.items() if k != "networkpolicy.yaml"},
                   "kustomization.yaml": f["kustomization.yaml"].replace(
                       "  - networkpolicy.yaml\n", "")},
        "no NetworkPolicy"),
    # ---- kustomization
    "kustomization omits a manifest": (
        lambda f: {**f, "kustomization.yaml": f["kustomization.yaml"].replace(
            "  - networkpolicy.yaml\n", "")},
        "does not list networkpolicy.yaml"),
    "kustomization omits a new manifest": (
        lambda f: {**f, "extra.yml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"},
        "does not list extra.yml"),
    "kustomization lists the Secret template": (
        _yaml_edit("kustomization.yaml", lambda docs: docs[0]["resources"].insert(
            0, "secret.yaml")),
        "lists secret.yaml, a template"),
    "kustomization without the Secret generator": (
        _yaml_edit("kustomization.yaml", lambda docs: docs[0].pop("secretGenerator")),
        "want one secretGenerator hsd-api-keys"),
    "Secret generator under another name": (
        _yaml_edit("kustomization.yaml", lambda docs: docs[0]["secretGenerator"][0].update(
            name="api-keys")),
        "want one secretGenerator hsd-api-keys"),
    "Secret generator with another file key": (
        _yaml_edit("kustomization.yaml", lambda docs: docs[0]["secretGenerator"][0].update(
            files=["api-keys"])),
        "want key keys from api-keys"),
    "Secret generator with a literal key": (
        _yaml_edit("kustomization.yaml", lambda docs: docs[0]["secretGenerator"][0].update(
            literals=["keys=0123456789abcdef"])),
        "literals or env files"),
    "Secret generator with a hash suffix": (
        _yaml_edit("kustomization.yaml", lambda docs: docs[0]["secretGenerator"][0][
            "options"].pop("disableNameSuffixHash")),
        "disableNameSuffixHash"),
    "Secret generator of another type": (
        _yaml_edit("kustomization.yaml", lambda docs: docs[0]["secretGenerator"][0].update(
            type="kubernetes.io/tls")),
        "want Opaque"),
    "worker group mounts a Secret the generator does not make": (
        _with_secret_template("hsd-keys", _rs(lambda d: _keys_volume(d, "drafter-gpu")[
            "secret"].update(secretName="hsd-keys"))),
        "workerGroupSpecs[drafter-gpu]: volume hsd-api-keys refers to Secret hsd-keys, not the "
        "generated hsd-api-keys"),
    "head mounts a Secret the generator does not make": (
        _with_secret_template("hsd-keys", _rs(lambda d: _keys_volume(d)["secret"].update(
            secretName="hsd-keys"))),
        "headGroupSpec: volume hsd-api-keys refers to Secret hsd-keys"),
    "keys volume takes a key the generator does not make": (
        lambda f: _rs(lambda d: _take_key(d, "token"))(_yaml_edit(
            "secret.yaml", lambda docs: docs[0]["stringData"].update(token="# none\n"))(f)),
        "which secretGenerator hsd-api-keys does not make"),
    "kustomization lists a missing file": (
        lambda f: {**f, "kustomization.yaml": f["kustomization.yaml"].replace(
            "podmonitor.yaml", "servicemonitor.yaml")},
        "missing servicemonitor.yaml"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_fails(case):
    files = _files()
    assert all_errors(files, SERVE_CONFIG_TEXT) == []
    mutate, expect = BROKEN[case]
    broken = mutate(copy.deepcopy(files))
    errors = all_errors(broken, SERVE_CONFIG_TEXT)
    assert errors, case
    assert any(expect in e for e in errors), errors


def test_autoscaling_values():
    """The intended scaling: targets 1-4 and drafters 0-4, each group sized to match."""
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    args = _app_args(sync.embedded_serve_config(rs))
    drafter = args["drafter_deployment"]["autoscaling_config"]
    target = args["target_deployment"]["autoscaling_config"]
    assert (drafter["min_replicas"], drafter["max_replicas"]) == (0, 4)
    assert (target["min_replicas"], target["max_replicas"]) == (1, 4)
    assert drafter["upscale_delay_s"] == 0 and drafter["downscale_to_zero_delay_s"] == 900
    assert drafter["target_ongoing_requests"] == target["target_ongoing_requests"] == 8
    assert (_group(rs, "drafter-gpu")["minReplicas"], _group(rs, "drafter-gpu")["replicas"]) == \
        (0, 0)
    assert _group(rs, "target-gpu")["minReplicas"] == 1
    assert _cluster(rs)["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_pods_needed_counts_replicas_per_pod():
    """Two-GPU drafter pods (advertising drafter_node 2) hold two one-GPU replicas each: 4
    replicas fit in 2 pods, not in 1."""
    def two_gpu_pods(max_pods):
        def edit(d):
            g = _group(d, "drafter-gpu")
            g["rayStartParams"]["resources"] = '"{\\"drafter_node\\": 2}"'
            g["maxReplicas"] = max_pods
            for c in g["template"]["spec"]["containers"]:
                for k in ("requests", "limits"):
                    c["resources"][k]["nvidia.com/gpu"] = "2"
        return _rs(edit)(_files())

    rs = yaml.safe_load(two_gpu_pods(2)["rayservice.yaml"])
    assert autoscaling_errors(rs) == [] and placement_errors(rs) == []
    rs = yaml.safe_load(two_gpu_pods(1)["rayservice.yaml"])
    assert autoscaling_errors(rs) == [
        "drafter_deployment: up to 4 replicas (2 a pod) need 2 pods of group drafter-gpu, whose "
        "maxReplicas is 1"]


def test_yaml_that_is_no_manifest_need_not_be_listed():
    files = {**_files(), "patch-values.yaml": "replicas: 2\n"}
    assert all_errors(files, SERVE_CONFIG_TEXT) == []


def test_openapi_conversion_rules():
    schema = openapi_to_jsonschema({"type": "object", "properties": {
        "a": {"x-kubernetes-int-or-string": True},
        "b": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
              "properties": {"c": {"type": "string"}}},
        "d": {"type": "string", "nullable": True}}})
    v = jsonschema.Draft7Validator(schema)
    assert not list(v.iter_errors({"a": 1, "b": {"c": "x", "z": 1}, "d": None}))
    assert not list(v.iter_errors({"a": "50%"}))
    assert list(v.iter_errors({"a": 1.5}))
    assert list(v.iter_errors({"zz": 1}))
