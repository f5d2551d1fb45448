"""Offline checks of k8s/: every manifest parses; core kinds validate against the Kubernetes API
schemas (kubernetes-validate, strict); the RayService and the PodMonitor validate against their
CRDs' OpenAPI schemas (tests/data/k8s, jsonschema), with the RayService's pod templates checked
as core PodTemplates; the embedded serve config is serve_config.yaml plus the GPU overrides;
placement, Services and the PodMonitor point at what exists.  Each check also fails on a
deliberately broken copy.  No cluster, no kubectl."""

from __future__ import annotations

import copy
import importlib.util
import json
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
    """The RayService's serveConfigV2 is serve_config.yaml + GPU_OVERRIDES, and valid."""
    from ray.serve.schema import ServeDeploySchema

    from hsd_serve.serve.config import load_config

    try:
        embedded = sync.embedded_serve_config(doc)
    except yaml.YAMLError as exc:
        return [f"serveConfigV2 does not parse: {exc}"]
    errors = []
    want = sync.gpu_serve_config(serve_config)
    if embedded != want:
        errors.append("serveConfigV2 differs from serve_config.yaml + GPU_OVERRIDES at "
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


def placement_errors(doc: dict) -> list[str]:
    """Each model deployment's custom resource is advertised by exactly one worker group with
    enough GPUs; the head advertises none; autoscaling can reach the replicas' maximum."""
    errors = []
    args = _app_args(sync.embedded_serve_config(doc))
    cluster = doc["spec"]["rayClusterConfig"]
    if cluster.get("enableInTreeAutoscaling") is not True:
        errors.append("enableInTreeAutoscaling is not true")
    head = cluster["headGroupSpec"].get("rayStartParams") or {}
    if "resources" in head or head.get("num-gpus", "0") != "0":
        errors.append("the head group advertises model resources")
    groups = {}
    for g in cluster.get("workerGroupSpecs") or []:
        raw = (g.get("rayStartParams") or {}).get("resources", '"{}"')
        groups[g["groupName"]] = (json.loads(json.loads(raw)), g)
    for dep in ("target_deployment", "drafter_deployment"):
        opts = args[dep]
        for res, amount in (opts.get("resources") or {}).items():
            having = [n for n, (r, _) in groups.items() if r.get(res, 0) >= amount]
            if len(having) != 1:
                errors.append(f"{dep}: resource {res} is offered by groups {having}, want one")
                continue
            g = groups[having[0]][1]
            gpus = max(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                       for c in g["template"]["spec"]["containers"])
            if gpus < opts.get("num_gpus", 0):
                errors.append(f"{dep}: needs {opts.get('num_gpus')} GPU, group {having[0]} "
                              f"has {gpus}")
            auto = opts.get("autoscaling_config") or {}
            room = g["maxReplicas"] * int(groups[having[0]][0][res] // amount)
            if auto.get("max_replicas", opts.get("num_replicas", 1)) > room:
                errors.append(f"{dep}: up to {auto.get('max_replicas')} replicas, but group "
                              f"{having[0]} has room for {room}")
        if not opts.get("resources"):
            errors.append(f"{dep}: no custom resource pins it to a worker group")
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


def all_errors(files: dict[str, str], serve_config_text: str) -> list[str]:
    """Every check over the k8s/ file contents (name -> text); empty when all pass."""
    errors, docs = [], []
    for name, text in sorted(files.items()):
        if name.endswith(".json"):
            try:
                errors += [f"{name}: {e}" for e in dashboard_errors(json.loads(text))]
            except json.JSONDecodeError as exc:
                errors.append(f"{name}: does not parse: {exc}")
            continue
        try:
            loaded = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            errors.append(f"{name}: does not parse: {str(exc).splitlines()[0]}")
            continue
        if name == "kustomization.yaml":
            k = loaded[0]
            listed = list(k.get("resources", [])) + [f for g in k.get("configMapGenerator", [])
                                                      for f in g.get("files", [])]
            errors += [f"{name}: lists missing {f}" for f in listed if f not in files]
            errors += [f"{name}: does not list {f}" for f in files
                       if f.endswith(".yaml") and f != name and f not in listed]
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
    errors += placement_errors(rs[0])
    errors += selector_errors(docs)
    for kind in ("Service", "PodMonitor"):
        if not any(d["kind"] == kind for d in docs):
            errors.append(f"no {kind}")
    ports = {p["port"] for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]}
    if not {8000, 9000} <= ports:
        errors.append(f"Services expose ports {sorted(ports)}, want 8000 (HTTP) and 9000 (gRPC)")
    return errors


def _files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(K8S.iterdir())
            if p.suffix in (".yaml", ".json")}


SERVE_CONFIG_TEXT = (ROOT / "serve_config.yaml").read_text()


# ------------------------------------------------------------------ the real manifests


def test_k8s_manifests_pass_every_check():
    files = _files()
    assert {"rayservice.yaml", "services.yaml", "podmonitor.yaml", "grafana-dashboard.json",
            "kustomization.yaml"} <= set(files)
    assert all_errors(files, SERVE_CONFIG_TEXT) == []


def test_sync_script_reports_no_drift(capsys):
    assert sync.main(["--check"]) == 0
    assert "matches" in capsys.readouterr().out


def test_gpu_overrides_are_the_only_differences():
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    embedded = sync.embedded_serve_config(rs)
    base = yaml.safe_load(SERVE_CONFIG_TEXT)
    diff = _diff_paths(embedded, base)
    app = next(i for i, a in enumerate(base["applications"])
               if a["import_path"] == sync.APP_IMPORT_PATH)
    allowed = {f".applications[{app}].args.{k}.{f}" for k, v in sync.GPU_OVERRIDES.items()
               for f in v}
    assert diff and diff <= allowed | {p for p in diff for a in allowed if p.startswith(a + ".")}
    args = _app_args(embedded)
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
