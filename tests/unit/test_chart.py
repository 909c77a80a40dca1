"""The Helm chart (charts/rloop), rendered with helm-python-sdk (Helm's own Go code, no binary):
every ci/*-values.yaml scenario lints strict and renders manifests that validate strictly against the
Kubernetes OpenAPI schemas (kubernetes-validate); the RBAC is exactly what the operator calls; the
optional monitoring objects appear only when enabled; bad values are rejected by values.schema.json.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import kopf
import kubernetes_validate
import pytest
import yaml
from helm_python import chart as helm

import rloop_operator  # noqa: F401  (registers the kopf handlers)
from rloop import crd
from rloop_operator.k8s import API_CALLS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rloop"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.31"
RELEASE, NAMESPACE = "rloop", "rloop-system"
MONITORING = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
OPERATOR_SOURCES = sorted((ROOT / "operator" / "rloop_operator").glob("*.py"))


def values_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = helm.Chart.load(CHART).render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for name, text in sorted(out.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def check_monitoring_object(doc: dict[str, Any]) -> None:
    """kubernetes-validate has no schemas for prometheus-operator CRDs: check the fields we rely on."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == NAMESPACE
    spec = doc["spec"]
    if doc["kind"] == "ServiceMonitor":
        assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
        assert all(set(e) <= {"port", "path", "interval", "honorLabels"} for e in spec["endpoints"])
    elif doc["kind"] == "PodMonitor":
        assert set(spec) == {"selector", "namespaceSelector", "podMetricsEndpoints"}
        assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "rloop-operator"}
        assert all(e["port"] == "metrics" for e in spec["podMetricsEndpoints"])
    else:
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["expr"].strip()


# ------------------------------------------------------------------------------------ scenarios
def test_there_are_scenarios() -> None:
    assert {p.name for p in SCENARIOS} >= {
        "default-values.yaml",
        "all-features-values.yaml",
        "namespaced-values.yaml",
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_lints_strict_and_validates(scenario: Path) -> None:
    values = values_of(scenario)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], (problems, report["errors"])
    docs = render(values)
    assert docs
    for doc in docs:
        if doc["kind"] in MONITORING:
            check_monitoring_object(doc)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_default_render_has_no_optional_monitoring() -> None:
    docs = render(values_of(CHART / "ci" / "default-values.yaml"))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]


def test_all_features_render_has_every_monitoring_object() -> None:
    docs = render(values_of(CHART / "ci" / "all-features-values.yaml"))
    for kind in MONITORING:
        one(docs, kind)
    dashboard = [
        d
        for d in by_kind(docs, "ConfigMap")
        if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert len(dashboard) == 1
    board = json.loads(dashboard[0]["data"]["rloop.json"])
    assert board == json.loads((CHART / "files" / "dashboard.json").read_text())
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_needs_the_service() -> None:
    with pytest.raises(Exception, match="metrics.service.enabled"):
        render({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})


# ------------------------------------------------------------------------------------ operator pod
def test_operator_deployment_is_hardened_and_probed() -> None:
    dep = one(render(), "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["command"] == ["kopf", "run", "-m", "rloop_operator", "--standalone"]
    assert c["args"] == ["--all-namespaces"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RLOOP_OPERATOR_IMAGE"] == "rloop/trainer:0.1.0"
    assert env["RLOOP_OPERATOR_METRICS_PORT"] == "8080" and env["RLOOP_OPERATOR_WORKERS"] == "8"
    assert c["image"] == "rloop/operator:0.1.0" and c["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_namespaced_install_uses_a_role_and_watches_one_namespace() -> None:
    docs = render(values_of(CHART / "ci" / "namespaced-values.yaml"))
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml-team"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rloop-operator", "namespace": NAMESPACE}
    ]
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["--namespace=ml-team"]
    assert {e["name"]: e.get("value") for e in c["env"]}["RLOOP_OPERATOR_IMAGE"] == (
        "registry.example/ml/rloop-trainer:0.1.0-cuda12"
    )
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["ml-team"]}


# ------------------------------------------------------------------------------------------- RBAC
_CLIENT_METHOD = re.compile(r"^(get|list|create|patch|delete|replace)_namespaced_(\w+?)(_status)?$")
_CORE_KINDS = {"job": ("batch", "jobs"), "pod": ("", "pods"), "event": ("", "events")}


def calls_in_operator_code() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every kubernetes-client call in rloop_operator, read from the AST."""
    found: set[tuple[str, str, str]] = set()
    for path in OPERATOR_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            if not (isinstance(owner, ast.Attribute) and owner.attr in ("_custom", "_batch", "_core")):
                continue
            m = _CLIENT_METHOD.match(node.func.attr)
            assert m, f"{path.name}: unrecognised client call {node.func.attr}"
            verb, kind, status = m.groups()
            group, resource = ("rloop.dev", "rloopruns") if kind == "custom_object" else _CORE_KINDS[kind]
            found.add((group, resource + ("/status" if status else ""), verb))
    return found


def kopf_watches() -> set[tuple[str, str, str]]:
    """kopf lists and watches every resource a handler is registered for."""
    out = set()
    for handler in kopf.get_default_registry()._watching.get_all_handlers():
        sel = handler.selector
        out |= {(sel.group, sel.plural or sel.any_name, verb) for verb in ("list", "watch")}
    return out


def role_permissions(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_api_calls_table_matches_the_code() -> None:
    assert calls_in_operator_code() == {(c.group, c.resource, c.verb) for c in API_CALLS}


def test_rbac_allows_exactly_what_the_operator_calls() -> None:
    needed = {(c.group, c.resource, c.verb) for c in API_CALLS} | kopf_watches()
    assert kopf_watches() == {
        ("rloop.dev", "rloopruns", "list"),
        ("rloop.dev", "rloopruns", "watch"),
        ("batch", "jobs", "list"),
        ("batch", "jobs", "watch"),
    }
    for values, kind in (({}, "ClusterRole"), ({"watchNamespace": "ml-team"}, "Role")):
        role = one(render(values), kind)
        assert role_permissions(role) == needed
        assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in role["rules"])


# ------------------------------------------------------------------------------- values and CRDs
@pytest.mark.parametrize(
    "values, field",
    [
        ({"operator": {"workers": 0}}, "workers"),
        ({"metrics": {"servicemonitor": {"enabled": True}}}, "servicemonitor"),
        ({"watchNamespace": "Bad_Namespace"}, "watchNamespace"),
        ({"prometheusRule": {"operatorDownFor": "five minutes"}}, "operatorDownFor"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any], field: str) -> None:
    with pytest.raises(Exception, match=field):
        render(values)


def test_chart_ships_the_generated_crd() -> None:
    (only,) = helm.Chart.load(CHART).crds  # Helm installs these before the templates
    assert only["name"] == "crds/rlooprun.yaml"
    assert only["data"] == crd.render()
    kubernetes_validate.validate(yaml.safe_load(only["data"]), KUBE_VERSION, strict=True)


def test_values_are_documented() -> None:
    """Every leaf of values.yaml has a type in the schema (typos in user values fail the install)."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            props = node.get("properties") or {}
            assert key in props, f"{path}{key} is not in values.schema.json"
            if isinstance(value, dict) and props[key].get("properties"):
                walk(value, props[key], f"{path}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")
