"""Reconcile decisions under faults the cluster causes (issue 9, items 4-7): a Job the API refuses, a
pod that never runs, an eviction, a spec edit after a spec-caused failure. Pure: Observed in, Actions out."""

from __future__ import annotations

import json
from typing import Any

from rloop_operator.conditions import get_condition
from rloop_operator.faults import JOB_REJECTED, Refusal
from rloop_operator.jobs import PodProblem, pod_problem, pod_problems, view_job
from rloop_operator.naming import ANNOTATION_ABANDONED
from rloop_operator.reconcile import reconcile
from tests.unit.operator.test_reconcile import (
    BASE_EVAL,
    IMAGE,
    INIT,
    RL0,
    active,
    cond,
    created,
    failed,
    made,
    name,
    observe,
    run,
    spec_with,
    succeeded,
    ts,
)

DONE = [succeeded(INIT), succeeded(BASE_EVAL)]


def message(actions, type_: str) -> str:
    return get_condition(actions.status["conditions"], type_)["message"]


# ------------------------------------------------------------------------------ item 6: spec edits
def test_a_spec_caused_failure_holds_at_its_generation_and_clears_on_any_edit():
    bad = failed(RL0, 0, at=-5, reason="PodFailurePolicy")  # exit 2, made at generation 1
    first = run([*DONE, bad], generation=1)
    assert cond(first, "Failed") == ("True", "InvalidInput") and first.create_jobs == []
    assert run([*DONE, bad], first.status, generation=1).create_jobs == []  # stays failed
    # The user edits the spec (or reverts an edit): generation 2 gets a fresh attempt, at once.
    edited = run([*DONE, bad], first.status, generation=2)
    assert created(edited) == [name(RL0, 1)] and cond(edited, "Failed")[0] == "False"
    assert edited.create_jobs[0]["metadata"]["annotations"]["rloop.dev/spec-generation"] == "2"


def test_a_cleared_spec_failure_does_not_count_against_the_retry_limit():
    jobs = [*DONE, failed(RL0, 0, at=-500, reason="PodFailurePolicy")]
    retried = failed(RL0, 1, at=-5)
    retried["metadata"]["annotations"]["rloop.dev/spec-generation"] = "2"
    a = run([*jobs, retried], spec=spec_with(retry={"limit": 1, "backoffSeconds": 1}), generation=2)
    assert created(a) == [name(RL0, 2)]  # one failure at this generation: within limit 1


# ------------------------------------------------------------------------ item 4: refused creates
def _refused(actions_or_status, refusal: Refusal, generation: int = 1):
    obs = observe(DONE, status=actions_or_status, generation=generation)
    obs.refused = {name(RL0): refusal}
    return reconcile(obs, default_image=IMAGE)


INVALID = Refusal(422, "Invalid", 'Job.batch "tiny-i0-rl-a0" is invalid: spec.template.spec.priorityClassName: '
                  'Invalid value: "gold": no PriorityClass with name gold was found')
QUOTA = Refusal(403, "Forbidden", 'jobs "tiny-i0-rl-a0" is forbidden: exceeded quota: gpu-quota, requested: '
                'requests.nvidia.com/gpu=8, used: requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=4',
                retry_after=40.0)


def test_an_invalid_job_fails_the_run_naming_the_field_until_the_spec_changes():
    a = _refused(None, INVALID)
    assert cond(a, "Failed") == ("True", JOB_REJECTED)
    text = message(a, "Failed")
    assert "priorityClassName" in text and "tiny-i0-rl-a0" in text and "edit of the spec" in text
    assert ("Warning", JOB_REJECTED, text) in a.events
    assert not any(e[1] == "StageStarted" and "tiny-i0-rl-a0" in e[2] for e in a.events)
    assert all(h["job"] != name(RL0) for h in a.status["history"])
    # Next pass, same generation: not tried again (it would be refused again), nothing else starts.
    again = run(DONE, a.status, generation=1)
    assert again.create_jobs == [] and cond(again, "Failed") == ("True", JOB_REJECTED)
    # An edit (generation 2) tries again.
    edited = run(DONE, a.status, generation=2)
    assert created(edited) == [name(RL0)] and cond(edited, "Failed")[0] == "False"


