"""docs/deploy.md, executed against a real cluster (kind is enough for a CPU dry run).

Skipped unless all of these are set (the skip reason names what is missing):
  KUBECONFIG                  a cluster you may install into (a namespace `rloop-e2e-<random>` is used)
  RLOOP_E2E_OPERATOR_IMAGE    e.g. registry.example/rloop-operator:0.1.0 (built from images/operator)
  RLOOP_E2E_TRAINER_IMAGE     e.g. registry.example/rloop-trainer:0.1.0 (images/trainer)
  RLOOP_E2E_STORAGE_URI       s3://bucket/prefix reachable from the cluster
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for non-AWS S3): put into the Secret

Steps (as in docs/deploy.md): helm install the chart (watching one namespace), create the S3 Secret,
apply a small RLoopRun, wait for Succeeded, check one Job per stage and the metrics in the status,
delete the run (its Jobs go), helm uninstall. This is where admission (CRD schema, CEL rules), the
chart's RBAC and the real Job controller are exercised, which the emulator tests cannot show.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers import small_doc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = (
    "KUBECONFIG",
    "RLOOP_E2E_OPERATOR_IMAGE",
    "RLOOP_E2E_TRAINER_IMAGE",
    "RLOOP_E2E_STORAGE_URI",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
RUN_TIMEOUT_S = 1800


def _missing() -> list[str]:
    return [k for k in REQUIRED if not os.environ.get(k)]


@pytest.fixture(scope="module")
def cluster():
    missing = _missing()
    if missing:
        pytest.skip(
            f"no real cluster configured (set {', '.join(missing)}; see tests/e2e/test_real_cluster.py)"
        )
    from kubernetes import client, config

    config.load_kube_config()
    api = client.ApiClient()
    try:
        client.VersionApi(api).get_code()
    except Exception as err:  # noqa: BLE001 - any failure means: no usable cluster
        pytest.skip(f"KUBECONFIG does not reach a cluster: {err}")
    return api


def _split(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":")
    return (repo, tag) if repo and "/" not in tag else (image, "latest")


def test_install_run_and_uninstall(cluster) -> None:
    import helm_python as helm
    from kubernetes import client

    ns = f"rloop-e2e-{uuid.uuid4().hex[:6]}"
    core, custom, batch = (
        client.CoreV1Api(cluster),
        client.CustomObjectsApi(cluster),
        client.BatchV1Api(cluster),
    )
    core.create_namespace({"metadata": {"name": ns}})
    op_repo, op_tag = _split(os.environ["RLOOP_E2E_OPERATOR_IMAGE"])
    tr_repo, tr_tag = _split(os.environ["RLOOP_E2E_TRAINER_IMAGE"])
    cfg = helm.Config(namespace=ns)
    try:
        cfg.install(
            helm.Chart.load(ROOT / "charts" / "rloop"),
            "rloop",
            {
                "image": {"repository": op_repo, "tag": op_tag},
                "stageImage": {"repository": tr_repo, "tag": tr_tag},
                "watchNamespace": ns,
            },
            namespace=ns,
            wait="watcher",
            timeout=300,
        )
        secret = {
            k: os.environ[k]
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
            if os.environ.get(k)
        }
        core.create_namespaced_secret(ns, {"metadata": {"name": "s3-credentials"}, "stringData": secret})
        doc = small_doc("e2e", iterations=1, eval_base=False)
        doc["metadata"]["namespace"] = ns
        doc["spec"]["storage"] = {
            "uri": os.environ["RLOOP_E2E_STORAGE_URI"],
            "secretRef": {"name": "s3-credentials"},
        }
        custom.create_namespaced_custom_object("rloop.dev", "v1alpha1", ns, "rloopruns", doc)

        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            run = custom.get_namespaced_custom_object("rloop.dev", "v1alpha1", ns, "rloopruns", "e2e")
            conds = {c["type"]: c for c in (run.get("status") or {}).get("conditions") or []}
            if conds.get("Succeeded", {}).get("status") == "True":
                break
            assert conds.get("Failed", {}).get("status") != "True", yaml.safe_dump(run.get("status"))
            assert time.monotonic() < deadline, f"run not finished in {RUN_TIMEOUT_S}s: {run.get('status')}"
            time.sleep(10)
        jobs = batch.list_namespaced_job(ns, label_selector="rloop.dev/run=e2e").items
        assert sorted(j.metadata.name for j in jobs) == sorted(
            ["e2e-b-init-a0", "e2e-i0-rl-a0", "e2e-i0-verify-a0", "e2e-i0-rft-a0", "e2e-i0-eval-heldout-a0"]
        )
        assert set(run["status"]["metrics"]) == {"trainReward", "evalAvgAtN", "evalPassAtK"}

        custom.delete_namespaced_custom_object("rloop.dev", "v1alpha1", ns, "rloopruns", "e2e")
        deadline = time.monotonic() + 120
        while batch.list_namespaced_job(ns, label_selector="rloop.dev/run=e2e").items:
            assert time.monotonic() < deadline, "the run's Jobs were not garbage-collected"
            time.sleep(2)
    finally:
        try:
            cfg.uninstall("rloop", ignore_not_found=True)
        finally:
            core.delete_namespace(ns)
