"""The operator end to end, with real parts only (DESIGN §4): the real operator process
(`kopf run -m rloop_operator`), the patched kmock API emulator, the test kubelet running each Job's
`rloop stage ...` command as a local process with the Job's env (credentials from the Secret), and a
real S3 API (SeaweedFS) as the store. `kubectl` is used where it is installed.

Covered: a run reaches Succeeded with metrics in its status (and an invalid run beside it fails alone
with InvalidSpec); the operator SIGKILLed mid-stage and restarted finishes the run without duplicate
Jobs; a stage failing until retry.limit fails the run naming the Job; suspend and resume; deleting a
run deletes its Jobs and keeps its data.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rloop_operator.jobs import stage_order
from rloop_operator.naming import parse_job_labels, run_selector
from tests.helpers import small_doc
from tests.k8s.apiserver import EVENTS, JOBS, PODS, RLOOPRUNS, Server, start
from tests.k8s.kubelet import Kubelet, map_executables
from tests.k8s.operator import OperatorProcess, sample, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

NS = "rloop-e2e"
RUN_TIMEOUT = 420.0  # one small run is about a minute on 2 quiet cores; CI shares them
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------ harness
class Cluster:
    def __init__(
        self, server: Server, kubelet: Kubelet, operator: OperatorProcess, s3, prefix: str, tmp: Path
    ):
        self.server, self.kubelet, self.operator, self.s3, self.prefix, self.tmp = (
            server,
            kubelet,
            operator,
            s3,
            prefix,
            tmp,
        )

    # -------------------------------------------------------------------------------- runs
    def manifest(self, name: str, *, secret: str = "s3", **spec: Any) -> dict[str, Any]:
        doc = small_doc(name, iterations=1, eval_base=False)
        doc["metadata"]["namespace"] = NS
        doc["spec"]["storage"] = {
            "uri": f"s3://{self.s3.bucket}/{self.prefix}",
            "secretRef": {"name": secret},
        }
        doc["spec"].update(spec)
        return doc

    def apply(self, *docs: dict[str, Any]) -> None:
        """`kubectl apply -f` when kubectl is installed, else the API client."""
        if shutil.which("kubectl"):
            path = self.tmp / f"apply-{docs[0]['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
            self.kubectl("apply", "--validate=false", "-f", str(path))
            return
        for doc in docs:
            self.server.create(RLOOPRUNS, doc, namespace=NS)

    def kubectl(self, *args: str) -> str:
        cmd = [
            "kubectl",
            "--kubeconfig",
            str(self.server.kubeconfig_path),
            "--cache-dir",
            str(self.tmp / "kubectl-cache"),
            "-n",
            NS,
            *args,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{cmd}: {result.stderr}"
        return result.stdout

    def run(self, name: str) -> dict[str, Any] | None:
        return self.server.get(RLOOPRUNS, NS, name)

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        run = self.run(name) or {}
        return next(
            (c for c in (run.get("status") or {}).get("conditions") or [] if c["type"] == type_), None
        )

    def wait_condition(self, name: str, type_: str, status: str = "True", timeout: float = RUN_TIMEOUT):
        def check():
            c = self.condition(name, type_)
            if c and c["status"] == status:
                return c
            failed = self.condition(name, "Failed")
            if type_ != "Failed" and failed and failed["status"] == "True":
                raise AssertionError(f"run {name} failed: {failed}\n{self.operator.log_tail()}")
            return None

        return wait_for(check, timeout, f"{name}: {type_}={status}", self.operator)

    def jobs(self, name: str) -> list[dict[str, Any]]:
        """The run's Jobs in DAG order (stage, then attempt)."""

        def order(job: dict[str, Any]):
            stage, attempt = parse_job_labels(job["metadata"]["labels"])
            return (stage_order(stage), attempt)

        return sorted(self.server.list(JOBS, NS, labels=run_selector(name)), key=order)

    def job_names(self, name: str) -> list[str]:
        return [j["metadata"]["name"] for j in self.jobs(name)]

    def events(self, name: str) -> list[tuple[str, str]]:
        return [
            (e["reason"], e["message"])
            for e in self.server.list(EVENTS, NS)
            if e.get("involvedObject", {}).get("name") == name
        ]

    def wait_events(self, name: str, check, what: str, timeout: float = 30) -> list[tuple[str, str]]:
        """The run's (reason, message) Events once `check(events)` holds. The operator patches the status
        first and posts Events after it, so a condition seen is no proof that its Event is there yet."""
        return wait_for(lambda: (lambda found: found if check(found) else None)(self.events(name)),
                        timeout, f"{name}: events {what}", self.operator)

    def running_job(self, name: str, kind: str) -> dict[str, Any] | None:
        for job in self.jobs(name):
            labels = job["metadata"]["labels"]
            if labels.get("rloop.dev/stage", "").split(".")[-1] == kind and (job.get("status") or {}).get(
                "active"
            ):
                return job
        return None

    def store_keys(self, name: str) -> list[str]:
        client = self.s3.client()
        prefix = f"{self.prefix}/{NS}/{name}/"
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.s3.bucket, Prefix=prefix)
        return [o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])]


