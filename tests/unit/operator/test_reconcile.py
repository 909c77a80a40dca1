"""The pure reconcile core, driven with plain Job dicts the way the API would return them."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rloop.plan import Stage, all_stages
from rloop.spec import parse_spec
from rloop_operator.builders import build_job
from rloop_operator.conditions import get_condition
from rloop_operator.jobs import format_time
from rloop_operator.naming import ANNOTATION_SUSPENDED, LABEL_KUEUE_QUEUE, job_name
from rloop_operator.reconcile import (
    HISTORY_LIMIT,
    MISSING_STORAGE_URI,
    Actions,
    Observed,
    reconcile,
    retry_delay,
    status_patch,
)

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
IMAGE = "reg/rloop-trainer:1"
RUN, NS, UID = "tiny", "team-a", "uid-1"
RUN_URI = "s3://bucket/runs/team-a/tiny"
SPEC: dict[str, Any] = {
    "model": {"base": "builtin:tiny"},
    "data": {"train": {"synthetic": {}}, "eval": [{"name": "heldout", "synthetic": {"split": "heldout"}}]},
    "loop": {"iterations": 2},
    "storage": {"uri": "s3://bucket/runs"},
    "retry": {"limit": 2, "backoffSeconds": 30},
}
STAGES = all_stages(parse_spec(SPEC))  # 10: init, base eval, then rl/verify/rft/eval per iteration
INIT, BASE_EVAL, RL0, VERIFY0 = (
    Stage("init"),
    Stage("eval", None, "heldout"),
    Stage("rl", 0),
    Stage("verify", 0),
)


def ts(seconds_from_now: float) -> str:
    return format_time(NOW + timedelta(seconds=seconds_from_now))


def spec_with(**patch: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SPEC)
    doc.update(patch)
    return doc


def made(stage: Stage, attempt: int = 0, spec: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    """A Job as the operator creates it and the API returns it (no status yet), at run generation 1."""
    job = build_job(
        RUN, NS, UID, parse_spec(spec or SPEC), stage, attempt, run_uri=RUN_URI, default_image=IMAGE,
        generation=generation,
    )
    job["metadata"]["creationTimestamp"] = ts(-3600)
    return job


def active(stage: Stage, attempt: int = 0) -> dict[str, Any]:
    job = made(stage, attempt)
    job["status"] = {"active": 1, "startTime": ts(-600)}
    return job


def succeeded(stage: Stage, attempt: int = 0, at: float = -60) -> dict[str, Any]:
    job = made(stage, attempt)
    job["status"] = {
        "succeeded": 1,
        "startTime": ts(at - 100),
        "completionTime": ts(at),
        "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": ts(at)}],
    }
    return job


def failed(
    stage: Stage, attempt: int = 0, at: float = -60, reason: str = "BackoffLimitExceeded"
) -> dict[str, Any]:
    job = made(stage, attempt)
    job["status"] = {
        "failed": 1,
        "startTime": ts(at - 100),
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": ts(at),
            }
        ],
    }
    return job


def name(stage: Stage, attempt: int = 0) -> str:
    return job_name(RUN, stage, attempt)


def observe(jobs=(), status=None, spec=None, messages=None, now=NOW, generation=1) -> Observed:
    return Observed(
        RUN,
        NS,
        UID,
        generation,
        copy.deepcopy(spec if spec is not None else SPEC),
        copy.deepcopy(status or {}),
        copy.deepcopy(list(jobs)),
        dict(messages or {}),
        now,
    )


def run(*args, **kw) -> Actions:
    return reconcile(observe(*args, **kw), default_image=IMAGE)


def cond(actions: Actions, type_: str) -> tuple[str, str]:
    c = get_condition(actions.status["conditions"], type_)
    return c["status"], c["reason"]


def created(actions: Actions) -> list[str]:
    return [j["metadata"]["name"] for j in actions.create_jobs]


def all_done(extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return [succeeded(s, 0, at=-1000 + 10 * i) for i, s in enumerate(STAGES)]


# ------------------------------------------------------------------------------------------ start
def test_new_run_creates_init_attempt_0_and_is_progressing():
    a = run()
    assert created(a) == ["tiny-b-init-a0"]
    assert a.create_jobs[0] == made(INIT) | {
        "metadata": {k: v for k, v in made(INIT)["metadata"].items() if k != "creationTimestamp"}
    }
    assert [c["type"] for c in a.status["conditions"]] == [
        "Ready",
        "Progressing",
        "Succeeded",
        "Failed",
        "Suspended",
    ]
    assert cond(a, "Progressing") == ("True", "StageRunning")
    assert {cond(a, t)[0] for t in ("Ready", "Succeeded", "Failed", "Suspended")} == {"False"}
    assert all(
        c["lastTransitionTime"] == ts(0) and c["observedGeneration"] == 1 for c in a.status["conditions"]
    )
    assert a.status["observedGeneration"] == 1
    assert a.status["stage"] == "base/init" and "iteration" not in a.status
    assert a.status["history"] == [
        {"stage": "base/init", "attempt": 0, "job": "tiny-b-init-a0", "state": "Pending"}
    ]
    assert a.status["artifacts"] == {"runUri": RUN_URI}
    assert a.status["metrics"] == {}
    assert a.events == [("Normal", "StageStarted", "stage base/init: created Job tiny-b-init-a0 (attempt 0)")]
    assert a.status_changed and a.requeue_after is None
    assert not a.suspend_jobs and not a.resume_jobs


def test_reconcile_is_idempotent():
    first = run()
    jobs = [copy.deepcopy(j) for j in first.create_jobs]  # the API now returns the created Job, pending
    second = reconcile(observe(jobs, first.status, now=NOW + timedelta(minutes=5)), default_image=IMAGE)
    assert second.create_jobs == [] and second.events == []
    assert second.status == first.status and not second.status_changed
    # Once it runs, the history says so (one legitimate change), and then nothing changes again.
    third = run([active(INIT)], second.status)
    assert third.create_jobs == [] and third.status_changed
    assert third.status["history"][0]["state"] == "Running"
    fourth = run([active(INIT)], third.status, now=NOW + timedelta(hours=1))
    assert not fourth.status_changed and fourth.events == [] and fourth.create_jobs == []


def test_running_job_creates_nothing():
    a = run([active(INIT)])
    assert a.create_jobs == [] and cond(a, "Progressing") == ("True", "StageRunning")
    assert "tiny-b-init-a0" in get_condition(a.status["conditions"], "Progressing")["message"]


def test_init_succeeded_starts_base_eval_and_the_first_rl():
    before = run([active(INIT)])
    msg = {name(INIT): json.dumps({"stage": "base/init", "seconds": 3.2, "warmup_last_loss": 0.5})}
    a = run([succeeded(INIT)], before.status, messages=msg)
    assert created(a) == ["tiny-b-eval-heldout-a0", "tiny-i0-rl-a0"]
    assert a.status["stage"] == "base/eval/heldout"
    assert a.status["artifacts"]["latestPolicy"] == f"{RUN_URI}/base/init/policy"
    assert ("Normal", "StageSucceeded", "stage base/init: Job tiny-b-init-a0 succeeded") in a.events
    assert [e[1] for e in a.events].count("StageStarted") == 2
    cmd = a.create_jobs[1]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd == ["rloop", "stage", "rl", "--run", RUN_URI, "--iteration", "0"]


# ------------------------------------------------------------------------------------------ retries
def test_failure_under_the_limit_waits_for_the_backoff():
    oom = {name(INIT): "Traceback ...\nRuntimeError: CUDA out of memory"}  # a log tail, not JSON
    a = run([failed(INIT, 0, at=-10)], messages=oom)
    assert a.create_jobs == []
    assert a.requeue_after == pytest.approx(20.0)
    assert cond(a, "Progressing") == ("True", "RetryBackoff")
    assert cond(a, "Failed") == ("False", "Running")
    assert "tiny-b-init-a1" in get_condition(a.status["conditions"], "Progressing")["message"]
    assert a.status["history"][0] == {
        "stage": "base/init",
        "attempt": 0,
        "job": "tiny-b-init-a0",
        "state": "Failed",
        "startTime": ts(-110),
        "endTime": ts(-10),
        "message": "RuntimeError: CUDA out of memory",
    }
    assert a.events == [
        (
            "Warning",
            "JobFailed",
            "stage base/init: Job tiny-b-init-a0 failed: RuntimeError: CUDA out of memory",
        )
    ]
    again = run([failed(INIT, 0, at=-10)], a.status, messages=oom, now=NOW + timedelta(seconds=5))
    assert again.events == [] and not again.status_changed and again.requeue_after == pytest.approx(15.0)


def test_after_the_backoff_the_next_attempt_is_created_and_the_delay_doubles():
    a = run([failed(INIT, 0, at=-31)])
    assert created(a) == ["tiny-b-init-a1"] and a.requeue_after is None
    assert a.events[-1] == (
        "Normal",
        "StageStarted",
        "stage base/init: created Job tiny-b-init-a1 (attempt 1)",
    )
    b = run([failed(INIT, 0, at=-200), failed(INIT, 1, at=-31)])
    assert b.create_jobs == [] and b.requeue_after == pytest.approx(29.0)  # 60 s after the second failure
    assert retry_delay(parse_spec(SPEC), 1) == 30 and retry_delay(parse_spec(SPEC), 3) == 120


def test_failures_past_the_retry_limit_fail_the_run_naming_the_job():
    jobs = [failed(INIT, 0, at=-500), failed(INIT, 1, at=-300), failed(INIT, 2, at=-100)]
    a = run(jobs, messages={name(INIT, 2): json.dumps({"error": "StoreError", "message": "bucket gone"})})
    assert a.create_jobs == []
    assert cond(a, "Failed") == ("True", "StageFailed")
    assert cond(a, "Ready") == ("False", "StageFailed") and cond(a, "Progressing")[0] == "False"
    message = get_condition(a.status["conditions"], "Failed")["message"]
    assert "tiny-b-init-a2" in message and "base/init" in message and "bucket gone" in message
    assert a.status["stage"] == "base/init"
    assert ("Warning", "StageFailed", message) in a.events
    again = run(
        jobs,
        a.status,
        messages={name(INIT, 2): json.dumps({"error": "StoreError", "message": "bucket gone"})},
    )
    assert again.events == [] and not again.status_changed


def _unavailable(stage: Stage, attempt: int) -> str:
    return json.dumps({"stage": stage.id, "error": "StoreUnavailable",
                       "message": f"store s3://bucket/runs: EndpointConnectionError (attempt {attempt})"})


def test_store_outages_are_retried_on_their_own_budget_with_the_reason_in_status():
    """Exit 69 (store unavailable) does not use up retry.limit (2 here): 5 outages in a row still retry,
    and Progressing says why."""
    jobs = [failed(INIT, i, at=-1000 + 100 * i) for i in range(4)] + [failed(INIT, 4, at=-10)]
    messages = {name(INIT, i): _unavailable(INIT, i) for i in range(5)}
    a = run(jobs, messages=messages)
    assert cond(a, "Failed") == ("False", "Running")
    assert cond(a, "Progressing") == ("True", "StoreUnavailable")
    progressing = get_condition(a.status["conditions"], "Progressing")["message"]
    assert "could not reach the store" in progressing and "EndpointConnectionError (attempt 4)" in progressing
    assert a.create_jobs == [] and a.requeue_after == pytest.approx(50.0)  # fixed 60 s after the outage
    # once the fixed backoff has passed, the next attempt starts
    later = run(jobs, messages=messages, now=NOW + timedelta(seconds=120))
    assert created(later) == ["tiny-b-init-a5"]


def test_an_outage_does_not_hide_earlier_failures_and_a_long_one_fails_the_run():
    from rloop_operator.reconcile import STORE_UNAVAILABLE_LIMIT

    n = STORE_UNAVAILABLE_LIMIT + 1
    jobs = [failed(INIT, i, at=-10_000 + 100 * i) for i in range(n)]
    a = run(jobs, messages={name(INIT, i): _unavailable(INIT, i) for i in range(n)})
    assert cond(a, "Failed") == ("True", "StoreUnavailable")
    assert f"unavailable through {n} attempts" in get_condition(a.status["conditions"], "Failed")["message"]
    # an ordinary failure after an outage counts against retry.limit as usual
    mixed = [failed(INIT, 0, at=-900), failed(INIT, 1, at=-800), failed(INIT, 2, at=-700), failed(INIT, 3, at=-600)]
    b = run(mixed, messages={name(INIT, 1): _unavailable(INIT, 1)})
    assert cond(b, "Failed") == ("True", "StageFailed")  # 3 ordinary failures > limit 2


def test_raising_the_retry_limit_revives_a_failed_run():
    jobs = [failed(INIT, 0, at=-500), failed(INIT, 1, at=-300), failed(INIT, 2, at=-121)]
    assert cond(run(jobs), "Failed") == ("True", "StageFailed")
    a = run(
        jobs, run(jobs).status, spec=spec_with(retry={"limit": 5, "backoffSeconds": 30})
    )  # 120 s after a2
    assert created(a) == ["tiny-b-init-a3"] and cond(a, "Failed")[0] == "False"


@pytest.mark.parametrize("how", ["podFailurePolicy", "terminationMessage"])
def test_invalid_input_fails_at_once(how):
    job = failed(
        RL0, 0, at=-5, reason="PodFailurePolicy" if how == "podFailurePolicy" else "BackoffLimitExceeded"
    )
    msg = {
        name(RL0): json.dumps({"stage": "iter-000/rl", "error": "InvalidInput", "message": "bad prompt file"})
    }
    a = run(
        [succeeded(INIT), succeeded(BASE_EVAL), job], messages=msg if how == "terminationMessage" else None
    )
    assert a.create_jobs == [] and a.requeue_after is None
    assert cond(a, "Failed") == ("True", "InvalidInput")
    message = get_condition(a.status["conditions"], "Failed")["message"]
    assert "tiny-i0-rl-a0" in message and "iter-000/rl" in message
    assert ("Warning", "InvalidInput", message) in a.events


def test_a_permanent_failure_starts_nothing_else():
    jobs = [succeeded(INIT), failed(BASE_EVAL, 0, reason="PodFailurePolicy")]
    a = run(jobs)  # iter-000/rl is ready too, but a failed run starts no new stage
    assert a.create_jobs == [] and cond(a, "Failed") == ("True", "InvalidInput")


def test_corrupt_input_reruns_the_producer_first():
    jobs = [
        succeeded(INIT, at=-900),
        succeeded(BASE_EVAL, at=-800),
        succeeded(RL0, at=-700),
        failed(VERIFY0, 0, at=-100),
    ]
    corrupt = json.dumps(
        {
            "stage": "iter-000/verify",
            "error": "CorruptInput",
            "message": f"{RUN_URI}/iter-000/rl/pool/trajectories.parquet: sha256 mismatch",
        }
    )
    a = run(jobs, messages={name(VERIFY0): corrupt})
    assert created(a) == ["tiny-i0-rl-a1"]  # the producer again, not the consumer
    b = run([*jobs, succeeded(RL0, 1, at=-50)], a.status, messages={name(VERIFY0): corrupt})
    assert created(b) == ["tiny-i0-verify-a1"]  # the failure counted once: 30 s backoff from -100


def test_jobs_of_other_runs_or_owners_are_ignored():
    other_run = made(INIT)
    other_run["metadata"]["labels"]["rloop.dev/run"] = "other"
    old_owner = succeeded(INIT)
    old_owner["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-deleted-run"
    a = run([other_run, old_owner, {"metadata": {"name": "x"}}, "garbage"])
    assert created(a) == ["tiny-b-init-a0"] and len(a.status["history"]) == 1


def test_deleted_jobs_never_replan_committed_stages():
    """`kubectl delete jobs --all`, a TTL policy or a restore with new UIDs: the status's commit records
    are the record of progress, so nothing committed is planned again and the run carries on."""
    done = [succeeded(INIT, 0, at=-300), succeeded(BASE_EVAL, 0, at=-200), succeeded(RL0, 0, at=-100)]
    digest = {name(RL0): json.dumps({"stage": RL0.id, "train_reward_last10pct": 0.5, "manifest_sha256": "ab" * 32})}
    a = run(done, messages=digest)
    assert created(a) == ["tiny-i0-verify-a0"]
    assert set(a.status["committed"]) == {"base/init", "base/eval/heldout", "iter-000/rl"}
    assert a.status["committed"]["iter-000/rl"] == {"job": name(RL0), "time": ts(-100), "digest": "ab" * 32}
    assert a.status["metrics"]["trainReward"] == 0.5
    # every Job deleted (the verify Job never got to exist either)
    b = run([], a.status)
    assert created(b) == ["tiny-i0-verify-a0"]  # not base/init again
    assert b.status["committed"] == a.status["committed"] and b.status["metrics"]["trainReward"] == 0.5
    assert [h["stage"] for h in b.status["history"]] == ["iter-000/verify"]  # old attempts went with their Jobs
    # Jobs of a deleted run of the same name (another owner UID) are no evidence either way
    stale = succeeded(VERIFY0)
    stale["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-deleted-run"
    assert created(run([stale], a.status)) == ["tiny-i0-verify-a0"]


def test_a_recorded_commit_blamed_later_is_made_again():
    done = [succeeded(INIT, 0, at=-300), succeeded(BASE_EVAL, 0, at=-200), succeeded(RL0, 0, at=-100)]
    a = run(done)
    corrupt = json.dumps({"error": "CorruptInput", "message": f"s3://bucket/runs/team-a/tiny/{RL0.id}/pool/x: sha256"})
    b = run([failed(VERIFY0, 0, at=-10)], a.status, messages={name(VERIFY0): corrupt})  # rl's Job is gone
    assert "iter-000/rl" not in b.status["committed"]
    assert created(b) == ["tiny-i0-rl-a0"]  # the name is free again: its Job was deleted


# ------------------------------------------------------------------------------------------ spec
@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({k: v for k, v in SPEC.items() if k != "model"}, "spec.model"),
        (spec_with(loop={"iterations": 0}), "spec.loop.iterations"),
        (spec_with(storage={}), MISSING_STORAGE_URI),
        (spec_with(bogus=1), "spec.bogus"),
    ],
)
def test_invalid_spec_fails_naming_the_field(spec, field):
    a = run(spec=spec)
    assert a.create_jobs == [] and not a.suspend_jobs and not a.resume_jobs
    assert cond(a, "Failed") == ("True", "InvalidSpec")
    assert cond(a, "Ready") == ("False", "InvalidSpec") and cond(a, "Progressing")[0] == "False"
    message = get_condition(a.status["conditions"], "Failed")["message"]
    assert field in message
    assert a.events == [("Warning", "InvalidSpec", message)]
    again = run(spec=spec, status=a.status)
    assert again.events == [] and not again.status_changed


def test_invalid_spec_mid_run_keeps_the_progress_already_reported():
    good = run([succeeded(INIT), active(RL0)])
    bad = run([succeeded(INIT), active(RL0)], good.status, spec=spec_with(storage={}))
    assert bad.status["stage"] == good.status["stage"] and bad.status["artifacts"] == good.status["artifacts"]
    assert [h["job"] for h in bad.status["history"]] == ["tiny-b-init-a0", "tiny-i0-rl-a0"]
    fixed = run([succeeded(INIT), active(RL0)], bad.status)
    assert cond(fixed, "Failed") == ("False", "Running")


# ------------------------------------------------------------------------------------------ suspend
def test_suspend_suspends_the_running_job_and_starts_nothing():
    running = run([active(INIT)])
    a = run([active(INIT)], running.status, spec=spec_with(suspend=True))
    assert a.suspend_jobs == ["tiny-b-init-a0"] and a.create_jobs == [] and a.resume_jobs == []
    assert cond(a, "Suspended") == ("True", "Suspended")
    assert cond(a, "Progressing") == ("False", "Suspended") and cond(a, "Ready")[0] == "False"
    assert [e[1] for e in a.events] == ["Suspended"]
    suspended = active(INIT)
    suspended["spec"]["suspend"] = True
    suspended["metadata"]["annotations"] = {ANNOTATION_SUSPENDED: "true"}
    suspended["status"] = {}
    b = run([suspended], a.status, spec=spec_with(suspend=True))
    assert b.suspend_jobs == [] and b.events == [] and b.status["history"][0]["state"] == "Pending"
    c = run([suspended], b.status, spec=spec_with(suspend=True))
    assert c.suspend_jobs == [] and c.events == [] and not c.status_changed


def test_suspended_new_run_creates_nothing():
    a = run(spec=spec_with(suspend=True))
    assert a.create_jobs == [] and cond(a, "Suspended")[0] == "True" and a.requeue_after is None


def test_unsuspend_resumes_what_the_operator_suspended_but_leaves_kueue_alone():
    mine = made(INIT)
    mine["spec"]["suspend"] = True
    mine["metadata"]["annotations"] = {ANNOTATION_SUSPENDED: "true"}
    kueue_waiting = made(BASE_EVAL, spec=spec_with(queueName="q"))
    kueue_waiting["spec"]["suspend"] = True  # Kueue's webhook did this; Kueue releases it on admission
    assert LABEL_KUEUE_QUEUE in kueue_waiting["metadata"]["labels"]
    plain = made(RL0)
    plain["spec"]["suspend"] = True
    suspended = run([mine, kueue_waiting, plain], spec=spec_with(suspend=True))
    a = run([mine, kueue_waiting, plain], suspended.status)
    assert a.resume_jobs == ["tiny-b-init-a0", "tiny-i0-rl-a0"] and a.suspend_jobs == []
    assert cond(a, "Suspended") == ("False", "Running")
    assert ("Normal", "Resumed", "spec.suspend is false: stage Jobs resume") in a.events


# ------------------------------------------------------------------------------------------ finish
def test_all_stages_succeeded():
    before = run([succeeded(s) for s in STAGES[:-1]] + [active(STAGES[-1])])
    a = run(all_done(), before.status)
    assert a.create_jobs == []
    assert cond(a, "Succeeded") == ("True", "Succeeded") and cond(a, "Ready") == ("True", "Succeeded")
    assert cond(a, "Progressing") == ("False", "Succeeded") and cond(a, "Failed")[0] == "False"
    assert a.status["stage"] == "Finished" and a.status["iteration"] == 1
    assert a.status["artifacts"] == {"runUri": RUN_URI, "latestPolicy": f"{RUN_URI}/iter-001/rft/policy"}
    assert [e[1] for e in a.events] == ["StageSucceeded", "RunSucceeded"]
    again = run(all_done(), a.status)
    assert again.events == [] and not again.status_changed


def test_rl_mode_latest_policy_is_the_rl_end_policy():
    spec = spec_with(mode="rl")
    jobs = [succeeded(s) for s in all_stages(parse_spec(spec))[:3]]  # init, base eval, iter-000/rl
    a = run(jobs, spec=spec)
    assert a.status["artifacts"]["latestPolicy"] == f"{RUN_URI}/iter-000/rl/final"


def test_history_is_bounded_to_the_latest_attempts():
    jobs = []
    for i, s in enumerate(STAGES):
        jobs += [failed(s, 0, at=-5000 + i), failed(s, 1, at=-4000 + i), succeeded(s, 2, at=-3000 + i)]
    a = run(jobs)
    assert len(jobs) == 30 and len(a.status["history"]) == HISTORY_LIMIT
    assert a.status["history"][-1] == {
        "stage": "iter-001/eval/heldout",
        "attempt": 2,
        "job": "tiny-i1-eval-heldout-a2",
        "state": "Succeeded",
        "startTime": ts(-3091),
        "endTime": ts(-2991),
    }
    assert a.status["history"][0]["stage"] == "iter-000/verify"
    assert cond(a, "Succeeded")[0] == "True"


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_come_from_the_latest_termination_messages():
    rl1, ev0, ev1 = Stage("rl", 1), Stage("eval", 0, "heldout"), Stage("eval", 1, "heldout")
    jobs = [succeeded(s) for s in STAGES[:7]] + [succeeded(ev1)]  # up to iter-001/rl, plus iter-001 eval
    messages = {
        name(RL0): json.dumps({"train_reward_last10pct": 0.4}),
        name(rl1): json.dumps({"train_reward_last10pct": 0.55, "steps": 60}),
        name(BASE_EVAL): json.dumps({"avg_at_n": 0.1, "pass_at_k": {"1": 0.1, "16": 0.7}}),
        name(ev0): json.dumps({"avg_at_n": 0.2, "pass_at_k": {"1": 0.2, "16": 0.8}}),
        name(ev1): json.dumps(
            {"avg_at_n": 0.25, "pass_at_k": {"1": 0.25, "4": 0.5, "16": 0.9, "x": 1.0, "32": None}}
        ),
    }
    a = run(jobs, messages=messages)
    assert a.status["metrics"] == {"trainReward": 0.55, "evalAvgAtN": 0.25, "evalPassAtK": 0.9}


def test_bad_termination_messages_are_ignored():
    rl1 = Stage("rl", 1)
    jobs = [succeeded(s) for s in STAGES[:7]]
    messages = {
        name(RL0): json.dumps({"train_reward_last10pct": 0.4}),
        name(rl1): "{not json",  # FallbackToLogsOnError: a log tail
        name(BASE_EVAL): json.dumps([1, 2, 3]),
        name(Stage("eval", 0, "heldout")): json.dumps({"avg_at_n": "high", "pass_at_k": "many"}),
    }
    a = run(jobs, messages=messages)
    assert a.status["metrics"] == {"trainReward": 0.4}


# ------------------------------------------------------------------------------------------ a whole run
def test_a_whole_run_with_an_instant_kubelet_emits_each_event_once():
    """Drive the core like the operator would: apply its actions, finish Jobs, feed everything back."""
    jobs: dict[str, dict[str, Any]] = {}
    status: dict[str, Any] = {}
    events: list[tuple[str, str, str]] = []
    now = NOW
    for _ in range(40):
        a = reconcile(observe(list(jobs.values()), status, now=now), default_image=IMAGE)
        events += a.events
        status = a.status
        if cond(a, "Succeeded")[0] == "True":
            break
        for job in a.create_jobs:
            assert job["metadata"]["name"] not in jobs, "duplicate Job"
            jobs[job["metadata"]["name"]] = copy.deepcopy(job)
        # a quiet pass in between (a watch event with nothing new) changes nothing
        quiet = reconcile(observe(list(jobs.values()), status, now=now), default_image=IMAGE)
        assert quiet.create_jobs == [] and quiet.events == [] and not quiet.status_changed
        now += timedelta(seconds=10)
        for job in jobs.values():
            if "status" not in job:
                job["status"] = {"succeeded": 1, "completionTime": format_time(now)}
    else:
        pytest.fail("the run did not finish")
    assert sorted(jobs) == sorted(name(s) for s in STAGES)
    reasons = [e[1] for e in events]
    assert reasons.count("StageStarted") == reasons.count("StageSucceeded") == len(STAGES)
    assert reasons.count("RunSucceeded") == 1 and len(reasons) == 2 * len(STAGES) + 1


def test_status_patch_nulls_what_the_new_status_dropped():
    old = {"stage": "x", "iteration": 3, "kopf": {"progress": {}}, "metrics": {"a": 1.0}}
    assert status_patch(old, {"stage": "y", "metrics": {}}) == {
        "stage": "y",
        "metrics": {},
        "iteration": None,
    }


@pytest.mark.parametrize("spec", [SPEC, spec_with(storage={})])
def test_a_hand_edited_status_does_not_wedge_the_run(spec):
    junk = {"iteration": "three", "stage": 7, "metrics": {"x": "y"}, "conditions": "no", "history": [1, None]}
    a = run([active(INIT)], junk, spec=spec)
    assert a.status_changed and len(a.status["conditions"]) == 5
    assert a.status["history"][0]["job"] == "tiny-b-init-a0"
