"""The Helm chart (charts/rloop), rendered with helm-python-sdk (Helm's own Go code, no binary):
every ci/*-values.yaml scenario lints strict and renders manifests that validate strictly against the
Kubernetes OpenAPI schemas (kubernetes-validate); the RBAC is exactly what the operator calls (plus
what its ownerReferences need, and its Lease in the release namespace); a single-namespace install
renders nothing cluster-scoped; the stage pods' NetworkPolicy allows exactly DNS, the store, the
rendezvous and metrics ports; leader election and replicas; the optional monitoring objects appear only
when enabled; bad values are rejected by values.schema.json.
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
from rloop.plan import Stage
from rloop.spec import parse_spec
from rloop_operator.builders import METRICS_PORT, build_job
from rloop_operator.k8s import API_CALLS, LEASE_CALLS, OWNER_REFERENCE_PERMISSIONS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rloop"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.31"
RELEASE, NAMESPACE = "rloop", "rloop-system"
MONITORING = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
OPERATOR_SOURCES = sorted((ROOT / "operator" / "rloop_operator").glob("*.py"))
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "MutatingWebhookConfiguration",
                  "ValidatingWebhookConfiguration", "APIService", "PersistentVolume"}


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
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",  # the Lease, in the release namespace
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]


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
    # Leader election is on by default: a new replica waits as a standby, so updates may overlap.
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
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
    assert env["RLOOP_OPERATOR_LEADER_ELECTION"] == "true"
    assert (env["RLOOP_OPERATOR_LEASE_NAME"], env["RLOOP_OPERATOR_LEASE_NAMESPACE"]) == (
        "rloop-operator",
        NAMESPACE,
    )
    assert (
        env["RLOOP_OPERATOR_LEASE_DURATION_SECONDS"],
        env["RLOOP_OPERATOR_RENEW_DEADLINE_SECONDS"],
        env["RLOOP_OPERATOR_RETRY_PERIOD_SECONDS"],
    ) == ("15", "10", "2")
    assert c["image"] == "rloop/operator:0.1.0" and c["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_namespaced_install_uses_a_role_and_watches_one_namespace() -> None:
    docs = render(values_of(CHART / "ci" / "namespaced-values.yaml"))
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role, binding = (
        next(d for d in by_kind(docs, kind) if d["metadata"]["name"] == "rloop-operator")
        for kind in ("Role", "RoleBinding")
    )
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


def test_namespaced_install_renders_nothing_cluster_scoped() -> None:
    """Single namespace is a first-class install: every rendered object is namespaced, in the watched
    namespace (the run's RBAC) or the release's (the operator, its Lease). The one cluster-scoped object
    is the CRD (crds/, which Helm installs before the templates): a CRD is cluster-scoped in Kubernetes
    whatever the operator's scope."""
    docs = render(values_of(CHART / "ci" / "namespaced-values.yaml"))
    assert not [d["kind"] for d in docs if d["kind"] in CLUSTER_SCOPED]
    assert all(d["metadata"].get("namespace") for d in docs), [
        d["kind"] for d in docs if not d["metadata"].get("namespace")
    ]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml-team", NAMESPACE}
    by_namespace = {
        (d["kind"], d["metadata"]["name"]): d["metadata"]["namespace"]
        for d in docs
        if d["kind"] in ("Role", "RoleBinding")
    }
    assert by_namespace == {
        ("Role", "rloop-operator"): "ml-team",
        ("RoleBinding", "rloop-operator"): "ml-team",
        ("Role", "rloop-operator-leader-election"): NAMESPACE,
        ("RoleBinding", "rloop-operator-leader-election"): NAMESPACE,
    }
    (only,) = helm.Chart.load(CHART).crds
    assert yaml.safe_load(only["data"])["spec"]["scope"] == "Namespaced"  # runs are; the CRD itself is not
    # The default install, for contrast: its run permissions are cluster-wide.
    assert {d["kind"] for d in render()} & CLUSTER_SCOPED == {"ClusterRole", "ClusterRoleBinding"}


# ------------------------------------------------------------------- replicas and leader election
def test_leader_election_off_means_one_replica_recreated() -> None:
    dep = one(render({"leaderElection": {"enabled": False}}), "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RLOOP_OPERATOR_LEADER_ELECTION"] == "false" and "RLOOP_OPERATOR_LEASE_NAME" not in env
    docs = render({"leaderElection": {"enabled": False}})
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")


def test_two_replicas_roll_and_share_one_lease() -> None:
    dep = one(render({"replicas": 2, "leaderElection": {"leaseDurationSeconds": 30}}), "Deployment")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RLOOP_OPERATOR_LEASE_DURATION_SECONDS"] == "30"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicas": 2, "leaderElection": {"enabled": False}}, "replicas > 1 needs leaderElection.enabled"),
        ({"leaderElection": {"renewDeadlineSeconds": 15}}, "renewDeadlineSeconds < leaseDurationSeconds"),
        ({"leaderElection": {"retryPeriodSeconds": 10}}, "retryPeriodSeconds < renewDeadlineSeconds"),
    ],
)
def test_unsafe_leader_election_settings_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        render(values)