def stage_of(job: dict[str, Any]) -> str:
    return job["metadata"]["labels"]["rloop.dev/stage"]


@contextlib.contextmanager
def running_cluster(seaweedfs, tmp: Path, prefix: str) -> Iterator[Cluster]:
    """The emulator, the test kubelet (two pods at a time) and the real operator, with the store's
    credentials in Secret `s3` (and a wrong copy in `s3-wrong`); everything stopped afterwards."""
    server = start()
    server.create_namespace(NS)
    creds = {**seaweedfs.env()}
    server.create_secret(NS, "s3", creds)
    server.create_secret(NS, "s3-wrong", {**creds, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    kubelet = Kubelet(
        server,
        namespace=NS,
        translate=map_executables({"rloop": str(BIN / "rloop")}),
        max_concurrency=2,  # two stages, or the two pods of a two-node stage, at once
        poll_interval=0.2,
        extra_env={
            # The shared cache keeps the tiny base model between runs; one thread per stage process.
            "RLOOP_CACHE": str(tmp / "cache"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",
            "HOME": str(tmp / "home"),
        },
        workdir=tmp / "kubelet",
    ).start()
    operator = OperatorProcess(server, tmp / "operator.log", namespace=NS).start()
    try:
        yield Cluster(server, kubelet, operator, seaweedfs, f"{prefix}-{tmp.name}", tmp)
    finally:
        operator.stop()
        kubelet.stop()
        server.stop()
        print(f"\noperator log: {operator.log_path}")
    assert not kubelet.errors, kubelet.errors


@pytest.fixture(scope="module")
def cluster(seaweedfs, tmp_path_factory):
    with running_cluster(seaweedfs, tmp_path_factory.mktemp("operator-e2e"), "e2e") as c:
        yield c


# -------------------------------------------------------------------------------------------- tests
def test_run_succeeds_with_metrics_while_an_invalid_run_fails_alone(cluster: Cluster) -> None:
    good = cluster.manifest("good")
    bad = cluster.manifest("bad")
    bad["spec"]["loop"]["rl"]["samplesPerPromt"] = 4  # a typo: an unknown field
    cluster.apply(bad, good)

    failed = cluster.wait_condition("bad", "Failed", timeout=60)
    assert failed["reason"] == "InvalidSpec"
    assert "spec.loop.rl.samplesPerPromt" in failed["message"] and "unknown field" in failed["message"]
    assert cluster.jobs("bad") == []

    done = cluster.wait_condition("good", "Succeeded")
    run = cluster.run("good")
    status = run["status"]
    assert status["observedGeneration"] == run["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "Progressing": "False",
        "Succeeded": "True",
        "Failed": "False",
        "Suspended": "False",
    }
    assert done["reason"] == "Succeeded" and status["stage"] == "Finished" and status["iteration"] == 0

    # One Job per stage, first attempt each, all succeeded; history names them.
    jobs = cluster.jobs("good")
    stages = [stage_of(j) for j in jobs]
    assert stages == ["base.init", "iter-000.rl", "iter-000.verify", "iter-000.rft", "iter-000.eval.heldout"]
    assert [j["metadata"]["name"] for j in jobs] == [
        "good-b-init-a0",
        "good-i0-rl-a0",
        "good-i0-verify-a0",
        "good-i0-rft-a0",
        "good-i0-eval-heldout-a0",
    ]
    assert all(j["status"].get("succeeded") == 1 for j in jobs)
    assert [(h["job"], h["state"]) for h in status["history"]] == [
        (j["metadata"]["name"], "Succeeded") for j in jobs
    ]

    # Stage summaries reached the status through termination messages; the store holds the commits.
    metrics = status["metrics"]
    assert set(metrics) == {"trainReward", "evalAvgAtN", "evalPassAtK"}
    assert 0.0 <= metrics["evalAvgAtN"] <= metrics["evalPassAtK"] <= 1.0
    run_uri = f"s3://{cluster.s3.bucket}/{cluster.prefix}/{NS}/good"
    assert status["artifacts"] == {"runUri": run_uri, "latestPolicy": f"{run_uri}/iter-000/rft/policy"}
    keys = cluster.store_keys("good")
    for stage in ("base/init", "iter-000/rl", "iter-000/verify", "iter-000/rft", "iter-000/eval/heldout"):
        assert f"{stage}/_COMMIT.json" in keys
    commit = json.loads(
        cluster.s3.client()
        .get_object(
            Bucket=cluster.s3.bucket,
            Key=f"{cluster.prefix}/{NS}/good/iter-000/eval/heldout/_COMMIT.json",
        )["Body"]
        .read()
    )
    assert commit["summary"]["avg_at_n"] == pytest.approx(metrics["evalAvgAtN"])

    # Events on transitions.
    def reasons_of(found: list[tuple[str, str]]) -> list[str]:
        return [reason for reason, _ in found]

    reasons = reasons_of(cluster.wait_events("good", lambda e: "RunSucceeded" in reasons_of(e), "RunSucceeded"))
    assert reasons.count("StageStarted") == 5 and reasons.count("StageSucceeded") == 5
    assert reasons.count("RunSucceeded") == 1
    cluster.wait_events("bad", lambda e: "InvalidSpec" in reasons_of(e), "InvalidSpec")

    # What a user sees with kubectl.
    if shutil.which("kubectl"):
        listed = json.loads(cluster.kubectl("get", "rloopruns", "-o", "json"))
        by_name = {i["metadata"]["name"]: i for i in listed["items"]}
        assert by_name["good"]["status"]["metrics"] == metrics
        assert by_name["bad"]["status"]["conditions"][3]["reason"] == "InvalidSpec"

    # Prometheus metrics and health of the operator.
    text = cluster.operator.metrics()
    assert sample(text, "rloop_runs", namespace=NS, condition="Succeeded") >= 1
    assert sample(text, "rloop_runs", namespace=NS, condition="Failed") >= 1
    assert sample(text, "rloop_run_eval_pass_at_k", namespace=NS, run="good") == pytest.approx(
        metrics["evalPassAtK"]
    )
    assert sample(text, "rloop_run_train_reward", namespace=NS, run="good") == pytest.approx(
        metrics["trainReward"]
    )
    assert sample(text, "rloop_run_condition", namespace=NS, run="bad", condition="Failed") == 1
    assert sample(text, "rloop_stage_attempts_total", namespace=NS, run="good", stage="rl") == 1
    assert (
        sample(text, "rloop_stage_duration_seconds_count", namespace=NS, stage="rft", outcome="Succeeded")
        >= 1
    )
    assert sample(text, "rloop_reconcile_duration_seconds_count") > 0
    assert cluster.operator.get("/healthz").strip() == "ok"


def test_operator_killed_mid_stage_resumes_without_duplicate_jobs(cluster: Cluster) -> None:
    cluster.apply(cluster.manifest("restart"))
    job = wait_for(
        lambda: cluster.running_job("restart", "rl"), RUN_TIMEOUT, "the rl stage to run", cluster.operator
    )
    cluster.operator.kill()
    # While no operator runs, the stage finishes and nothing creates the next Job.
    wait_for(
        lambda: (cluster.server.get(JOBS, NS, job["metadata"]["name"]).get("status") or {}).get("succeeded"),
        RUN_TIMEOUT,
        "the rl Job to finish without an operator",
    )
    assert cluster.job_names("restart") == ["restart-b-init-a0", "restart-i0-rl-a0"]

    cluster.operator.start()
    cluster.wait_condition("restart", "Succeeded")
    names = cluster.job_names("restart")
    assert names == [
        "restart-b-init-a0",
        "restart-i0-rl-a0",
        "restart-i0-verify-a0",
        "restart-i0-rft-a0",
        "restart-i0-eval-heldout-a0",
    ]
    for stage_job in cluster.jobs("restart"):  # each stage ran exactly once
        record = cluster.kubelet.record(stage_job["metadata"]["name"], NS)
        assert record is not None and len(record.pods) == 1


def test_stage_failing_past_retry_limit_fails_the_run_naming_the_job(cluster: Cluster) -> None:
    # Wrong S3 credentials: every attempt of the first stage fails (retryable: the Secret may be fixed).
    cluster.apply(cluster.manifest("denied", secret="s3-wrong", retry={"limit": 1, "backoffSeconds": 1}))
    failed = cluster.wait_condition("denied", "Failed", timeout=180)
    assert failed["reason"] == "StageFailed"
    assert "denied-b-init-a1" in failed["message"] and "retry.limit 1" in failed["message"]
    assert cluster.job_names("denied") == ["denied-b-init-a0", "denied-b-init-a1"]
    assert all(j["status"].get("failed") == 1 for j in cluster.jobs("denied"))
    history = cluster.run("denied")["status"]["history"]
    assert [(h["job"], h["state"]) for h in history] == [
        ("denied-b-init-a0", "Failed"),
        ("denied-b-init-a1", "Failed"),
    ]
    assert "rejected the credentials" in history[-1]["message"] and "AWS_ACCESS_KEY_ID" in failed["message"]
    found = cluster.wait_events("denied", lambda e: any(r == "StageFailed" for r, _ in e), "StageFailed")
    reasons = [r for r, _ in found]
    assert reasons.count("JobFailed") == 2 and "StageFailed" in reasons
    text = cluster.operator.metrics()
    assert sample(text, "rloop_stage_failures_total", namespace=NS, run="denied", stage="init") == 2
    assert sample(text, "rloop_run_condition", namespace=NS, run="denied", condition="Failed") == 1


def test_suspend_resume_then_delete_cascades_and_keeps_data(cluster: Cluster) -> None:
    cluster.apply(cluster.manifest("pausable"))
    job = wait_for(
        lambda: cluster.running_job("pausable", "rl"), RUN_TIMEOUT, "the rl stage to run", cluster.operator
    )
    name = job["metadata"]["name"]
    cluster.server.patch(RLOOPRUNS, NS, "pausable", {"spec": {"suspend": True}})
    suspended = cluster.wait_condition("pausable", "Suspended", timeout=60)
    assert "spec.suspend" in suspended["message"]
    wait_for(
        lambda: cluster.server.get(JOBS, NS, name)["spec"].get("suspend") is True,
        30,
        "the running Job to be suspended",
        cluster.operator,
    )
    # The kubelet stops the pod of a suspended Job; no new stage starts meanwhile.
    wait_for(lambda: not cluster.server.list(PODS, NS, labels=f"job-name={name}"), 30, "the pod to go")
    assert cluster.job_names("pausable") == ["pausable-b-init-a0", name]
    assert cluster.condition("pausable", "Progressing")["status"] == "False"

    cluster.server.patch(RLOOPRUNS, NS, "pausable", {"spec": {"suspend": False}})
    cluster.wait_condition("pausable", "Suspended", status="False", timeout=60)
    cluster.wait_condition("pausable", "Succeeded")
    assert cluster.server.get(JOBS, NS, name)["spec"].get("suspend") is False
    assert len(cluster.job_names("pausable")) == 5  # the suspended Job resumed; no extra attempt
    cluster.wait_events("pausable", lambda e: {"Suspended", "Resumed"} <= {r for r, _ in e}, "Suspended, Resumed")

    # Deleting the run deletes its Jobs (and their pods); the store keeps every committed artifact.
    keys_before = cluster.store_keys("pausable")
    assert "iter-000/rft/_COMMIT.json" in keys_before
    cluster.server.delete(RLOOPRUNS, NS, "pausable")
    wait_for(lambda: cluster.jobs("pausable") == [], 30, "the run's Jobs to be garbage-collected")
    assert cluster.server.list(PODS, NS, labels=run_selector("pausable")) == []
    assert sorted(cluster.store_keys("pausable")) == sorted(keys_before)
    wait_for(
        lambda: (
            sample(
                cluster.operator.metrics(),
                "rloop_run_condition",
                namespace=NS,
                run="pausable",
                condition="Succeeded",
            )
            is None
        ),
        30,
        "the run's series to be dropped",
    )
