"""The Kubernetes test harness itself: the patched kmock emulator and the test kubelet (DESIGN §4).

Real parts only: the official `kubernetes` client, a real `kopf` operator, `kubectl` when installed,
real local processes for Jobs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import kopf
import kubernetes
import pytest

from tests.k8s.apiserver import EVENTS, JOBS, PODS, RLOOPRUNS, Server, start, wait_until
from tests.k8s.kubelet import Kubelet, map_executables

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

GROUP, VERSION, PLURAL = "rloop.dev", "v1alpha1", "rloopruns"
NS = "default"


@pytest.fixture(scope="module")
def server():
    srv = start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def api(server: Server):
    """The official client, configured from the harness's kubeconfig file (not from $KUBECONFIG)."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(server.kubeconfig_path), client_configuration=configuration)
    assert configuration.host == server.url
    with kubernetes.client.ApiClient(configuration) as client:
        yield client


def run_body(name: str, spec: dict | None = None, labels: dict | None = None) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLoopRun",
            "metadata": {"name": name, "labels": labels or {}}, "spec": spec or {"x": 1}}


# ----------------------------------------------------------------------------------------------
def test_core_api_crud_versions_and_status_subresource(server: Server, api) -> None:
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)

    # (a) GET /api/v1/namespaces works; (d) lists carry kind/apiVersion.
    names = [ns.metadata.name for ns in core.list_namespace().items]
    assert "default" in names
    assert core.read_namespace("default").metadata.uid
    raw = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert raw["kind"] == "RLoopRunList" and raw["apiVersion"] == f"{GROUP}/{VERSION}"
    # (c) core discovery says groupVersion "v1".
    assert kubernetes.client.CoreV1Api(api).get_api_resources().group_version == "v1"

    # (b) create stamps uid/resourceVersion/creationTimestamp/generation.
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, {**run_body("crud", labels={"team": "a"}), "status": {"ignored": True}})
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert "status" not in created  # status subresource: create drops status
    rv0 = int(meta["resourceVersion"])

    # generateName is honoured.
    gen = custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, {**run_body(""), "metadata": {"generateName": "crud-gen-"}})
    assert gen["metadata"]["name"].startswith("crud-gen-") and len(gen["metadata"]["name"]) == len("crud-gen-") + 5

    # A spec patch bumps resourceVersion and generation.
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "crud", {"spec": {"x": 2}})
    assert patched["spec"] == {"x": 2}
    assert patched["metadata"]["generation"] == 2 and int(patched["metadata"]["resourceVersion"]) > rv0
    rv1 = int(patched["metadata"]["resourceVersion"])

    # A status patch via the subresource bumps resourceVersion only; spec untouched.
    st = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "crud", {"status": {"phase": "Running"}, "spec": {"x": 99}})
    assert st["status"] == {"phase": "Running"} and st["spec"] == {"x": 2}
    assert st["metadata"]["generation"] == 2 and int(st["metadata"]["resourceVersion"]) > rv1
    rv2 = int(st["metadata"]["resourceVersion"])

    # A status change through the main resource is ignored; so a metadata-only patch keeps generation.
    labelled = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "crud", {"metadata": {"labels": {"extra": "1"}}, "status": {"phase": "X"}})
    assert labelled["status"] == {"phase": "Running"} and labelled["metadata"]["generation"] == 2
    assert int(labelled["metadata"]["resourceVersion"]) > rv2
    rv3 = int(labelled["metadata"]["resourceVersion"])

    # A no-op patch changes nothing (no new resourceVersion), as on a real API server.
    same = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "crud", {"spec": {"x": 2}})
    assert int(same["metadata"]["resourceVersion"]) == rv3

    # Conflicts: duplicate create 409 AlreadyExists; stale resourceVersion 409; unknown object 404.
    with pytest.raises(kubernetes.client.ApiException) as exc:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, run_body("crud"))
    assert exc.value.status == 409 and json.loads(exc.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(kubernetes.client.ApiException) as exc:
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "crud",
                                              {"metadata": {"resourceVersion": str(rv0)}, "spec": {"x": 3}})
    assert exc.value.status == 409
    with pytest.raises(kubernetes.client.ApiException) as exc:
        custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "nope")
    assert exc.value.status == 404

    # Label selectors are applied server-side.
    selected = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, label_selector="team=a")
    assert [o["metadata"]["name"] for o in selected["items"]] == ["crud"]
    assert custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, label_selector="team notin (a)")[
        "items"] != []

    # The direct helpers see the same state.
    assert server.get(RLOOPRUNS, NS, "crud")["status"] == {"phase": "Running"}

    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "crud")
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, gen["metadata"]["name"])
    assert server.get(RLOOPRUNS, NS, "crud") is None


