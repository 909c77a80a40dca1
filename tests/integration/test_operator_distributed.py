"""A run whose rl stage spans two nodes, end to end through the real operator (DESIGN §4): the operator
makes one Indexed Job of two pods per rl attempt plus the run's headless Service, the test kubelet runs
both pods as local `rloop stage rl` processes (rendezvous on 127.0.0.1, see tests/k8s/kubelet.py), each
starts its worker under torch's elastic agent (gloo on CPU), and the store is a real S3 API (SeaweedFS).

Covered: the run reaches Succeeded with exactly one Job of two pods per rl attempt and the train reward
in its status (node 0's summary); killing one node's pod mid-stage fails the attempt within 60 s (the
Job fails at once and its other pod is terminated), and the next attempt succeeds.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from rloop_operator.naming import COMPLETION_INDEX_ANNOTATION, nodes_service_name
from tests.integration.test_operator_e2e import NS, Cluster, running_cluster, stage_of
from tests.k8s.apiserver import JOBS, PODS, SERVICES
from tests.k8s.kubelet import pod_processes
from tests.k8s.operator import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

RUN_TIMEOUT = 420.0
FAILURE_BOUND = 60.0
"""Seconds from one node's death to the operator recording the attempt as failed (issue 11)."""


@pytest.fixture(scope="module")
def cluster(seaweedfs, tmp_path_factory):
    with running_cluster(seaweedfs, tmp_path_factory.mktemp("operator-distributed"), "dist") as c:
        yield c


def two_node_run(cluster: Cluster, name: str, **spec: Any) -> dict[str, Any]:
    doc = cluster.manifest(name, resources={"rl": {"nodes": 2}}, **spec)
    doc["spec"]["loop"]["rl"]["steps"] = 2
    doc["spec"]["loop"]["rft"]["maxSteps"] = 2
    return doc


def rl_jobs(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [j for j in cluster.jobs(name) if stage_of(j).endswith(".rl")]


def node_pods(cluster: Cluster, job: str) -> dict[int, dict[str, Any]]:
    pods = cluster.server.list(PODS, NS, labels={"job-name": job})
    return {int(p["metadata"]["annotations"][COMPLETION_INDEX_ANNOTATION]): p for p in pods}


def assert_one_indexed_job_of_two_pods(cluster: Cluster, job: dict[str, Any]) -> None:
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert job["status"]["succeeded"] == 2 and job["status"]["completedIndexes"] == "0-1"
    record = cluster.kubelet.record(name, NS)
    assert record is not None and sorted(p.index for p in record.pods) == [0, 1]  # one pod per node, once
    assert all(p.exit_code == 0 for p in record.pods)
    assert sorted(node_pods(cluster, name)) == [0, 1]


def test_an_rl_stage_on_two_nodes_is_one_indexed_job_per_attempt_and_the_run_succeeds(cluster: Cluster) -> None:
    cluster.apply(two_node_run(cluster, "twonodes"))
    t0 = time.monotonic()
    cluster.wait_condition("twonodes", "Succeeded", timeout=RUN_TIMEOUT)
    elapsed = time.monotonic() - t0

    (rl,) = rl_jobs(cluster, "twonodes")
    assert rl["metadata"]["name"] == "twonodes-i0-rl-a0"
    assert_one_indexed_job_of_two_pods(cluster, rl)
    assert rl["spec"]["template"]["spec"]["subdomain"] == nodes_service_name("twonodes")
    # The other stages are single pods, as without nodes.
    for job in cluster.jobs("twonodes"):
        if job is not rl and not stage_of(job).endswith(".rl"):
            assert "completionMode" not in job["spec"] and job["status"]["succeeded"] == 1
    service = cluster.server.get(SERVICES, NS, nodes_service_name("twonodes"))
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["uid"] == cluster.run("twonodes")["metadata"]["uid"]

    status = cluster.run("twonodes")["status"]
    assert "trainReward" in status["metrics"]  # node 0's summary, through its termination message
    assert "iter-000/rl/_COMMIT.json" in cluster.store_keys("twonodes")
    record = cluster.kubelet.record(rl["metadata"]["name"], NS)
    rl_seconds = max(p.finished for p in record.pods) - min(p.started for p in record.pods)
    print(f"\nrun with a two-node rl stage: {elapsed:.1f} s; the rl attempt's pods: {rl_seconds:.1f} s")


def both_nodes_training(cluster: Cluster, name: str) -> dict[str, Any] | None:
    """The rl attempt's Job once both its pods run and each has started its worker process (the
    elastic agent plus at least one child): the nodes are past start-up, into the stage itself."""
    for job in rl_jobs(cluster, name):
        status = job.get("status") or {}
        if status.get("ready") != 2 or status.get("failed"):
            continue
        record = cluster.kubelet.record(job["metadata"]["name"], NS)
        pods = [p for p in (record.pods if record else []) if p.exit_code is None]
        if len(pods) == 2 and all(len(pod_processes(p.marker)) >= 2 for p in pods):
            return job
    return None


def attempt_state(cluster: Cluster, name: str, job: str) -> str | None:
    history = (cluster.run(name) or {}).get("status", {}).get("history") or []
    return next((h["state"] for h in history if h["job"] == job), None)


def test_killing_one_node_fails_the_attempt_within_a_minute_and_the_next_attempt_succeeds(cluster: Cluster) -> None:
    cluster.apply(two_node_run(cluster, "nodeloss", retry={"limit": 2, "backoffSeconds": 1}))
    job = wait_for(lambda: both_nodes_training(cluster, "nodeloss"), RUN_TIMEOUT, "both rl nodes training",
                   cluster.operator)
    first = job["metadata"]["name"]
    assert first == "nodeloss-i0-rl-a0"

    t0 = time.monotonic()
    killed = cluster.kubelet.kill_pod(first, 1, signal.SIGKILL, namespace=NS)  # node 1 is lost
    wait_for(lambda: attempt_state(cluster, "nodeloss", first) == "Failed", FAILURE_BOUND,
             "the operator to record the rl attempt as failed", cluster.operator)
    detected = time.monotonic() - t0
    assert detected < FAILURE_BOUND
    failed_job = cluster.server.get(JOBS, NS, first)
    assert failed_job["status"]["failed"] == 1
    # Node 0 was terminated with the Job (the Job controller deletes a failed Job's other pods).
    record = cluster.kubelet.record(first, NS)
    node0 = next(p for p in record.pods if p.index == 0)
    wait_for(lambda: node0.exit_code is not None and not pod_processes(node0.marker), 30,
             "node 0's processes to end", cluster.operator)
    assert sorted(node_pods(cluster, first)) == [1] and killed.exit_code == 128 + signal.SIGKILL

    cluster.wait_condition("nodeloss", "Succeeded", timeout=RUN_TIMEOUT)
    jobs = rl_jobs(cluster, "nodeloss")
    assert [j["metadata"]["name"] for j in jobs] == [first, "nodeloss-i0-rl-a1"]
    assert_one_indexed_job_of_two_pods(cluster, jobs[1])
    history = cluster.run("nodeloss")["status"]["history"]
    assert [(h["job"], h["state"]) for h in history if h["stage"].endswith("/rl")] == [
        (first, "Failed"), ("nodeloss-i0-rl-a1", "Succeeded")]
    print(f"\nnode 1 killed: the operator recorded the failed attempt after {detected:.1f} s")
