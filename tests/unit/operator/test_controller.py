"""One reconcile pass through the Controller, with an in-memory stand-in for the API module: what is
called, what is written, what is counted. The decisions themselves are test_reconcile.py's."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from rloop_operator.controller import MESSAGE_TRIES, NAME_CONFLICT_RETRY, Controller
from rloop_operator.metrics import OperatorMetrics
from rloop_operator.settings import OperatorSettings
from tests.helpers import small_doc

NS, NAME, UID = "team", "demo", "uid-1"
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


class FakeApi:
    """The KubeApi surface, in memory, recording every call."""

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
            return None
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
        kind = "Complete" if ok else "Failed"
        job["status"] = {
            "startTime": "2026-11-25T12:00:00Z",
            "completionTime": "2026-11-25T12:00:30Z",
            ("succeeded" if ok else "failed"): 1,
            "conditions": [{"type": kind, "status": "True", "lastTransitionTime": "2026-11-25T12:00:30Z"}],
        }
        job["metadata"]["resourceVersion"] = self._next()
        if pod:
            self.pods.append(
                {
                    "metadata": {"labels": {"batch.kubernetes.io/job-name": name}},
                    "status": {
                        "containerStatuses": [
                            {
                                "name": "stage",
                                "state": {
                                    "terminated": {
                                        "message": message or "",
                                        "startedAt": "2026-11-25T12:00:00Z",
                                    }
                                },
                            }
                        ]
                    },
                }
            )


def run_object() -> dict[str, Any]:
    doc = small_doc(NAME, iterations=1, eval_base=False)
    doc["metadata"] |= {"namespace": NS, "uid": UID, "generation": 1, "resourceVersion": "1"}
    doc["spec"]["storage"] = {"uri": "s3://bucket/runs"}
    doc["spec"]["retry"] = {"limit": 3, "backoffSeconds": 30}
    return doc


def controller(api: FakeApi) -> tuple[Controller, OperatorMetrics]:
    metrics = OperatorMetrics()
    return Controller(
        api, OperatorSettings(image="img:1", resync_seconds=120), metrics, clock=lambda: NOW
    ), metrics


def sample(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_first_pass_creates_the_first_job_writes_status_and_posts_an_event() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    delay = c.reconcile((NS, NAME))
    assert list(api.jobs) == ["demo-b-init-a0"]
    assert api.calls == ["get_run", "list_jobs", "create_job", "patch_status", "create_event"]
    assert [e[1] for e in api.events] == ["StageStarted"]
    assert api.run["status"]["stage"] == "base/init"
    assert delay == 120  # nothing due: the resync period
    assert sample(metrics, "rloop_stage_attempts_total", namespace=NS, run=NAME, stage="init") == 1
    assert sample(metrics, "rloop_run_condition", run=NAME, condition="Progressing") == 1
    assert c.is_own_write((NS, NAME), api.run["metadata"]["resourceVersion"])
    job = api.jobs["demo-b-init-a0"]
    assert c.is_known_job((NS, NAME), "demo-b-init-a0", job["metadata"]["resourceVersion"])
    assert not c.is_known_job((NS, NAME), "demo-b-init-a0", "999")

    api.calls.clear()
    c.reconcile((NS, NAME))  # nothing changed: reads only
    assert api.calls == ["get_run", "list_jobs"]


def test_already_existing_job_posts_no_second_started_event() -> None:
    api = FakeApi(run_object())
    api.exists_on_create = {"demo-b-init-a0"}
    c, metrics = controller(api)
    c.reconcile((NS, NAME))
    assert "create_job" in api.calls and not api.events
    assert sample(metrics, "rloop_stage_attempts_total", namespace=NS, run=NAME, stage="init") is None


def test_job_of_another_owner_is_not_recreated_and_the_pass_retries_soon() -> None:
    api = FakeApi(run_object())
    c, _ = controller(api)
    c.reconcile((NS, NAME))
    api.jobs["demo-b-init-a0"]["metadata"]["ownerReferences"][0]["uid"] = "older-run"
    api.calls.clear()
    assert c.reconcile((NS, NAME)) == NAME_CONFLICT_RETRY
    assert "create_job" not in api.calls


def test_pods_are_read_only_for_messages_that_matter_and_metrics_count_once() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    c.reconcile((NS, NAME))
    api.finish("demo-b-init-a0", ok=True, message=json.dumps({"stage": "base/init"}))
    api.calls.clear()
    c.reconcile((NS, NAME))
    assert "list_pods" not in api.calls  # a succeeded init Job's summary is not used
    assert "demo-i0-rl-a0" in api.jobs
    api.finish("demo-i0-rl-a0", ok=True, message=json.dumps({"train_reward_last10pct": 0.75}))
    api.calls.clear()
    c.reconcile((NS, NAME))
    assert api.calls.count("list_pods") == 1
    assert api.run["status"]["metrics"]["trainReward"] == 0.75
    assert sample(metrics, "rloop_run_train_reward", namespace=NS, run=NAME) == 0.75
    assert (
        sample(metrics, "rloop_stage_duration_seconds_count", namespace=NS, stage="rl", outcome="Succeeded")
        == 1
    )
    api.calls.clear()
    c.reconcile((NS, NAME))  # message cached, duration not observed again
    assert "list_pods" not in api.calls
    assert (
        sample(metrics, "rloop_stage_duration_seconds_count", namespace=NS, stage="rl", outcome="Succeeded")
        == 1
    )


def test_failed_job_without_pod_is_looked_up_a_bounded_number_of_times() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    c.reconcile((NS, NAME))
    api.finish("demo-b-init-a0", ok=False, pod=False)
    for _ in range(MESSAGE_TRIES + 2):
        c.reconcile((NS, NAME))
    assert api.calls.count("list_pods") == MESSAGE_TRIES
    assert sample(metrics, "rloop_stage_failures_total", namespace=NS, run=NAME, stage="init") == 1
    assert [e[1] for e in api.events].count("JobFailed") == 1


def test_retry_backoff_is_returned_as_the_next_delay() -> None:
    api = FakeApi(run_object())
    c, _ = controller(api)
    c.reconcile((NS, NAME))
    api.finish("demo-b-init-a0", ok=False, message="boom")
    # Finished at 12:00:30, backoff 30 s, now 12:00:00 (the fake clock): due in 60 s.
    assert c.reconcile((NS, NAME)) == 60


def test_deleted_run_is_forgotten() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    c.reconcile((NS, NAME))
    assert sample(metrics, "rloop_run_condition", run=NAME, condition="Progressing") == 1
    api.run = None
    assert c.reconcile((NS, NAME)) is None
    assert sample(metrics, "rloop_run_condition", run=NAME, condition="Progressing") is None
    assert sample(metrics, "rloop_stage_attempts_total", run=NAME, stage="init") is None
    assert not c.is_known_job((NS, NAME), "demo-b-init-a0", "101")


def test_a_failing_api_call_is_counted_and_raised() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)

    def broken(*a):
        raise ConnectionError("API down")

    api.list_jobs = broken
    try:
        c.reconcile((NS, NAME))
    except ConnectionError:
        pass
    else:
        raise AssertionError("the error must reach the work queue (which backs off)")
    assert sample(metrics, "rloop_reconcile_errors_total") == 1
    assert sample(metrics, "rloop_reconcile_duration_seconds_count") == 1