def test_watch_replays_from_resource_version_and_streams_live(server: Server, api) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    rv0 = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["metadata"]["resourceVersion"]
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, run_body("w1", labels={"watch": "yes"}))
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, run_body("w-other"))
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "w1", {"spec": {"x": 2}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "w1")

    try:
        seen: list[tuple[str, str]] = []
        watch = kubernetes.watch.Watch()
        t0 = time.monotonic()
        for event in watch.stream(custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                                  resource_version=rv0, label_selector="watch=yes", timeout_seconds=10):
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            if len(seen) == 3:  # the replay is done: now a live event
                threading.Thread(target=server.create, args=(RLOOPRUNS, run_body("w2", labels={"watch": "yes"}), NS),
                                 daemon=True).start()
            if len(seen) == 4:
                watch.stop()
                break
        assert time.monotonic() - t0 < 10
        assert seen == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1"), ("ADDED", "w2")]
    finally:  # a failure here must not leave objects behind for the kopf test (module-scoped server)
        server.delete(RLOOPRUNS, NS, "w2")
        server.delete(RLOOPRUNS, NS, "w-other")


@pytest.mark.parametrize("flag", ["true", "True", "1"])
def test_watch_flag_accepts_go_bool_spellings(server: Server, flag: str) -> None:
    """`?watch=` is a Go bool: kubernetes<37 clients send `watch=True`, newer ones `watch=true`."""
    url = f"{server.url}/api/v1/namespaces?watch={flag}&timeoutSeconds=1"
    with urllib.request.urlopen(url, timeout=10) as resp:
        lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert lines and all(ev["type"] == "ADDED" for ev in lines)
    assert "default" in {ev["object"]["metadata"]["name"] for ev in lines}


def test_kopf_operator_handles_create_update_delete(server: Server, api) -> None:
    registry = kopf.OperatorRegistry()
    calls: dict[str, list] = {"create": [], "update": [], "delete": []}

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=server.url, token="kmock-test-token", default_namespace=NS)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def on_create(name, spec, patch, body, **_):
        calls["create"].append(name)
        patch.status["observed"] = spec.get("x")
        kopf.info(body, reason="Observed", message=f"x={spec.get('x')}")  # a core/v1 Event (generateName)

    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    def on_update(name, spec, patch, **_):
        calls["update"].append(name)
        patch.status["observed"] = spec.get("x")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def on_delete(name, **_):
        calls["delete"].append(name)

    stop_flag, ready_flag = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            kopf.run(registry=registry, standalone=True, namespaces=[NS], stop_flag=stop_flag,
                     ready_flag=ready_flag)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    thread = threading.Thread(target=run, name="kopf", daemon=True)
    thread.start()
    custom = kubernetes.client.CustomObjectsApi(api)
    try:
        assert ready_flag.wait(15), f"kopf did not start: {errors}"
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, run_body("kopfed", {"x": 1}))

        def observed(value):
            obj = server.get(RLOOPRUNS, NS, "kopfed")
            return obj if obj and (obj.get("status") or {}).get("observed") == value else None

        obj = wait_until(lambda: observed(1), timeout=15, message="kopf's create handler to patch the status")
        assert "kopf.zalando.org/KopfFinalizerMarker" in obj["metadata"]["finalizers"]
        assert calls["create"] == ["kopfed"]

        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "kopfed", {"spec": {"x": 2}})
        obj = wait_until(lambda: observed(2), timeout=15, message="kopf's update handler")
        assert obj["metadata"]["generation"] == 2 and calls["update"] == ["kopfed"]

        # kopf posted the Kubernetes Event (kopf 1.45 posts log lines as events only if
        # settings.posting.loggers is set; explicit kopf.info()/kopf.event() always post).
        events = wait_until(lambda: [e for e in server.list(EVENTS, NS)
                                     if e.get("involvedObject", {}).get("name") == "kopfed"], timeout=10)
        assert events[0]["reason"] == "Observed" and events[0]["message"] == "x=1"

        # Deletion: deletionTimestamp, kopf's delete handler, finalizer removed, object gone.
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "kopfed")
        wait_until(lambda: server.get(RLOOPRUNS, NS, "kopfed") is None, timeout=15,
                   message="kopf to release its finalizer")
        assert calls["delete"] == ["kopfed"]
    finally:
        stop_flag.set()
        thread.join(15)
    assert not thread.is_alive()
    assert not errors, errors


