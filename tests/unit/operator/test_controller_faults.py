"""The Controller under refused creates and stalled pods (issue 9, items 4 and 5): nothing raises into
the work queue, the status says why, the backoff is bounded, and pods are listed only when needed."""

from __future__ import annotations

from rloop_operator.controller import REFUSAL_BACKOFF_SECONDS
from rloop_operator.faults import REFUSAL_BACKOFF_MAX_SECONDS
from rloop_operator.k8s import CreateRefused
from tests.unit.operator.test_controller import INIT, KEY, FakeApi, attempts, controller, run_object


class RefusingApi(FakeApi):
    def __init__(self, run, refusal: CreateRefused):
        super().__init__(run)
        self.refusal: CreateRefused | None = refusal

    def create_job(self, namespace, body):
        if self.refusal is not None:
            self.calls.append("create_job")
            raise self.refusal
        return super().create_job(namespace, body)


def _condition(api: FakeApi, type_: str) -> dict:
    return next(c for c in api.run["status"]["conditions"] if c["type"] == type_)


def test_a_quota_refusal_is_written_to_status_and_retried_with_a_doubling_capped_delay() -> None:
    quota = CreateRefused(403, "Forbidden", 'jobs "x" is forbidden: exceeded quota: team-quota')
    api = RefusingApi(run_object(), quota)
    c, metrics = controller(api)
    delays = [c.reconcile(KEY) for _ in range(8)]  # does not raise into the work queue
    assert delays[:3] == [REFUSAL_BACKOFF_SECONDS, 2 * REFUSAL_BACKOFF_SECONDS, 4 * REFUSAL_BACKOFF_SECONDS]
    assert max(delays) <= REFUSAL_BACKOFF_MAX_SECONDS
    progressing = _condition(api, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "QuotaExceeded")
    assert "team-quota" in progressing["message"]
    assert api.jobs == {} and attempts(metrics, "init") is None
    assert ("Warning", "QuotaExceeded") in [e[:2] for e in api.events]
    assert "StageStarted" not in [e[1] for e in api.events]
    # The quota is raised: the next pass creates the Job and the backoff starts over.
    api.refusal = None
    c.reconcile(KEY)
    assert list(api.jobs) == [INIT] and _condition(api, "Progressing")["status"] == "True"


def test_an_invalid_job_fails_the_run_once_and_is_not_tried_again_until_the_spec_changes() -> None:
    invalid = CreateRefused(422, "Invalid", 'Job.batch "x" is invalid: spec.template.spec.priorityClassName: '
                            'Invalid value: "gold"')
    api = RefusingApi(run_object(), invalid)
    c, _ = controller(api)
    c.reconcile(KEY)
    failed = _condition(api, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "JobRejected")
    assert "priorityClassName" in failed["message"]
    api.calls.clear()
    c.reconcile(KEY)
    assert "create_job" not in api.calls  # same generation: it would be refused again
    api.refusal = None
    api.run["metadata"]["generation"] = 2  # the user fixed the spec
    c.reconcile(KEY)
    assert list(api.jobs) == [INIT] and _condition(api, "Failed")["status"] == "False"


def test_pods_are_listed_for_a_started_job_without_a_ready_pod_and_a_missing_pod_is_named() -> None:
    api = FakeApi(run_object())
    c, _ = controller(api)
    c.reconcile(KEY)
    job = api.jobs[INIT]
    job["status"] = {"startTime": "2026-11-25T12:00:00Z", "active": 1, "ready": 1}
    api.calls.clear()
    c.reconcile(KEY)
    assert "list_pods" not in api.calls  # running and ready: nothing to look at
    job["status"] = {"startTime": "2026-11-25T12:00:00Z", "active": 0, "ready": 0}
    api.calls.clear()
    c.reconcile(KEY)
    assert "list_pods" in api.calls
    record = next(h for h in api.run["status"]["history"] if h["job"] == INIT)
    assert record["state"] == "Pending" and record["message"].startswith("not running: NoPod")


def test_a_server_error_on_create_is_reported_in_status_and_counted_as_a_reconcile_error() -> None:
    api = RefusingApi(run_object(), CreateRefused(500, "InternalError", "etcdserver: request timed out"))
    c, metrics = controller(api)
    assert c.reconcile(KEY) == REFUSAL_BACKOFF_SECONDS
    progressing = _condition(api, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "JobCreateFailed")
    assert "etcdserver" in progressing["message"]
    assert "rloop_reconcile_errors_total 1.0" in metrics.render().decode()
