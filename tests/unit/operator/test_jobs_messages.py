"""Pod termination messages (which pod of a Job speaks for it), which finished Jobs need one read, and
the run that owns a Job event."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from rloop.plan import STAGE_KINDS, Stage
from rloop_operator.handlers import owner_run
from rloop_operator.jobs import JobView, needs_message, termination_messages, view_job
from rloop_operator.reconcile import Observed, reconcile
from tests.helpers import small_doc

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def pod(
    job: str | None,
    message: str | None,
    started: str | None = T0,
    *,
    container: str = "stage",
    label: str = "batch.kubernetes.io/job-name",
    state: str = "terminated",
    pod_start: str | None = None,
) -> dict[str, Any]:
    terminated: dict[str, Any] = {}
    if message is not None:
        terminated["message"] = message
    if started is not None:
        terminated["startedAt"] = started
    status: dict[str, Any] = {"containerStatuses": [{"name": container, "state": {state: terminated}}]}
    if pod_start:
        status["startTime"] = pod_start
    return {"metadata": {"labels": {label: job} if job else {}}, "status": status}


# ---------------------------------------------------------------------------- termination_messages
@pytest.mark.parametrize("order", [1, -1])
def test_the_latest_started_pod_of_a_job_wins_in_any_order(order: int) -> None:
    # A disruption replaced the first pod; the second decided the Job.
    pods = [pod("a", "first", T0), pod("a", "second", T1)][::order]
    assert termination_messages(pods, "stage") == {"a": "second"}


def test_each_job_gets_its_own_message_and_the_old_job_name_label_counts() -> None:
    pods = [pod("a", "msg-a"), pod("b", "msg-b", label="job-name"), pod("c", '{"x": 1}')]
    assert termination_messages(pods, "stage") == {"a": "msg-a", "b": "msg-b", "c": '{"x": 1}'}


def test_the_new_job_name_label_is_preferred_over_the_old_one() -> None:
    p = pod("new", "m")
    p["metadata"]["labels"]["job-name"] = "old"
    assert termination_messages([p], "stage") == {"new": "m"}


def test_only_the_named_container_once_terminated_and_labelled_pods_count() -> None:
    pods = [
        pod("sidecar", "istio", container="istio-proxy"),
        pod("running", None, state="running"),
        pod(None, "no label"),
        "not a pod",
        {"metadata": None, "status": None},
    ]
    assert termination_messages(pods, "stage") == {}  # type: ignore[arg-type]
    assert termination_messages([pod("s", "istio", container="istio-proxy")], "istio-proxy") == {"s": "istio"}


def test_a_missing_message_is_empty_and_a_missing_start_falls_back_to_the_pod_start() -> None:
    assert termination_messages([pod("a", None)], "stage") == {"a": ""}
    pods = [pod("b", "later pod", started=None, pod_start=T1), pod("b", "earlier pod", started=T0)]
    assert termination_messages(pods, "stage") == {"b": "later pod"}


# ---------------------------------------------------------------------------------- needs_message
def view(kind: str, state: str) -> JobView:
    return JobView(
        name="j",
        stage=Stage(kind, None if kind == "init" else 0),  # type: ignore[arg-type]
        attempt=0,
        state=state,  # type: ignore[arg-type]
        suspended=False,
        resumable=False,
        created=None,
        start_time=None,
        end_time=None,
        failure=None,
        detail=None,
        summary=None,
    )


@pytest.mark.parametrize("kind", STAGE_KINDS)
def test_needs_message_for_failures_and_succeeded_stages_with_figures_only(kind: str) -> None:
    assert needs_message(view(kind, "Failed"))
    # rl, eval: the status' figures; verify, rft: the per-iteration gauges (expert set, RFT loss).
    assert needs_message(view(kind, "Succeeded")) == (kind in ("rl", "verify", "rft", "eval"))
    assert not needs_message(view(kind, "Running")) and not needs_message(view(kind, "Pending"))


def created_init_job() -> dict[str, Any]:
    doc = small_doc("demo", iterations=1, eval_base=False)
    doc["spec"]["storage"] = {"uri": "s3://b/p"}
    now = datetime(2026, 1, 1, tzinfo=UTC)
    actions = reconcile(
        Observed("demo", "team", "uid-1", 1, doc["spec"], {}, [], {}, now), default_image="i:1"
    )
    job = copy.deepcopy(actions.create_jobs[0])
    job["metadata"] |= {"uid": "job-uid", "resourceVersion": "7", "creationTimestamp": T0}
    return job


@pytest.mark.parametrize(
    "status, expected",
    [
        ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}, False),
        ({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}, True),
        ({"active": 1}, False),
    ],
)
def test_needs_message_of_an_observed_init_job(status: dict[str, Any], expected: bool) -> None:
    job = created_init_job() | {"status": status}
    v = view_job(job)
    assert v is not None and v.stage.kind == "init"
    assert needs_message(v) is expected


# -------------------------------------------------------------------------------------- owner_run
def test_owner_run_of_a_job_the_operator_created() -> None:
    assert owner_run(created_init_job()) == "demo"


@pytest.mark.parametrize(
    "refs, expected",
    [
        (
            [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs"},
                {"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "name": "demo", "controller": True},
            ],
            "demo",
        ),
        ([{"apiVersion": "rloop.dev/v1", "kind": "RLoopRun", "name": "other-version"}], "other-version"),
        ([{"apiVersion": "notrloop.dev/v1alpha1", "kind": "RLoopRun", "name": "x"}], None),
        ([{"apiVersion": "rloop.dev.evil/v1alpha1", "kind": "RLoopRun", "name": "x"}], None),
        ([{"apiVersion": "rloop.dev/v1alpha1", "kind": "Other", "name": "x"}], None),
        ([], None),
        (None, None),
    ],
)
def test_owner_run_reads_only_rloopruns(refs: list[dict[str, Any]] | None, expected: str | None) -> None:
    assert owner_run({"metadata": {"ownerReferences": refs}}) == expected


def test_owner_run_of_a_body_without_metadata() -> None:
    assert owner_run({}) is None and owner_run({"metadata": None}) is None