def python_job(name: str, code: str, *, env: list | None = None, extra_spec: dict | None = None) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "harness"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "harness"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "rloop:test", "command": ["python", "-c", code],
                                    "env": env or []}],
                },
            },
            **(extra_spec or {}),
        },
    }


def test_kubelet_runs_jobs_and_reports_termination_messages(server: Server, api) -> None:
    core = kubernetes.client.CoreV1Api(api)
    batch = kubernetes.client.BatchV1Api(api)
    core.create_namespaced_secret(NS, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}})
    ok_code = ("import json, os; open(os.environ['RLOOP_TERMINATION_LOG'], 'w').write("
               "json.dumps({'greeting': os.environ['GREETING'], 'token': os.environ['TOKEN']}))")
    env = [{"name": "GREETING", "value": "hello"},
           {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    fail_policy = {"podFailurePolicy": {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}}]},
        "backoffLimit": 3}
    with Kubelet(server, translate=map_executables({"python": sys.executable}), max_concurrency=3) as kubelet:
        batch.create_namespaced_job(NS, python_job("ok", ok_code, env=env))
        batch.create_namespaced_job(NS, python_job("bad-input", "import sys; sys.exit(2)", extra_spec=fail_policy))
        batch.create_namespaced_job(NS, python_job("flaky", "import sys; print('boom'); sys.exit(3)",
                                                   extra_spec={"backoffLimit": 1}))

        def finished(name):
            job = batch.read_namespaced_job_status(name, NS)
            conds = {c.type: c for c in ((job.status and job.status.conditions) or []) if c.status == "True"}
            return (job, conds) if {"Complete", "Failed"} & set(conds) else None

        job, conds = wait_until(lambda: finished("ok"), timeout=20, message="Job ok")
        assert job.status.succeeded == 1 and "Complete" in conds and job.status.completion_time
        assert job.status.start_time and not job.status.active
        pods = core.list_namespaced_pod(NS, label_selector="job-name=ok").items
        assert len(pods) == 1 and pods[0].status.phase == "Succeeded"
        terminated = pods[0].status.container_statuses[0].state.terminated
        assert terminated.exit_code == 0
        assert json.loads(terminated.message) == {"greeting": "hello", "token": "s3cr3t"}
        assert pods[0].metadata.owner_references[0].name == "ok"

        job, conds = wait_until(lambda: finished("bad-input"), timeout=20, message="Job bad-input")
        assert conds["Failed"].reason == "PodFailurePolicy" and "exit code 2" in conds["Failed"].message
        assert len(core.list_namespaced_pod(NS, label_selector="job-name=bad-input").items) == 1

        job, conds = wait_until(lambda: finished("flaky"), timeout=20, message="Job flaky")
        assert conds["Failed"].reason == "BackoffLimitExceeded" and job.status.failed == 2
        assert len(core.list_namespaced_pod(NS, label_selector="job-name=flaky").items) == 2
        assert "boom" in kubelet.log_text("flaky")
        assert not kubelet.errors

    # Deleting a Job cascades to its pods (ownerReference garbage collection).
    batch.delete_namespaced_job("ok", NS)
    assert core.list_namespaced_pod(NS, label_selector="job-name=ok").items == []
    for name in ("bad-input", "flaky"):
        server.delete(JOBS, NS, name)