# --------------------------------------------------------------------------------- NetworkPolicy
def stage_pod_labels() -> dict[str, str]:
    spec = parse_spec(
        {
            "model": {"base": "builtin:tiny"},
            "data": {"train": {"synthetic": {}}, "eval": [{"name": "heldout", "synthetic": {}}]},
            "storage": {"uri": "s3://bucket/runs"},
        }
    )
    job = build_job("tiny", "ml-team", "uid-1", spec, Stage("rl", 0), 0, run_uri="s3://b/r", default_image="i")
    return job["spec"]["template"]["metadata"]["labels"]


def rule_ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]}


def test_no_network_policy_by_default() -> None:
    assert not by_kind(render(), "NetworkPolicy")


def test_network_policy_allows_dns_the_store_and_the_rendezvous_port_only() -> None:
    values = values_of(CHART / "ci" / "networkpolicy-values.yaml")
    policy = one(render(values), "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "ml-team"
    spec = policy["spec"]
    # It selects exactly the stage pods the operator creates (and nothing else of the namespace).
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "rloop-operator"}}
    assert spec["podSelector"]["matchLabels"].items() <= stage_pod_labels().items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    stage_pods = [{"podSelector": spec["podSelector"]}]

    dns, store, rendezvous_out = spec["egress"]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert rule_ports(dns) == {(53, "UDP"), (53, "TCP")}
    assert store["to"] == values["networkPolicy"]["store"]["to"] and rule_ports(store) == {
        (8333, "TCP"),
        (443, "TCP"),
    }
    assert rendezvous_out["to"] == stage_pods and rule_ports(rendezvous_out) == {(29500, "TCP")}

    metrics_in, rendezvous_in = spec["ingress"]
    assert metrics_in["from"] == values["networkPolicy"]["metrics"]["from"]
    assert rule_ports(metrics_in) == {(METRICS_PORT, "TCP")}
    assert rendezvous_in["from"] == stage_pods and rule_ports(rendezvous_in) == {(29500, "TCP")}
    # Every rule names its peers: an empty `to`/`from` would allow every address.
    assert all(rule.get("to") for rule in spec["egress"]) and all(rule.get("from") for rule in spec["ingress"])


def test_network_policy_covers_each_listed_namespace_and_dns_is_configurable() -> None:
    docs = render(
        {
            "networkPolicy": {
                "enabled": True,
                "namespaces": ["team-a", "team-b"],
                "store": {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 9000}]},
                "rendezvousPorts": [],
                "dns": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}},
                    "podSelector": {"matchLabels": {"dns.operator.openshift.io/daemonset-dns": "default"}},
                    "ports": [5353],
                },
            }
        }
    )
    policies = by_kind(docs, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    for policy in policies:
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        egress = policy["spec"]["egress"]
        assert len(egress) == 2 and len(policy["spec"]["ingress"]) == 1  # no rendezvous rules
        assert rule_ports(egress[0]) == {(5353, "UDP"), (5353, "TCP")}
        assert egress[1]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}] and rule_ports(egress[1]) == {
            (9000, "TCP")
        }


def test_network_policy_takes_extra_egress_rules_for_credential_endpoints() -> None:
    agent = {"to": [{"ipBlock": {"cidr": "169.254.170.23/32"}}], "ports": [{"port": 80, "protocol": "TCP"}]}
    values = values_of(CHART / "ci" / "networkpolicy-values.yaml")
    values["networkPolicy"]["extraEgress"] = [agent]
    policy = one(render(values), "NetworkPolicy")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    assert policy["spec"]["egress"][-1] == agent and len(policy["spec"]["egress"]) == 4