def test_a_quota_refusal_is_not_progressing_says_why_and_backs_off():
    a = _refused(None, QUOTA)
    assert cond(a, "Progressing") == ("False", "QuotaExceeded") and cond(a, "Failed")[0] == "False"
    assert "exceeded quota: gpu-quota" in message(a, "Progressing")
    assert a.requeue_after == 40.0
    assert any(e[:2] == ("Warning", "QuotaExceeded") and "gpu-quota" in e[2] for e in a.events)
    # Once the backoff is over the next pass simply tries to create the Job again.
    assert created(run(DONE, a.status)) == [name(RL0)]


def test_refusal_classes():
    assert INVALID.permanent and Refusal(400, "BadRequest", "x").permanent
    assert not QUOTA.permanent and QUOTA.kind == "QuotaExceeded"
    assert Refusal(403, "Forbidden", 'User "system:serviceaccount:x" cannot create jobs').kind == "JobCreateForbidden"
    assert Refusal(503, "ServiceUnavailable", "webhook down").kind == "JobCreateFailed"


# ------------------------------------------------------------------------- item 5: pending forever
def stuck(reason: str = "ImagePullBackOff", since: float = -600) -> tuple[dict[str, Any], dict[str, PodProblem]]:
    job = active(RL0)
    job["status"]["ready"] = 0
    return job, {name(RL0): PodProblem(reason, 'Back-off pulling image "reg/trainer:typo"', ts(since))}


def test_a_pod_that_does_not_run_is_named_in_status_and_events():
    job, problems = stuck()
    obs = observe([*DONE, job])
    obs.pod_problems = problems
    a = reconcile(obs, default_image=IMAGE)
    assert cond(a, "Progressing") == ("True", "StagePending")
    assert "ImagePullBackOff" in message(a, "Progressing") and "reg/trainer:typo" in message(a, "Progressing")
    record = next(h for h in a.status["history"] if h["job"] == name(RL0))
    assert record["state"] == "Pending" and record["message"].startswith("not running: ImagePullBackOff")
    assert any(e[:2] == ("Warning", "StagePending") for e in a.events)
    assert a.abandon_jobs == {}
    assert a.requeue_after == 1200.0  # the default 1800 s timeout, 600 s of which have passed
    # The same facts again post no second event.
    obs.status = a.status
    assert not any(e[1] == "StagePending" for e in reconcile(obs, default_image=IMAGE).events)


def test_past_the_pending_timeout_the_attempt_is_stopped_and_then_retried_with_the_reason():
    job, problems = stuck(since=-1900)
    obs = observe([*DONE, job])
    obs.pod_problems = problems
    a = reconcile(obs, default_image=IMAGE)
    patch = a.abandon_jobs[name(RL0)]
    assert patch["spec"] == {"suspend": True}
    record = json.loads(patch["metadata"]["annotations"][ANNOTATION_ABANDONED])
    assert record["reason"] == "ImagePullBackOff" and "pendingTimeoutSeconds" in record["message"]
    # The operator's patch lands: the Job is suspended with the annotation; the attempt has failed.
    job["spec"]["suspend"] = True
    job["metadata"].setdefault("annotations", {})[ANNOTATION_ABANDONED] = patch["metadata"]["annotations"][
        ANNOTATION_ABANDONED
    ]
    view = view_job(job)
    assert view.state == "Failed" and view.detail.startswith("ImagePullBackOff: Back-off pulling image")
    later = run([*DONE, job], a.status, now=obs.now)
    assert later.create_jobs == [] and cond(later, "Progressing") == ("True", "RetryBackoff")
    assert any(e[:2] == ("Warning", "JobFailed") and "ImagePullBackOff" in e[2] for e in later.events)
    assert later.resume_jobs == []  # a stopped attempt is never resumed


def test_a_zero_pending_timeout_waits_forever():
    job, problems = stuck(since=-86_400)
    obs = observe([*DONE, job], spec=spec_with(retry={"pendingTimeoutSeconds": 0}))
    obs.pod_problems = problems
    assert reconcile(obs, default_image=IMAGE).abandon_jobs == {}