def test_kubelet_instant_mode_and_suspend_and_owner_cascade(server: Server) -> None:
    run = server.create(RLOOPRUNS, run_body("owner"), NS)
    owner_ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLoopRun", "name": "owner",
                 "uid": run["metadata"]["uid"], "controller": True}
    body = python_job("instant", "raise SystemExit(1)")
    body["metadata"]["ownerReferences"] = [owner_ref]
    suspended = python_job("parked", "raise SystemExit(1)", extra_spec={"suspend": True})
    with Kubelet(server, instant=True, instant_message=lambda job: f"done:{job['metadata']['name']}") as kubelet:
        server.create(JOBS, body, NS)
        server.create(JOBS, suspended, NS)
        job = wait_until(lambda: (j := server.get(JOBS, NS, "instant")) and (j.get("status") or {}).get("succeeded")
                         and j, timeout=10)
        assert [c["type"] for c in job["status"]["conditions"]] == ["SuccessCriteriaMet", "Complete"]
        pods = server.list(PODS, NS, labels={"job-name": "instant"})
        assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "done:instant"
        parked = wait_until(lambda: (j := server.get(JOBS, NS, "parked")) and (j.get("status") or {}).get(
            "conditions") and j, timeout=10)
        assert parked["status"]["conditions"][0]["type"] == "Suspended"
        assert server.list(PODS, NS, labels={"job-name": "parked"}) == []  # nothing ran
        # Resume: it runs (instantly) and completes.
        server.patch(JOBS, NS, "parked", {"spec": {"suspend": False}})
        wait_until(lambda: (server.get(JOBS, NS, "parked").get("status") or {}).get("succeeded"), timeout=10)
        assert kubelet.record("parked").outcome == "Complete" and not kubelet.errors

    # Deleting the owner run cascades: Job, then its Pod.
    server.delete(RLOOPRUNS, NS, "owner")
    assert server.get(JOBS, NS, "instant") is None
    assert server.list(PODS, NS, labels={"job-name": "instant"}) == []
    server.delete(JOBS, NS, "parked")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_against_the_emulator(server: Server, tmp_path: Path) -> None:
    def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["kubectl", "--kubeconfig", str(server.kubeconfig_path), "--cache-dir", str(tmp_path / "cache"),
               *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if check:
            assert result.returncode == 0, f"{cmd}: {result.stderr}"
        return result

    listed = json.loads(kubectl("get", "namespaces", "-o", "json").stdout)
    assert "default" in [item["metadata"]["name"] for item in listed["items"]]
    manifest = tmp_path / "run.yaml"
    manifest.write_text(f"apiVersion: {GROUP}/{VERSION}\nkind: RLoopRun\nmetadata:\n  name: applied\n"
                        "spec:\n  x: 5\n")
    # No OpenAPI documents are served, so client-side validation must be off.
    assert "created" in kubectl("apply", "--validate=false", "-f", str(manifest)).stdout
    assert "unchanged" in kubectl("apply", "--validate=false", "-f", str(manifest)).stdout
    got = json.loads(kubectl("get", "rloopruns", "-o", "json").stdout)
    assert [item["spec"] for item in got["items"] if item["metadata"]["name"] == "applied"] == [{"x": 5}]

    # `kubectl wait` consumes a watch stream: a status change arrives while it waits.
    threading.Timer(0.5, server.patch, args=(RLOOPRUNS, NS, "applied", {"status": {"phase": "Done"}}),
                    kwargs={"subresource": "status"}).start()
    kubectl("wait", "--for=jsonpath={.status.phase}=Done", "rloopruns/applied", "--timeout=10s")
    kubectl("delete", "rloopruns", "applied")
    assert server.get(RLOOPRUNS, NS, "applied") is None
