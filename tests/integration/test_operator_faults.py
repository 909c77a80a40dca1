"""Cluster faults through the real operator, the API emulator, the test kubelet and SeaweedFS (issue 9,
items 3, 5, 6, 7): a pod that never starts, an eviction mid-stage, a run re-created under the same name,
a spec edit that is reverted. Same harness as test_operator_e2e.py; each run is the small one-iteration
run, and every wait is bounded.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.test_operator_e2e import (
    NS,
    RUN_TIMEOUT,
    Cluster,
    cluster,  # noqa: F401  (module-scoped fixture: a cluster of our own)
)
from tests.k8s.apiserver import JOBS, RLOOPRUNS
from tests.k8s.operator import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(1200)]


def _history(target: Cluster, name: str) -> list[dict]:
    return ((target.run(name) or {}).get("status") or {}).get("history") or []


def test_a_pod_that_never_starts_is_named_stopped_and_retried_and_an_eviction_restarts_the_stage(
    cluster: Cluster,  # noqa: F811
) -> None:
    # Two runs side by side: one whose Secret does not exist yet, one that gets evicted mid-rl.
    stuck = cluster.manifest("no-secret", secret="s3-later",
                             retry={"limit": 20, "backoffSeconds": 1, "pendingTimeoutSeconds": 3})
    evicted = cluster.manifest("evicted", retry={"limit": 0, "backoffSeconds": 600})
    cluster.apply(stuck, evicted)

    # The pod's waiting reason reaches the status and an Event.
    def pending_reason():
        c = cluster.condition("no-secret", "Progressing")
        return c if c and c["reason"] == "StagePending" and "CreateContainerConfigError" in c["message"] else None

    wait_for(pending_reason, 120, "no-secret: Progressing=StagePending naming the waiting reason", cluster.operator)
    cluster.wait_events("no-secret", lambda e: any(r == "StagePending" and "CreateContainerConfigError" in m for r, m in e),
                        "StagePending naming CreateContainerConfigError")
    # Past retry.pendingTimeoutSeconds the attempt is stopped, fails with that reason, and is retried.
    wait_for(lambda: "no-secret-b-init-a1" in cluster.job_names("no-secret"), 60, "a second attempt",
             cluster.operator)
    first = cluster.server.get(JOBS, NS, "no-secret-b-init-a0")
    assert first["spec"]["suspend"] is True
    assert json.loads(first["metadata"]["annotations"]["rloop.dev/abandoned"])["reason"] == (
        "CreateContainerConfigError"
    )
    cluster.wait_events("no-secret", lambda e: any(r == "JobFailed" and "CreateContainerConfigError" in m for r, m in e),
                        "JobFailed naming CreateContainerConfigError")

    # Meanwhile the other run reaches rl: evict its pod (a drained node, a preemption).
    rl = wait_for(lambda: cluster.running_job("evicted", "rl"), RUN_TIMEOUT, "evicted: rl to run",
                  cluster.operator)
    cluster.kubelet.evict(rl["metadata"]["name"], NS)
    # The Secret appears: the stuck run proceeds on its next attempt.
    cluster.server.create_secret(NS, "s3-later", cluster.s3.env())
    cluster.wait_condition("evicted", "Succeeded")
    status = cluster.run("evicted")["status"]
    assert status["disruptions"] == {"iter-000/rl": 1}
    assert cluster.job_names("evicted")[:3] == ["evicted-b-init-a0", "evicted-i0-rl-a0", "evicted-i0-rl-a1"]
    gone = cluster.server.get(JOBS, NS, "evicted-i0-rl-a0")
    failed = next(c for c in gone["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy" and "DisruptionTarget" in failed["message"]
    # retry.limit is 0 and backoff 600 s: the eviction was neither counted nor delayed.

    cluster.wait_condition("no-secret", "Succeeded")
    states = [(h["job"], h["state"]) for h in _history(cluster, "no-secret") if "b-init" in h["job"]]
    assert states[0] == ("no-secret-b-init-a0", "Failed") and states[-1][1] == "Succeeded"


def test_a_recreated_run_resumes_when_its_spec_is_the_same_and_fails_clearly_when_not(
    cluster: Cluster,  # noqa: F811
) -> None:
    cluster.apply(cluster.manifest("again"))
    cluster.wait_condition("again", "Succeeded")
    first = cluster.run("again")["status"]["committed"]

    def delete() -> None:
        cluster.server.delete(RLOOPRUNS, NS, "again")
        wait_for(lambda: cluster.jobs("again") == [], 30, "the run's Jobs to be garbage-collected")

    # Same name, same spec: every stage finds its commit in the store and exits at once.
    delete()
    keys = sorted(cluster.store_keys("again"))
    cluster.apply(cluster.manifest("again"))
    cluster.wait_condition("again", "Succeeded")
    second = cluster.run("again")["status"]["committed"]
    assert sorted(second) == sorted(first)
    digests = {k: v["digest"] for k, v in first.items() if "digest" in v}
    assert digests and {k: second[k].get("digest") for k in digests} == digests
    for job in cluster.jobs("again"):
        summary = json.loads(cluster.kubelet.record(job["metadata"]["name"], NS).last.message)
        assert summary["already_committed"] is True, job["metadata"]["name"]
    assert sorted(cluster.store_keys("again")) == keys

    # Same name, another learning rate: the first stage refuses to mix the two, naming the field and the
    # ways out; nothing in the store changes.
    delete()
    other = cluster.manifest("again")
    lr = other["spec"]["loop"]["rl"].get("lr", 1e-3)
    other["spec"]["loop"]["rl"]["lr"] = lr * 2
    cluster.apply(other)
    failed = cluster.wait_condition("again", "Failed", timeout=180)
    assert failed["reason"] == "InvalidInput"
    assert "spec.loop.rl.lr" in failed["message"] and "another metadata.name" in failed["message"]
    assert sorted(cluster.store_keys("again")) == keys

    # Reverting the edit (a new generation) clears the spec-caused failure: the run resumes and succeeds.
    cluster.server.patch(RLOOPRUNS, NS, "again", {"spec": {"loop": {"rl": {"lr": lr}}}})
    cluster.wait_condition("again", "Failed", status="False", timeout=60)
    cluster.wait_condition("again", "Succeeded")
    assert "again-b-init-a1" in cluster.job_names("again")  # a fresh attempt, at the new generation


def test_jobs_deleted_mid_run_are_never_replanned(cluster: Cluster) -> None:  # noqa: F811
    """`kubectl delete jobs --all` (or a TTL policy) while a run is in flight: status.committed keeps
    the record, so committed stages are not run again."""
    cluster.apply(cluster.manifest("pruned"))
    wait_for(lambda: cluster.running_job("pruned", "verify") or cluster.running_job("pruned", "rft"),
             RUN_TIMEOUT, "pruned: a stage after rl to run", cluster.operator)
    for name in ("pruned-b-init-a0", "pruned-i0-rl-a0"):
        cluster.server.delete(JOBS, NS, name)
    cluster.wait_condition("pruned", "Succeeded")
    names = cluster.job_names("pruned")
    assert not any("b-init" in n or "i0-rl" in n for n in names), names  # never made again
    assert {"base/init", "iter-000/rl"} <= set(cluster.run("pruned")["status"]["committed"])
