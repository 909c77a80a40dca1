"""Credentials on Kubernetes (issue 9, item 11): no URI secret reaches the status, an Event or a Job's
command line; stages can get store access from a ServiceAccount (IRSA) instead of static keys; and a
Job's env stays small whatever the spec, the manifest travelling as a file pinned by its digest."""

from __future__ import annotations

import copy
import json
import random
import string
from datetime import UTC, datetime
from typing import Any

import pytest

from rloop.plan import Stage, all_stages
from rloop.spec import MAX_SPEC_JSON, SpecError, parse_spec
from rloop_operator import controller as controller_module
from rloop_operator.builders import build_job, stage_args
from rloop_operator.controller import Controller
from rloop_operator.metrics import OperatorMetrics
from rloop_operator.reconcile import Actions, Observed, reconcile
from rloop_operator.settings import OperatorSettings
from tests.helpers import small_doc

T0 = "2026-01-01T00:00:00Z"
NOW = datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
SIGNATURE = "d1e5e4f0c0ffee"
SECRET = "wJalrXUtnFEMI/K7MDENG"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/data/train.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature={SIGNATURE}"
)
USERINFO = f"s3://AKIAEXAMPLE:{SECRET}@minio:9000/bucket/x"


def _spec(**patch: Any) -> dict[str, Any]:
    doc = small_doc("demo", iterations=1, eval_base=False)
    doc["spec"]["storage"] = {"uri": "s3://b/p"}
    doc["spec"].update(patch)
    return doc["spec"]


