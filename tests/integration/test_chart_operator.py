"""The container the chart renders is the operator that works: its exact command, args and env (from
`helm template` of charts/rloop with watchNamespace) run against the API emulator, serve /healthz, take
the leader Lease the chart names (in the release namespace), and reconcile a run in the watched
namespace (Job image = the chart's stageImage) but not in another."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from helm_python import chart as helm

from tests.helpers import small_doc
from tests.k8s.apiserver import JOBS, LEASES, RLOOPRUNS, start, wait_until
from tests.s3harness import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHART = Path(__file__).resolve().parents[2] / "charts" / "rloop"
WATCHED, OTHER = "ml-team", "elsewhere"
RELEASE_NAMESPACE = "rloop-system"


def rendered_container(values: dict) -> dict:
    out = helm.Chart.load(CHART).render(values, name="rloop", namespace=RELEASE_NAMESPACE)
    deployment = yaml.safe_load(out["rloop/templates/deployment.yaml"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def run_doc(name: str, namespace: str) -> dict:
    doc = small_doc(name, iterations=1, eval_base=False)
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["storage"] = {"uri": "s3://bucket/runs"}
    return doc


def test_rendered_operator_container_runs_and_serves_its_namespace(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    container = rendered_container(
        {
            "watchNamespace": WATCHED,
            "stageImage": {"repository": "reg.example/trainer", "tag": "7"},
            "metrics": {"port": port},
        }
    )
    assert container["command"][0] == "kopf"
    argv = [sys.executable, "-m", "kopf", *container["command"][1:], *container["args"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "RLOOP_", "AWS_"))}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env["HOME"] = str(tmp_path)  # the pod's /tmp emptyDir
    env["RLOOP_OPERATOR_METRICS_HOST"] = "127.0.0.1"  # tests bind to localhost only

    server = start()
    server.create_namespace(RELEASE_NAMESPACE)  # the operator's own (its Lease lives there)
    server.create_namespace(WATCHED)
    server.create_namespace(OTHER)
    env.update(server.env())
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "operator.log").read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, timeout=60, interval=0.1, message="the rendered operator's /healthz")
        lease = wait_until(
            lambda: server.get(LEASES, RELEASE_NAMESPACE, "rloop-operator"),
            timeout=30,
            message="the operator to take the chart's Lease",
        )
        assert lease["spec"]["holderIdentity"] and lease["spec"]["leaseDurationSeconds"] == 15
        server.create(RLOOPRUNS, run_doc("outside", OTHER), namespace=OTHER)
        server.create(RLOOPRUNS, run_doc("inside", WATCHED), namespace=WATCHED)
        job = wait_until(
            lambda: server.get(JOBS, WATCHED, "inside-b-init-a0"),
            timeout=30,
            message="the operator to create the first Job",
        )
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/trainer:7"
        status = wait_until(
            lambda: (server.get(RLOOPRUNS, WATCHED, "inside") or {}).get("status"), timeout=30
        )
        assert status["stage"] == "base/init"
        # The other namespace is not watched: untouched.
        assert server.list(JOBS, OTHER) == [] and not (server.get(RLOOPRUNS, OTHER, "outside") or {}).get(
            "status"
        )
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        server.stop()