@pytest.mark.parametrize(
    "values, message",
    [
        ({"watchNamespace": "ml-team", "networkPolicy": {"enabled": True}}, "networkPolicy.store.to"),
        (
            {"networkPolicy": {"enabled": True, "store": {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}},
            "needs networkPolicy.namespaces",
        ),
    ],
)
def test_network_policy_refuses_to_allow_everything(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        render(values)


# ------------------------------------------------------------------------------------------- RBAC
_CLIENT_METHOD = re.compile(r"^(get|read|list|create|patch|delete|replace)_namespaced_(\w+?)(_status)?$")
_CORE_KINDS = {
    "job": ("batch", "jobs"),
    "pod": ("", "pods"),
    "event": ("", "events"),
    "service": ("", "services"),
    "lease": ("coordination.k8s.io", "leases"),
}
_CLIENTS = ("_custom", "_batch", "_core", "_coordination")


def calls_in_operator_code() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every kubernetes-client call in rloop_operator, read from the AST."""
    found: set[tuple[str, str, str]] = set()
    for path in OPERATOR_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            if not (isinstance(owner, ast.Attribute) and owner.attr in _CLIENTS):
                continue
            m = _CLIENT_METHOD.match(node.func.attr)
            assert m, f"{path.name}: unrecognised client call {node.func.attr}"
            verb, kind, status = m.groups()
            verb = "get" if verb == "read" else verb  # read_namespaced_lease is a GET
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


def owner_reference_permissions_of_built_jobs() -> set[tuple[str, str, str]]:
    """What the API server's OwnerReferencesPermissionEnforcement admission checks when the operator
    creates the Jobs builders.py makes: `update` on `<owner>/finalizers` for each ownerReference with
    blockOwnerDeletion (setting it is refused without)."""
    spec = parse_spec(
        {
            "model": {"base": "builtin:tiny"},
            "data": {"train": {"synthetic": {}}, "eval": [{"name": "heldout", "synthetic": {}}]},
            "storage": {"uri": "s3://bucket/runs"},
        }
    )
    job = build_job("tiny", "ml-team", "uid-1", spec, Stage("rl", 0), 0, run_uri="s3://b/r", default_image="i")
    plural = {"RLoopRun": "rloopruns"}
    return {
        (ref["apiVersion"].split("/")[0], f"{plural[ref['kind']]}/finalizers", "update")
        for ref in job["metadata"]["ownerReferences"]
        if ref.get("blockOwnerDeletion")
    }


def run_role(values: dict[str, Any]) -> dict[str, Any]:
    kind = "Role" if values.get("watchNamespace") else "ClusterRole"
    return next(d for d in by_kind(render(values), kind) if d["metadata"]["name"] == "rloop-operator")


def test_owner_reference_permissions_are_exactly_what_the_built_jobs_need() -> None:
    # blockOwnerDeletion is set (builders.py), so OpenShift-style admission needs rloopruns/finalizers;
    # were it dropped, the permission would be unjustified and this fails the other way.
    assert owner_reference_permissions_of_built_jobs() == {
        (c.group, c.resource, c.verb) for c in OWNER_REFERENCE_PERMISSIONS
    }
    assert not {(c.group, c.resource, c.verb) for c in OWNER_REFERENCE_PERMISSIONS} & {
        (c.group, c.resource, c.verb) for c in API_CALLS
    }, "a permission for admission only, never a call"


def test_rbac_allows_exactly_what_the_operator_calls() -> None:
    lease_calls = {(c.group, c.resource, c.verb) for c in LEASE_CALLS}
    needed = (
        ({(c.group, c.resource, c.verb) for c in API_CALLS} - lease_calls)
        | kopf_watches()
        | owner_reference_permissions_of_built_jobs()
    )
    assert kopf_watches() == {
        ("rloop.dev", "rloopruns", "list"),
        ("rloop.dev", "rloopruns", "watch"),
        ("batch", "jobs", "list"),
        ("batch", "jobs", "watch"),
    }
    assert ("rloop.dev", "rloopruns/finalizers", "update") in needed
    for values in ({}, {"watchNamespace": "ml-team"}):
        role = run_role(values)
        assert role_permissions(role) == needed
        assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in role["rules"])


@pytest.mark.parametrize("values", [{}, {"watchNamespace": "ml-team"}], ids=["cluster", "namespaced"])
def test_the_lease_is_granted_in_the_release_namespace_on_its_name_only(values: dict[str, Any]) -> None:
    docs = render(values)
    role = next(d for d in by_kind(docs, "Role") if d["metadata"]["name"].endswith("-leader-election"))
    binding = next(d for d in by_kind(docs, "RoleBinding") if d["metadata"]["name"] == role["metadata"]["name"])
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert env["RLOOP_OPERATOR_LEASE_NAMESPACE"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rloop-operator", "namespace": NAMESPACE}]
    assert role_permissions(role) == {(c.group, c.resource, c.verb) for c in LEASE_CALLS}
    for rule in role["rules"]:
        if rule["verbs"] != ["create"]:  # RBAC cannot restrict create by name (the object does not exist)
            assert rule["resourceNames"] == [env["RLOOP_OPERATOR_LEASE_NAME"]]
    # Nothing about leases in the run permissions (cluster-wide in the default install).
    assert not any("leases" in rule["resources"] for rule in run_role(values)["rules"])


# ------------------------------------------------------------------------------- values and CRDs
@pytest.mark.parametrize(
    "values, field",
    [
        ({"operator": {"workers": 0}}, "workers"),
        ({"metrics": {"servicemonitor": {"enabled": True}}}, "servicemonitor"),
        ({"watchNamespace": "Bad_Namespace"}, "watchNamespace"),
        ({"prometheusRule": {"operatorDownFor": "five minutes"}}, "operatorDownFor"),
        ({"replicas": 0}, "replicas"),
        ({"leaderElection": {"leaseDuration": 15}}, "leaseDuration"),
        ({"networkPolicy": {"rendezvousPorts": [70000]}}, "rendezvousPorts"),
        ({"networkPolicy": {"store": {"to": [{"ipblock": {"cidr": "10.0.0.0/8"}}]}}}, "ipblock"),
        ({"networkPolicy": {"namespaces": ["Team_A"]}}, "namespaces"),
        ({"networkPolicy": {"extraEgress": [{"ports": [{"port": 80}]}]}}, "extraEgress/0': missing property 'to'"),
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
