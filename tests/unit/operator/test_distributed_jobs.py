"""Stages of several processes or pods: the Indexed Job and the run's headless Service the builders make
(validated against the Kubernetes 1.31 schemas), the topology env the stage's launcher reads, names that
leave room for pod hostnames, reading an Indexed Job (state, which pod's message speaks for it, why it
is not running), and the controller creating the Service before the Job."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from rloop.contracts import (
    DEFAULT_MASTER_PORT,
    DISTRIBUTED_STAGE_KINDS,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NNODES_ENV,
    NODE_RANK_ENV,
    NPROC_PER_NODE_ENV,
)
from rloop.plan import Stage
from rloop.spec import parse_spec
from rloop_operator.builders import (
    RUN_MANIFEST_ANNOTATION,
    build_headless_service,
    build_job,
    needs_nodes_service,
    pod_failure_policy,
)
from rloop_operator.jobs import pod_problems, termination_messages, view_job
from rloop_operator.k8s import CreateRefused
from rloop_operator.naming import (
    COMPLETION_INDEX_ANNOTATION,
    INDEXED_MAX_NAME,
    MAX_NAME,
    job_labels,
    job_name,
    nodes_service_name,
)
from rloop_operator.reconcile import Observed, reconcile
from tests.unit.operator.test_controller import KEY, NAME, NOW, NS, UID, FakeApi, controller, run_object

KUBE_VERSION = "1.31"
RUN, RUN_NS, RUN_UID = "tiny", "team-a", "uid-123"
RUN_URI = "s3://bucket/runs/team-a/tiny"
TOPOLOGY = (NNODES_ENV, NODE_RANK_ENV, NPROC_PER_NODE_ENV, MASTER_ADDR_ENV, MASTER_PORT_ENV)
BASE: dict[str, Any] = {
    "model": {"base": "builtin:tiny"},
    "data": {"train": {"synthetic": {}}, "eval": [{"name": "heldout", "synthetic": {"split": "heldout"}}]},
    "loop": {"iterations": 2},
    "storage": {"uri": "s3://bucket/runs"},
}


def spec_with(resources: dict[str, Any] | None = None):
    doc = copy.deepcopy(BASE)
    if resources is not None:
        doc["resources"] = resources
    return parse_spec(doc)


def job_for(spec, stage: Stage = Stage("rl", 0), attempt: int = 0, run: str = RUN) -> dict[str, Any]:
    return build_job(run, RUN_NS, RUN_UID, spec, stage, attempt, run_uri=RUN_URI, default_image="img:1")


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def topology(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"] if e["name"] in TOPOLOGY}


def valid(doc: dict[str, Any]) -> dict[str, Any]:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    return doc


def without_manifest(job: dict[str, Any]) -> dict[str, Any]:
    """The Job minus the run manifest and its digest (they differ whenever the spec text does)."""
    out = copy.deepcopy(job)
    out["spec"]["template"]["metadata"]["annotations"].pop(RUN_MANIFEST_ANNOTATION)
    container(out)["env"] = [e for e in container(out)["env"] if e["name"] != "RLOOP_RUN_MANIFEST_SHA256"]
    return out


# ------------------------------------------------------------------------------------------ builders
def test_an_rl_stage_of_two_nodes_is_one_indexed_job_of_two_pods() -> None:
    spec = spec_with({"rl": {"nodes": 2, "gpus": 8}})
    job = valid(job_for(spec))
    name = job["metadata"]["name"]
    assert name == "tiny-i0-rl-a0"
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 2, 2)
    # Any pod failing fails the whole Job at once (the other pod is terminated); the operator retries.
    assert js["backoffLimit"] == 0 and js["podFailurePolicy"] == pod_failure_policy()
    assert js["template"]["spec"]["restartPolicy"] == "Never"
    assert js["template"]["spec"]["subdomain"] == nodes_service_name(RUN) == "tiny-nodes"
    assert needs_nodes_service(job)
    assert topology(job) == {
        NNODES_ENV: "2",
        NODE_RANK_ENV: {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        NPROC_PER_NODE_ENV: "8",
        MASTER_ADDR_ENV: f"{name}-0.tiny-nodes",  # node 0's hostname in the headless Service
        MASTER_PORT_ENV: str(DEFAULT_MASTER_PORT),
    }
    assert COMPLETION_INDEX_ANNOTATION == "batch.kubernetes.io/job-completion-index"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"  # per pod


def test_the_rft_stage_may_span_nodes_too_and_cpu_nodes_run_one_process_each() -> None:
    job = valid(job_for(spec_with({"rft": {"nodes": 3}}), Stage("rft", 1), 2))
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 3)
    assert topology(job)[NNODES_ENV] == "3" and topology(job)[NPROC_PER_NODE_ENV] == "1"
    assert topology(job)[MASTER_ADDR_ENV] == "tiny-i1-rft-a2-0.tiny-nodes"
    assert "completionMode" not in job_for(spec_with({"rft": {"nodes": 3}}), Stage("rl", 1))["spec"]


def test_one_pod_with_four_gpus_runs_four_processes_that_meet_on_localhost() -> None:
    spec = spec_with({"rl": {"gpus": 4}})
    job = valid(job_for(spec))
    assert topology(job) == {
        NNODES_ENV: "1",
        NODE_RANK_ENV: "0",
        NPROC_PER_NODE_ENV: "4",
        MASTER_ADDR_ENV: "127.0.0.1",
        MASTER_PORT_ENV: str(DEFAULT_MASTER_PORT),
    }
    assert not {"completionMode", "completions", "parallelism"} & set(job["spec"])
    assert "subdomain" not in job["spec"]["template"]["spec"] and not needs_nodes_service(job)
    # Otherwise the Job is the one-GPU Job's, with the topology appended after the usual env.
    one = job_for(spec_with({"rl": {"gpus": 1}}))
    env = container(job)["env"]
    assert [e["name"] for e in env[-5:]] == list(TOPOLOGY)
    trimmed = without_manifest(job)
    container(trimmed)["env"] = [e for e in container(trimmed)["env"] if e["name"] not in TOPOLOGY]
    for res in ("requests", "limits"):
        container(trimmed)["resources"][res]["nvidia.com/gpu"] = "1"
    assert trimmed == without_manifest(one)


@pytest.mark.parametrize("resources", [None, {"rl": {"nodes": 1}}, {"rl": {"gpus": 1, "nodes": 1}}],
                         ids=["unset", "nodes-1", "gpus-1-nodes-1"])
def test_a_one_process_stage_is_the_plain_single_pod_job(resources: dict[str, Any] | None) -> None:
    job = job_for(spec_with(resources))
    assert topology(job) == {}
    assert not {"completionMode", "completions", "parallelism"} & set(job["spec"])
    assert "subdomain" not in job["spec"]["template"]["spec"]
    plain = job_for(spec_with({"rl": {"gpus": 1}} if resources and "gpus" in resources["rl"] else None))
    assert without_manifest(job) == without_manifest(plain)  # byte for byte but the spec text itself


@pytest.mark.parametrize("kind", ["init", "rollout", "verify", "eval"])
def test_stages_that_are_not_distributed_get_no_topology_even_with_several_gpus(kind: str) -> None:
    assert kind not in DISTRIBUTED_STAGE_KINDS
    spec = spec_with({kind: {"gpus": 2}})
    stage = Stage(kind) if kind == "init" else Stage(kind, 0, "heldout" if kind == "eval" else None)
    job = valid(job_for(spec, stage))
    assert topology(job) == {} and "completionMode" not in job["spec"]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"  # vLLM spans them itself


def test_the_headless_service_publishes_every_pod_of_the_run_from_the_start() -> None:
    service = valid(build_headless_service(RUN, RUN_NS, RUN_UID))
    meta, spec = service["metadata"], service["spec"]
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    assert (meta["name"], meta["namespace"]) == ("tiny-nodes", RUN_NS)
    assert spec["clusterIP"] == "None"  # headless: DNS records of the pods, no virtual IP
    assert spec["publishNotReadyAddresses"] is True  # the nodes rendezvous before any is ready
    assert spec["ports"] == [{"name": "rendezvous", "port": DEFAULT_MASTER_PORT,
                              "targetPort": DEFAULT_MASTER_PORT, "protocol": "TCP"}]
    assert meta["ownerReferences"] == job_for(spec_with())["metadata"]["ownerReferences"]
    assert meta["ownerReferences"][0]["controller"] is True
    # It selects the pods of every Indexed Job of this run (any stage, any attempt), nothing else.
    for stage in (Stage("rl", 0), Stage("rft", 3)):
        pod_labels = job_for(spec_with({"rl": {"nodes": 2}}), stage, 4)["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"].items() <= pod_labels.items()
    assert spec["selector"].items() <= job_labels(RUN, Stage("rl", 0), 0).items()
    other = build_headless_service("other", RUN_NS, "uid-9")["spec"]["selector"]
    assert not other.items() <= job_labels(RUN, Stage("rl", 0), 0).items()


@pytest.mark.parametrize("run", ["tiny", "9lives", "team.a.run", "x" * 253, "a" * 57, "a" * 58])
def test_the_service_name_is_a_dns_1035_label_for_any_run_name(run: str) -> None:
    name = nodes_service_name(run)
    assert len(name) <= MAX_NAME and name[0].isalpha() and name[-1].isalnum()
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") and name.endswith("-nodes")
    assert nodes_service_name(run) == name  # deterministic
    valid(build_headless_service(run, RUN_NS, RUN_UID))


def test_service_names_of_different_runs_differ_after_shortening() -> None:
    assert nodes_service_name("a.b") != nodes_service_name("a-b")
    assert nodes_service_name("x" * 100 + "1") != nodes_service_name("x" * 100 + "2")


def test_indexed_job_names_leave_room_for_the_hostname_of_the_last_pod() -> None:
    run = "r" * 51  # r...-i12-rl-a3 is 61 characters: fine for one pod, too long with "-255"
    stage = Stage("rl", 12)
    assert job_name(run, stage, 3) == f"{run}-i12-rl-a3" and len(job_name(run, stage, 3)) == 61
    name = job_for(spec_with({"rl": {"nodes": 256}}), stage, 3, run=run)["metadata"]["name"]
    assert len(name) <= INDEXED_MAX_NAME and len(f"{name}-255") <= MAX_NAME and name.endswith("-a3")
    assert name == job_name(run, stage, 3, indexed=True) != job_name(run, stage, 3)
    assert job_for(spec_with({"rl": {"nodes": 1}}), stage, 3, run=run)["metadata"]["name"] == f"{run}-i12-rl-a3"


def test_the_spec_bounds_nodes_so_that_every_hostname_fits() -> None:
    with pytest.raises(ValueError, match="nodes"):
        spec_with({"rl": {"nodes": 257}})
    assert len("-255") == MAX_NAME - INDEXED_MAX_NAME


# ------------------------------------------------------------------------------------ reading Jobs
def indexed_job(status: dict[str, Any], nodes: int = 2) -> dict[str, Any]:
    job = job_for(spec_with({"rl": {"nodes": nodes}}))
    job["status"] = status
    return job


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ({"startTime": "t", "active": 2, "ready": 1}, "Pending"),  # node 1 not running: nobody trains
        ({"startTime": "t", "active": 2, "ready": 2}, "Running"),
        ({"startTime": "t", "active": 1, "ready": 1, "succeeded": 1}, "Running"),  # node 0 done first
        ({"startTime": "t", "active": 2}, "Running"),  # a cluster before 1.24: no `ready`
        ({"startTime": "t", "active": 1}, "Pending"),
        ({"succeeded": 2, "completedIndexes": "0-1"}, "Succeeded"),
        ({"succeeded": 1, "failed": 1}, "Failed"),
        ({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
         "Failed"),
    ],
)
def test_an_indexed_job_runs_when_all_its_pods_do_and_succeeds_when_all_did(status, state) -> None:
    view = view_job(indexed_job(status))
    assert view is not None and view.state == state and view.pods == 2


def node_pod(job: str, index: int, message: str, exit_code: int = 0, *, deleted: bool = False,
             started: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {"batch.kubernetes.io/job-name": job},
                            "annotations": {COMPLETION_INDEX_ANNOTATION: str(index)}}
    if deleted:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    terminated = {"exitCode": exit_code, "message": message, "startedAt": started}
    return {"metadata": meta, "status": {"containerStatuses": [{"name": "stage", "state": {"terminated": terminated}}]}}


@pytest.mark.parametrize("order", [1, -1])
def test_node_zero_speaks_for_a_succeeded_indexed_job(order: int) -> None:
    pods = [node_pod("j", 0, '{"rank": 0}', started="2026-01-01T00:00:00Z"),
            node_pod("j", 1, "rank 1 log", started="2026-01-01T00:00:09Z"),
            node_pod("j", 2, "rank 2 log")][::order]
    assert termination_messages(pods, "stage") == {"j": '{"rank": 0}'}


@pytest.mark.parametrize("order", [1, -1])
def test_the_pod_that_failed_on_its_own_speaks_for_a_failed_indexed_job(order: int) -> None:
    # Node 1 failed; the Job controller is terminating (deleting) node 0, which says it was stopped.
    pods = [node_pod("j", 0, '{"error": "terminated"}', 143, deleted=True),
            node_pod("j", 1, '{"error": "invalid_input", "message": "bad row 7"}', 2)][::order]
    assert termination_messages(pods, "stage") == {"j": '{"error": "invalid_input", "message": "bad row 7"}'}
    # Several failed on their own: the lowest index.
    both = [node_pod("j", 2, "node 2 died", 1), node_pod("j", 1, "node 1 died", 137)][::order]
    assert termination_messages(both, "stage") == {"j": "node 1 died"}


def test_pods_without_an_index_keep_the_latest_pod_rule_beside_indexed_jobs() -> None:
    plain = [node_pod("single", 0, "old", started="2026-01-01T00:00:00Z"),
             node_pod("single", 0, "new", started="2026-01-01T00:00:05Z")]
    for p in plain:
        del p["metadata"]["annotations"]
    pods = [*plain, node_pod("multi", 1, "one", 0), node_pod("multi", 0, "zero", 0)]
    assert termination_messages(pods, "stage") == {"single": "new", "multi": "zero"}


def live_pod(job: str, index: int, waiting: str | None) -> dict[str, Any]:
    state = {"waiting": {"reason": waiting, "message": "why"}} if waiting else {"running": {}}
    return {"metadata": {"labels": {"batch.kubernetes.io/job-name": job}, "creationTimestamp": "t",
                         "annotations": {COMPLETION_INDEX_ANNOTATION: str(index)}},
            "status": {"phase": "Pending" if waiting else "Running",
                       "containerStatuses": [{"name": "stage", "ready": not waiting, "state": state}]}}


def test_the_lowest_index_that_does_not_run_names_why_an_indexed_job_is_pending() -> None:
    pods = [live_pod("j", 0, None), live_pod("j", 2, "ErrImagePull"), live_pod("j", 1, "ImagePullBackOff")]
    assert pod_problems(pods, "stage")["j"].reason == "ImagePullBackOff"
    assert pod_problems([live_pod("j", 0, None), live_pod("j", 1, None)], "stage") == {}


# ------------------------------------------------------------------------------------ reconcile
def two_node_run() -> dict[str, Any]:
    doc = run_object()
    doc["spec"]["resources"] = {"rl": {"nodes": 2}}
    return doc


def test_the_pass_that_creates_an_indexed_job_also_asks_for_the_service() -> None:
    spec = two_node_run()["spec"]
    first = reconcile(Observed(NAME, NS, UID, 1, spec, {}, [], {}, NOW), default_image="img:1")
    assert [j["metadata"]["name"] for j in first.create_jobs] == ["demo-b-init-a0"]
    assert first.create_services == []  # init is one pod
    init = copy.deepcopy(first.create_jobs[0])
    init["metadata"] |= {"uid": "u-init", "creationTimestamp": "2026-11-25T11:00:00Z"}
    init["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True",
                                                      "lastTransitionTime": "2026-11-25T11:30:00Z"}]}
    second = reconcile(Observed(NAME, NS, UID, 1, spec, {}, [init], {}, NOW), default_image="img:1")
    assert [j["spec"].get("completionMode") for j in second.create_jobs] == ["Indexed"]
    assert second.create_services == [build_headless_service(NAME, NS, UID)]


def test_the_decision_names_the_job_the_builder_makes_for_a_long_run_name() -> None:
    run = "r" * 52
    doc = two_node_run()
    spec = doc["spec"]
    init = build_job(run, NS, UID, parse_spec(spec), Stage("init"), 0, run_uri="s3://b/p", default_image="i")
    init["metadata"] |= {"uid": "u-init", "creationTimestamp": "2026-11-25T11:00:00Z"}
    init["status"] = {"succeeded": 1}
    actions = reconcile(Observed(run, NS, UID, 1, spec, {}, [init], {}, NOW), default_image="img:1")
    (rl,) = actions.create_jobs
    assert len(rl["metadata"]["name"]) <= INDEXED_MAX_NAME
    assert [h["job"] for h in actions.status["history"]] == [init["metadata"]["name"], rl["metadata"]["name"]]


# ------------------------------------------------------------------------------------ controller
class ServiceApi(FakeApi):
    def __init__(self, run: dict[str, Any]):
        super().__init__(run)
        self.services: dict[str, dict[str, Any]] = {}
        self.refuse_service: CreateRefused | None = None

    def create_service(self, namespace, body):
        self.calls.append("create_service")
        if self.refuse_service is not None:
            raise self.refuse_service
        name = body["metadata"]["name"]
        if name in self.services:
            return None  # AlreadyExists
        self.services[name] = copy.deepcopy(body)
        return copy.deepcopy(body)


def test_the_controller_creates_the_service_before_the_indexed_job_and_again_is_fine() -> None:
    api = ServiceApi(two_node_run())
    c, _ = controller(api)
    c.reconcile(KEY)
    assert "create_service" not in api.calls  # the init Job is one pod
    api.finish("demo-b-init-a0", ok=True)
    api.calls.clear()
    c.reconcile(KEY)
    assert api.calls.index("create_service") < api.calls.index("create_job")
    assert list(api.services) == ["demo-nodes"]
    rl = api.jobs["demo-i0-rl-a0"]
    assert rl["spec"]["template"]["spec"]["subdomain"] == "demo-nodes"
    # The next attempt asks again; the Service exists (AlreadyExists is success) and the Job is created.
    api.finish("demo-i0-rl-a0", ok=False, message="node 1 died")
    c.clock = lambda: NOW.replace(hour=NOW.hour + 1)
    api.calls.clear()
    c.reconcile(KEY)
    assert api.calls.count("create_service") == 1 and "demo-i0-rl-a1" in api.jobs


def test_a_refused_service_keeps_the_indexed_job_from_being_created_and_the_status_says_why() -> None:
    api = ServiceApi(two_node_run())
    c, _ = controller(api)
    c.reconcile(KEY)
    api.finish("demo-b-init-a0", ok=True)
    api.refuse_service = CreateRefused(403, "Forbidden", 'services is forbidden: cannot create resource "services"')
    c.reconcile(KEY)
    assert "demo-i0-rl-a0" not in api.jobs
    progressing = next(x for x in api.run["status"]["conditions"] if x["type"] == "Progressing")
    assert progressing["status"] == "False" and progressing["reason"] == "JobCreateForbidden"
    assert "Service demo-nodes" in progressing["message"]
