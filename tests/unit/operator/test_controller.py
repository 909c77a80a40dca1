"""One reconcile pass through the Controller, with an in-memory stand-in for the API module: what is
called, what is written, what is counted. The decisions themselves are test_reconcile.py's."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rloop_operator.controller import MESSAGE_TRIES, NAME_CONFLICT_RETRY, Controller
from rloop_operator.metrics import OperatorMetrics
from rloop_operator.reconcile import Observed, reconcile
from rloop_operator.settings import OperatorSettings
from tests.helpers import small_doc
from tests.k8s.operator import sample as sample_text

NS, NAME, UID = "team", "demo", "uid-1"
KEY = (NS, NAME)
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
INIT, RL = "demo-b-init-a0", "demo-i0-rl-a0"
RESYNC = 120.0


class FakeApi:
    """The KubeApi surface, in memory, recording every call; Jobs get what the API server adds."""

    def __init__(self, run: dict[str, Any] | None):
        self.run = run
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.exists_on_create: set[str] = set()
        self.rv = 100

    def _next(self) -> str:
        self.rv += 1
        return str(self.rv)

    def get_run(self, namespace, name):
        self.calls.append("get_run")
        return copy.deepcopy(self.run)

    def list_jobs(self, namespace, selector):
        self.calls.append("list_jobs")
        return copy.deepcopy(list(self.jobs.values()))

    def list_pods(self, namespace, selector):
        self.calls.append("list_pods")
        return copy.deepcopy(self.pods)

    def create_job(self, namespace, body):
        self.calls.append("create_job")
        name = body["metadata"]["name"]
        if name in self.exists_on_create:
            return None  # AlreadyExists
        job = copy.deepcopy(body)
        job["metadata"] |= {
            "uid": f"job-{name}",
            "resourceVersion": self._next(),
            "creationTimestamp": "2026-11-25T12:00:00Z",
        }
        self.jobs[name] = job
        return copy.deepcopy(job)

    def patch_job(self, namespace, name, patch):
        self.calls.append("patch_job")

    def patch_run_status(self, namespace, name, patch):
        self.calls.append("patch_status")
        status = self.run.setdefault("status", {})
        for k, v in patch.items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v
        self.run["metadata"]["resourceVersion"] = self._next()
        return self.run["metadata"]["resourceVersion"]

    def create_event(self, run, type_, reason, message, timestamp):
        self.calls.append("create_event")
        self.events.append((type_, reason, message))

    # -------------------------------------------------------------- what a Job controller would do
    def finish(self, name: str, ok: bool, message: str | None = None, pod: bool = True) -> None:
        job = self.jobs[name]
        job["status"] = {
            "startTime": "2026-11-25T12:00:00Z",
            "completionTime": "2026-11-25T12:00:30Z",
            ("succeeded" if ok else "failed"): 1,
            "conditions": [
                {
                    "type": "Complete" if ok else "Failed",
                    "status": "True",
                    "lastTransitionTime": "2026-11-25T12:00:30Z",
                }
            ],
        }
        job["metadata"]["resourceVersion"] = self._next()
        if pod:
            terminated = {"message": message or "", "startedAt": "2026-11-25T12:00:00Z"}
            self.pods.append(
                {
                    "metadata": {"labels": {"batch.kubernetes.io/job-name": name}},
                    "status": {"containerStatuses": [{"name": "stage", "state": {"terminated": terminated}}]},
                }
            )


def run_object(uid: str = UID, backoff: int = 30) -> dict[str, Any]:
    doc = small_doc(NAME, iterations=1, eval_base=False)
    doc["metadata"] |= {"namespace": NS, "uid": uid, "generation": 1, "resourceVersion": "1"}
    doc["spec"]["storage"] = {"uri": "s3://b/p"}
    doc["spec"]["retry"] = {"limit": 3, "backoffSeconds": backoff}
    return doc


def controller(api: FakeApi, now: list[datetime] | None = None) -> tuple[Controller, OperatorMetrics]:
    clock = now if now is not None else [NOW]
    metrics = OperatorMetrics()
    settings = OperatorSettings(image="img:1", resync_seconds=RESYNC)
    return Controller(api, settings, metrics, clock=lambda: clock[0]), metrics


def sample(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return sample_text(metrics.render().decode(), name, **labels)


def attempts(metrics: OperatorMetrics, stage: str) -> float | None:
    return sample(metrics, "rloop_stage_attempts_total", namespace=NS, run=NAME, stage=stage)


def durations(metrics: OperatorMetrics, stage: str, outcome: str) -> float | None:
    return sample(metrics, "rloop_stage_duration_seconds_count", namespace=NS, stage=stage, outcome=outcome)


def test_first_pass_creates_the_init_job_writes_status_and_posts_an_event() -> None:
    api = FakeApi(run_object())
    expected = reconcile(
        Observed(NAME, NS, UID, 1, run_object()["spec"], {}, [], {}, NOW), default_image="img:1"
    ).create_jobs
    c, metrics = controller(api)
    assert c.reconcile(KEY) == RESYNC  # nothing due: the resync period
    # Jobs first (a created Job is its own record), then the status naming it, then the event.
    assert api.calls == ["get_run", "list_jobs", "create_job", "patch_status", "create_event"]
    assert list(api.jobs) == [INIT] and len(expected) == 1
    body = copy.deepcopy(api.jobs[INIT])
    for k in ("uid", "resourceVersion", "creationTimestamp"):
        del body["metadata"][k]
    assert body == expected[0]  # the core's body, untouched
    assert [e[:2] for e in api.events] == [("Normal", "StageStarted")] and INIT in api.events[0][2]
    assert api.run["status"]["stage"] == "base/init"
    assert attempts(metrics, "init") == 1
    assert sample(metrics, "rloop_run_condition", run=NAME, condition="Progressing") == 1
    assert sample(metrics, "rloop_run_last_activity_timestamp_seconds", run=NAME) == NOW.timestamp()

    rv = api.run["metadata"]["resourceVersion"]
    assert c.is_own_write(KEY, rv) and not c.is_own_write(KEY, "1") and not c.is_own_write(KEY, None)
    job_rv = api.jobs[INIT]["metadata"]["resourceVersion"]
    assert c.is_known_job(KEY, INIT, job_rv)
    assert not c.is_known_job(KEY, INIT, "999") and not c.is_known_job(KEY, INIT, None)
    assert not c.is_known_job((NS, "other"), INIT, job_rv)

    api.calls.clear()
    assert c.reconcile(KEY) == RESYNC  # nothing changed: reads only, writes nothing
    assert api.calls == ["get_run", "list_jobs"] and len(api.events) == 1
    assert attempts(metrics, "init") == 1


def test_already_existing_job_posts_no_started_event_and_is_not_counted() -> None:
    api = FakeApi(run_object())
    api.exists_on_create = {INIT}
    c, metrics = controller(api)
    assert c.reconcile(KEY) == RESYNC
    assert api.calls == ["get_run", "list_jobs", "create_job", "patch_status"]
    assert api.events == [] and attempts(metrics, "init") is None
    assert not c.is_known_job(KEY, INIT, "101")


def test_a_job_of_an_older_run_of_the_same_name_is_not_recreated_and_the_pass_retries_soon() -> None:
    api = FakeApi(run_object(uid="older-run"))
    old, _ = controller(api)
    old.reconcile(KEY)  # the deleted run's Job, still being garbage-collected
    assert api.jobs[INIT]["metadata"]["ownerReferences"][0]["uid"] == "older-run"
    api.run, api.events = run_object(), []
    c, metrics = controller(api)
    api.calls.clear()
    assert c.reconcile(KEY) == NAME_CONFLICT_RETRY < RESYNC
    assert "create_job" not in api.calls and "patch_status" in api.calls
    assert "StageStarted" not in [e[1] for e in api.events]
    assert attempts(metrics, "init") is None


def test_pods_are_listed_only_for_messages_that_matter_and_metrics_count_once() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    c.reconcile(KEY)
    api.jobs[INIT]["status"] = {"active": 1, "startTime": "2026-11-25T12:00:00Z"}
    c.reconcile(KEY)
    api.finish(INIT, ok=True, message=json.dumps({"stage": "base/init"}))
    c.reconcile(KEY)
    assert "list_pods" not in api.calls  # running, or a succeeded init Job: its summary is not used
    assert durations(metrics, "init", "Succeeded") == 1 and RL in api.jobs

    api.finish(RL, ok=True, message=json.dumps({"train_reward_last10pct": 0.75}))
    api.calls.clear()
    c.reconcile(KEY)
    assert api.calls.count("list_pods") == 1
    assert api.run["status"]["metrics"]["trainReward"] == 0.75
    assert sample(metrics, "rloop_run_train_reward", namespace=NS, run=NAME) == 0.75
    assert durations(metrics, "rl", "Succeeded") == 1
    assert sample(metrics, "rloop_stage_duration_seconds_sum", namespace=NS, stage="rl") == 30.0

    api.calls.clear()
    c.reconcile(KEY)  # unchanged world: message cached, nothing written, nothing observed again
    assert api.calls == ["get_run", "list_jobs"]
    assert durations(metrics, "rl", "Succeeded") == 1 and durations(metrics, "init", "Succeeded") == 1
    assert attempts(metrics, "init") == 1 and attempts(metrics, "rl") == 1


def test_a_failed_jobs_message_is_read_once_and_a_retry_counts_as_an_attempt() -> None:
    api = FakeApi(run_object())
    now = [NOW]
    c, metrics = controller(api, now)
    c.reconcile(KEY)
    api.finish(INIT, ok=False, message="Traceback ...\nValueError: boom")
    # Finished at 12:00:30 with a 30 s backoff, the fake clock at 12:00:00: due in 60 s.
    assert c.reconcile(KEY) == 60
    assert api.calls.count("list_pods") == 1
    failed = [e for e in api.events if e[1] == "JobFailed"]
    assert len(failed) == 1 and failed[0][2].endswith("failed: ValueError: boom")
    assert sample(metrics, "rloop_stage_failures_total", namespace=NS, run=NAME, stage="init") == 1
    assert durations(metrics, "init", "Failed") == 1

    now[0] = NOW + timedelta(seconds=60)
    c.reconcile(KEY)
    assert "demo-b-init-a1" in api.jobs and attempts(metrics, "init") == 2
    assert api.calls.count("list_pods") == 1  # the failed attempt's message is cached
    assert sample(metrics, "rloop_stage_failures_total", namespace=NS, run=NAME, stage="init") == 1
    assert durations(metrics, "init", "Failed") == 1


def test_failed_job_without_pod_is_looked_up_a_bounded_number_of_times() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    c.reconcile(KEY)
    api.finish(INIT, ok=False, pod=False)
    for _ in range(MESSAGE_TRIES + 2):
        c.reconcile(KEY)
    assert api.calls.count("list_pods") == MESSAGE_TRIES
    assert sample(metrics, "rloop_stage_failures_total", namespace=NS, run=NAME, stage="init") == 1
    assert [e[1] for e in api.events].count("JobFailed") == 1


def test_a_backoff_longer_than_the_resync_period_waits_the_resync_period() -> None:
    api = FakeApi(run_object(backoff=3600))
    c, _ = controller(api)
    c.reconcile(KEY)
    api.finish(INIT, ok=False, message="boom")
    assert c.reconcile(KEY) == RESYNC


@pytest.mark.parametrize("how", ["gone", "deleting", "forget"])
def test_a_deleted_run_is_forgotten(how: str) -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    c.reconcile(KEY)
    rv, job_rv = api.run["metadata"]["resourceVersion"], api.jobs[INIT]["metadata"]["resourceVersion"]
    assert sample(metrics, "rloop_run_condition", run=NAME, condition="Progressing") == 1
    if how == "forget":
        c.forget(KEY)
    else:
        if how == "gone":
            api.run = None
        else:
            api.run["metadata"]["deletionTimestamp"] = "2026-11-25T12:01:00Z"
        api.calls.clear()
        assert c.reconcile(KEY) is None
        assert api.calls == ["get_run"]
    assert sample(metrics, "rloop_run_condition", run=NAME) is None
    assert sample(metrics, "rloop_stage_attempts_total", run=NAME) is None
    assert sample(metrics, "rloop_runs", namespace=NS) is None
    assert not c.is_own_write(KEY, rv) and not c.is_known_job(KEY, INIT, job_rv)


def test_a_failing_api_call_is_counted_and_raised() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)

    def broken(*a):
        raise ConnectionError("API down")

    api.list_jobs = broken
    with pytest.raises(ConnectionError, match="API down"):
        c.reconcile(KEY)
    assert sample(metrics, "rloop_reconcile_errors_total") == 1
    assert sample(metrics, "rloop_reconcile_duration_seconds_count") == 1