def _pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"labels": {"batch.kubernetes.io/job-name": "j"}, "creationTimestamp": ts(-60)},
            "status": status}


def test_pod_problems_read_waiting_unschedulable_and_unready_pods():
    waiting = _pod(phase="Pending", containerStatuses=[
        {"name": "stage", "state": {"waiting": {"reason": "CreateContainerConfigError",
                                                "message": 'secret "s3" not found'}}}])
    assert pod_problem(waiting, "stage") == PodProblem("CreateContainerConfigError", 'secret "s3" not found', ts(-60))
    unschedulable = _pod(phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    assert pod_problem(unschedulable, "stage").reason == "Unschedulable"
    lost = _pod(phase="Running", conditions=[
        {"type": "Ready", "status": "False", "reason": "NodeLost", "lastTransitionTime": ts(-30)}],
        containerStatuses=[{"name": "stage", "ready": False, "state": {"running": {}}}])
    assert pod_problem(lost, "stage") == PodProblem("NodeLost", "", ts(-30))
    healthy = _pod(phase="Running", conditions=[{"type": "Ready", "status": "True"}],
                   containerStatuses=[{"name": "stage", "ready": True, "state": {"running": {}}}])
    assert pod_problem(healthy, "stage") is None
    assert pod_problems([healthy, waiting], "stage") == {"j": pod_problem(waiting, "stage")}


def test_an_active_job_without_a_ready_pod_is_pending_and_one_with_is_running():
    job = active(RL0)
    assert view_job(job).state == "Running"  # no `ready` field (before 1.24): active counts
    job["status"]["ready"] = 0
    assert view_job(job).state == "Pending"
    job["status"]["ready"] = 1
    assert view_job(job).state == "Running"


# ------------------------------------------------------------------------------ item 7: evictions
def evicted(attempt: int, at: float = -5) -> dict[str, Any]:
    job = failed(RL0, attempt, at=at, reason="PodFailurePolicy")
    job["status"]["conditions"][0]["message"] = (
        f"Pod team-a/{name(RL0, attempt)}-x has condition DisruptionTarget matching FailJob rule at index 0"
    )
    return job


def test_an_eviction_restarts_at_once_apart_from_the_retry_limit_and_is_counted():
    spec = spec_with(retry={"limit": 0, "backoffSeconds": 600, "disruptionLimit": 2})
    a = run([*DONE, evicted(0), evicted(1)], spec=spec)
    assert created(a) == [name(RL0, 2)] and cond(a, "Failed")[0] == "False"
    assert a.status["disruptions"] == {"iter-000/rl": 2}
    # One more than the cap fails the run, saying what to do.
    b = run([*DONE, evicted(0), evicted(1), evicted(2)], spec=spec)
    assert cond(b, "Failed") == ("True", "TooManyDisruptions") and b.create_jobs == []
    assert "retry.disruptionLimit 2" in message(b, "Failed")


def test_disruption_counts_outlive_deleted_jobs():
    a = run([*DONE, evicted(0)])
    assert run([*DONE, made(RL0, 1)], a.status).status["disruptions"] == {"iter-000/rl": 1}


def test_an_exit_code_2_is_still_invalid_input_not_a_disruption():
    job = failed(RL0, 0, reason="PodFailurePolicy")
    job["status"]["conditions"][0]["message"] = (
        "Container stage for pod team-a/x failed with exit code 2 matching FailJob rule at index 1"
    )
    assert view_job(job).failure == "invalid"
    assert view_job(evicted(0)).failure == "disrupted"


# ------------------------------------------------------------------------- item 8: ignored settings
def test_settings_the_mode_ignores_are_warned_about_once_per_generation():
    spec = spec_with(mode="rl")
    spec["loop"] = {**spec.get("loop", {}), "rft": {"epochs": 2}}
    first = run([], spec=spec)
    warnings = [e for e in first.events if e[1] == "SpecWarning"]
    assert len(warnings) == 1 and "spec.loop.rft: ignored in mode rl" in warnings[0][2]
    assert not any(e[1] == "SpecWarning" for e in run([], first.status, spec=spec).events)
    assert any(e[1] == "SpecWarning" for e in run([], first.status, spec=spec, generation=2).events)