def _failed_init_job(spec: dict[str, Any]) -> dict[str, Any]:
    actions = reconcile(Observed("demo", "team", "uid-1", 1, spec, {}, [], {}, NOW), default_image="i:1")
    job = copy.deepcopy(actions.create_jobs[0])
    job["metadata"] |= {"uid": "job-uid", "resourceVersion": "7", "creationTimestamp": T0}
    job["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "lastTransitionTime": T0}]}
    return job


def _texts(actions: Actions) -> list[str]:
    texts = [c.get("message", "") for c in actions.status["conditions"]]
    texts += [h.get("message", "") for h in actions.status["history"]]
    return texts + [e[2] for e in actions.events]


# ----------------------------------------------------------------------------------- redaction
@pytest.mark.parametrize("as_json", [True, False], ids=["summary-message", "log-tail"])
def test_uri_secrets_in_a_termination_message_never_reach_status_or_events(as_json: bool) -> None:
    spec = _spec()
    job = _failed_init_job(spec)
    why = f"cannot read {PRESIGNED} (403) nor {USERINFO}"
    message = json.dumps({"error": "InvalidInput", "message": why}) if as_json else f"Traceback\nOSError: {why}"
    actions = reconcile(
        Observed("demo", "team", "uid-1", 1, spec, {}, [job], {job["metadata"]["name"]: message}, NOW),
        default_image="i:1",
    )
    texts = _texts(actions)
    assert actions.events and any("https://bucket.s3.amazonaws.com/data/train.jsonl?***" in t for t in texts)
    assert any("s3://***@minio:9000/bucket/x" in t for t in texts)
    for secret in (SIGNATURE, SECRET, "AKIAEXAMPLE", "X-Amz-Credential"):
        assert not any(secret in t for t in texts), secret
    assert SECRET not in json.dumps(actions.status)


class _EventApi:
    """Just enough of KubeApi for one pass of a run with no Jobs yet."""

    def __init__(self, run: dict[str, Any]):
        self.run, self.events = run, []

    def get_run(self, namespace, name):
        return copy.deepcopy(self.run)

    def list_jobs(self, namespace, selector):
        return []

    def list_pods(self, namespace, selector):
        return []

    def create_job(self, namespace, body):
        return {**body, "metadata": {**body["metadata"], "resourceVersion": "2"}}

    def patch_run_status(self, namespace, name, patch):
        return "3"

    def create_event(self, run, type_, reason, message, timestamp):
        self.events.append(message)


def test_the_controller_redacts_every_event_it_posts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever builds an Event's message, the controller is the last step before the API."""
    run = small_doc("demo", iterations=1, eval_base=False)
    run["metadata"] |= {"namespace": "team", "uid": "uid-1", "generation": 1, "resourceVersion": "1"}

    def decide(obs: Observed, default_image: str) -> Actions:
        return Actions(events=[("Warning", "StageFailed", f"store {USERINFO} said no to {PRESIGNED}")])

    monkeypatch.setattr(controller_module, "reconcile", decide)
    api = _EventApi(run)
    Controller(api, OperatorSettings(image="i:1"), OperatorMetrics(), clock=lambda: NOW).reconcile(("team", "demo"))
    (event,) = api.events
    assert "s3://***@minio:9000/bucket/x" in event and SECRET not in event
    assert event.endswith("https://bucket.s3.amazonaws.com/data/train.jsonl?***")


@pytest.mark.parametrize("uri", ["s3://bucket/runs?X-Amz-Signature=abc", "s3://bucket/runs#frag",
                                 "https://minio:9000/runs?token=t"])
def test_a_query_or_fragment_in_storage_uri_is_rejected_naming_the_field(uri: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(storage={"uri": uri}))
    assert "spec.storage.uri: must not have a query string or fragment" in str(err.value)
    assert "abc" not in str(err.value) and "token=t" not in str(err.value)


def test_a_local_store_directory_may_contain_question_marks() -> None:
    assert parse_spec(_spec(storage={"uri": "/data/runs?2026"})).storage.uri == "/data/runs?2026"


@pytest.mark.parametrize("run_uri", ["s3://b/p/team/demo?X-Amz-Signature=abc", "s3://k:s@b/p/team/demo"])
def test_a_run_uri_with_secrets_is_never_made_a_job_argument(run_uri: str) -> None:
    with pytest.raises(ValueError, match="cannot be a Job argument") as err:
        stage_args(Stage("init"), run_uri)
    assert "abc" not in str(err.value) and ":s@" not in str(err.value)


# ---------------------------------------------------------------------------- service accounts
def _job(spec, stage: Stage) -> dict[str, Any]:
    return build_job("demo", "team", "uid-1", spec, stage, 0, run_uri="s3://b/p/team/demo", default_image="i:1")


def test_service_account_per_run_and_per_stage_kind_without_an_api_token() -> None:
    spec = parse_spec(_spec(resources={"default": {"serviceAccountName": "rloop-s3"},
                                       "rl": {"serviceAccountName": "rloop-trainer", "gpus": 1}}))
    pods = {s.kind: _job(spec, s)["spec"]["template"]["spec"] for s in all_stages(spec)}
    assert pods["rl"]["serviceAccountName"] == "rloop-trainer"
    assert {k: p["serviceAccountName"] for k, p in pods.items() if k != "rl"} == {
        k: "rloop-s3" for k in pods if k != "rl"
    }
    # IRSA and EKS Pod Identity project tokens of their own; the Kubernetes API token stays out.
    assert all(p["automountServiceAccountToken"] is False for p in pods.values())
    # No Secret named: no static keys in the env, the stage uses the default AWS credential chain.
    env = {e["name"] for e in _job(spec, Stage("init"))["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not any(name.startswith("AWS_") for name in env)


def test_without_a_service_account_the_pod_names_none() -> None:
    pod = _job(parse_spec(_spec()), Stage("init"))["spec"]["template"]["spec"]
    assert "serviceAccountName" not in pod


@pytest.mark.parametrize(
    ("name", "why"),
    [("Rloop", "is not a valid ServiceAccount name (a DNS subdomain"), ("rloop_s3", "is not a valid ServiceAccount"),
     ("-rloop", "is not a valid ServiceAccount"), ("a" * 254, "at most 253 characters"), ("", "at least 1 character")],
)
def test_a_bad_service_account_name_is_rejected_naming_the_field(name: str, why: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(resources={"rl": {"serviceAccountName": name}}))
    (line,) = str(err.value).splitlines()
    assert line.startswith("spec.resources.rl.serviceAccountName: ") and why in line


# ------------------------------------------------------------------------------------ env size
ENV_BOUND = 2048
"""Bytes of all a stage container's env names and values (the fixed entries, the manifest's path and
digest, Secret references): independent of the spec, which is up to MAX_SPEC_JSON (64 KiB)."""


def _wire_size(doc: dict[str, Any]) -> int | None:
    """Length of the resolved spec as JSON, None when it is over MAX_SPEC_JSON (invalid)."""
    try:
        return len(json.dumps(parse_spec(doc).to_wire(), separators=(",", ":")))
    except SpecError:
        return None


def largest_spec() -> dict[str, Any]:
    """A valid spec within a few bytes of MAX_SPEC_JSON: the long strings at their longest, then as many
    eval sets with 4096-character paths as fit, then one more with the path that fills the rest. Random
    text, so no encoding of the manifest could shrink it by much."""
    rng = random.Random(0)

    def path(n: int) -> str:
        return "s3://data/" + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(n - 16)) + ".jsonl"

    spec = _spec(model={"base": path(4096)}, verifier={"name": "exact"},
                 storage={"uri": path(4096), "secretRef": {"name": "s" * 253}}, queueName="q" * 63)
    template = "{prompt}" + path(16_384 - 8)
    spec["data"] = {"train": {"path": path(4096)}, "promptTemplate": template, "eval": []}

    def with_set(doc: dict[str, Any], n: int) -> dict[str, Any]:
        out = copy.deepcopy(doc)
        out["data"]["eval"].append({"name": f"set{len(out['data']['eval']):02d}" + "x" * 35, "path": path(n)})
        return out

    while (bigger := with_set(spec, 4096)) and _wire_size(bigger) is not None:
        spec = bigger
    size, probe = _wire_size(spec), _wire_size(with_set(spec, 100))
    assert size is not None and probe is not None
    return with_set(spec, MAX_SPEC_JSON - size - (probe - size - 100))


def test_the_largest_valid_spec_leaves_every_jobs_env_small_and_the_stage_reads_it_back(tmp_path, monkeypatch):
    from rloop.stages.common import _snapshot_spec_from_env
    from rloop.store import RunStore

    doc = largest_spec()
    spec = parse_spec(doc)
    assert _wire_size(doc) == MAX_SPEC_JSON
    for stage in all_stages(spec):
        job = _job(spec, stage)
        (c,) = job["spec"]["template"]["spec"]["containers"]
        env_bytes = sum(len(e["name"]) + len(json.dumps(e.get("value", e.get("valueFrom")))) for e in c["env"])
        assert env_bytes <= ENV_BOUND, (stage.id, env_bytes)

    # What the pod sees: the annotation as a file (the downward-API volume), the env as the Job has it.
    job = _job(spec, Stage("init"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(job["spec"]["template"]["metadata"]["annotations"]["rloop.dev/run-manifest"])
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    monkeypatch.setenv("RLOOP_RUN_MANIFEST_FILE", str(manifest))
    monkeypatch.setenv("RLOOP_RUN_MANIFEST_SHA256", env["RLOOP_RUN_MANIFEST_SHA256"])
    store = RunStore(str(tmp_path / "store"), "team", "demo")
    _snapshot_spec_from_env(store)
    assert parse_spec(store.read_spec()["spec"]) == spec
