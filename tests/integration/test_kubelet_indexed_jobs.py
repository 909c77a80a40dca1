"""The test kubelet runs Indexed Jobs (a stage of several nodes) as local processes, one per index.

The Job is the operator's own (`build_job` for `resources.rl.nodes: 2`) with its command replaced by a
small Python script: node 1 connects to node 0 at MASTER_ADDR:MASTER_PORT, so passing means the pods ran
together, with their index, their NODE_RANK resolved from the downward API, and a rendezvous on
127.0.0.1. Killing one pod fails the Job at once and terminates the other pod's processes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import pytest

from rloop.contracts import (
    DEFAULT_MASTER_PORT,
    JOB_COMPLETION_INDEX_ENV,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NNODES_ENV,
    NODE_RANK_ENV,
    NPROC_PER_NODE_ENV,
)
from rloop.plan import Stage
from rloop.spec import parse_spec
from rloop_operator.builders import build_job
from rloop_operator.naming import COMPLETION_INDEX_ANNOTATION
from tests.k8s.apiserver import JOBS, PODS, Server, start, wait_until
from tests.k8s.kubelet import Kubelet

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.timeout(120)]

NS = "default"
TOPOLOGY = (JOB_COMPLETION_INDEX_ENV, NODE_RANK_ENV, NNODES_ENV, NPROC_PER_NODE_ENV, MASTER_ADDR_ENV,
            MASTER_PORT_ENV, "HOSTNAME")

# Node 0 listens on the rendezvous address, node 1 connects and says its rank; each writes its topology
# env as its termination message. SLEEP (seconds) keeps the pods running afterwards; node 0 then also
# starts a grandchild in a session of its own, which must die with its pod all the same.
NODE_SCRIPT = f"""
import json, os, socket, subprocess, sys, time
env = {{k: os.environ.get(k) for k in {TOPOLOGY!r}}}
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
if os.environ["NODE_RANK"] == "0":
    with socket.create_server((addr, port)) as server:
        server.settimeout(30)
        conn, _ = server.accept()
        env["peer"] = conn.recv(16).decode()
        conn.close()
else:
    deadline = time.monotonic() + 30
    while True:
        try:
            client = socket.create_connection((addr, port), timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client.sendall(os.environ["NODE_RANK"].encode())
    client.close()
sleep = float(os.environ.get("SLEEP", "0"))
if sleep and os.environ["NODE_RANK"] == "0":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    open(os.environ["CHILD_PID_FILE"], "w").write(str(child.pid))
open(os.environ["RLOOP_TERMINATION_LOG"], "w").write(json.dumps(env))
print("node", os.environ["NODE_RANK"], "ready", flush=True)
time.sleep(sleep)
"""


@pytest.fixture(scope="module")
def server():
    srv = start()
    try:
        yield srv
    finally:
        srv.stop()


def node_job(run: str, **extra_env: str) -> dict[str, Any]:
    """The operator's Job for an rl stage of two nodes (no GPUs: one process per node)."""
    spec = parse_spec({
        "model": {"base": "builtin:tiny"},
        "data": {"train": {"synthetic": {}}, "eval": [{"name": "heldout", "synthetic": {}}]},
        "storage": {"uri": "s3://bucket/runs"},
        "resources": {"rl": {"nodes": 2}},
    })
    job = build_job(run, NS, f"uid-{run}", spec, Stage("rl", 0), 0, run_uri=f"s3://bucket/runs/{NS}/{run}",
                    default_image="rloop/trainer:test")
    job["metadata"].pop("ownerReferences")  # no RLoopRun here (the emulator would collect the Job)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    container["env"] += [{"name": k, "value": v} for k, v in extra_env.items()]
    return job


def run_script(argv: list[str], container: Mapping[str, Any], job: Mapping[str, Any]) -> list[str]:
    """`rloop stage rl ...` becomes the node script (the stage itself is the operator e2e test's)."""
    return [sys.executable, "-c", NODE_SCRIPT]


def pods_of(server: Server, job: str) -> dict[int, dict[str, Any]]:
    pods = server.list(PODS, NS, labels={"job-name": job})
    return {int(p["metadata"]["annotations"][COMPLETION_INDEX_ANNOTATION]): p for p in pods}


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    return (pod["status"]["containerStatuses"][0].get("state") or {}).get("terminated")


def conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"}


def finished(server: Server, name: str) -> dict[str, Any] | None:
    job = server.get(JOBS, NS, name)
    return job if job and {"Complete", "Failed"} & set(conditions(job)) else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped by its parent
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_an_indexed_job_runs_one_process_per_index_with_its_rank_and_a_local_rendezvous(server: Server) -> None:
    job = node_job("twonodes")
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    with Kubelet(server, translate=run_script, max_concurrency=2) as kubelet:
        server.create(JOBS, job, NS)
        done = wait_until(lambda: finished(server, name), timeout=60, message=f"Job {name}")
        assert "Complete" in conditions(done), (done["status"], kubelet.log_text(name))
        assert done["status"]["succeeded"] == 2 and done["status"]["completedIndexes"] == "0-1"
        assert not done["status"].get("active") and not done["status"].get("failed")

        pods = pods_of(server, name)
        assert sorted(pods) == [0, 1]
        messages = {}
        for index, pod in pods.items():
            meta = pod["metadata"]
            assert meta["name"].startswith(f"{name}-{index}-") and len(meta["name"]) <= 63
            assert meta["labels"][COMPLETION_INDEX_ANNOTATION] == str(index)
            assert pod["spec"]["hostname"] == f"{name}-{index}"
            assert pod["spec"]["subdomain"] == job["spec"]["template"]["spec"]["subdomain"]
            assert pod["status"]["phase"] == "Succeeded" and terminated(pod)["exitCode"] == 0
            messages[index] = json.loads(terminated(pod)["message"])
        ports = {m[MASTER_PORT_ENV] for m in messages.values()}
        assert len(ports) == 1 and ports != {str(DEFAULT_MASTER_PORT)}  # one free port for the Job
        for index, env in messages.items():
            assert env[JOB_COMPLETION_INDEX_ENV] == env[NODE_RANK_ENV] == str(index)
            assert env[MASTER_ADDR_ENV] == "127.0.0.1"
            assert (env[NNODES_ENV], env[NPROC_PER_NODE_ENV]) == ("2", "1")
            assert env["HOSTNAME"] == f"{name}-{index}"
        assert messages[0]["peer"] == "1"  # node 1 reached node 0: they ran at the same time
        record = kubelet.record(name)
        assert record.outcome == "Complete" and sorted(p.index for p in record.pods) == [0, 1]
        assert not kubelet.errors
    server.delete(JOBS, NS, name)


def test_killing_one_pod_fails_the_indexed_job_at_once_and_terminates_the_other(server: Server, tmp_path) -> None:
    child_pid_file = tmp_path / "child.pid"
    job = node_job("killed", SLEEP="90", CHILD_PID_FILE=str(child_pid_file))
    name = job["metadata"]["name"]
    with Kubelet(server, translate=run_script, max_concurrency=2, grace=2.0) as kubelet:
        server.create(JOBS, job, NS)
        wait_until(lambda: (server.get(JOBS, NS, name).get("status") or {}).get("ready") == 2, timeout=30,
                   message="both pods running")
        # Node 0 writes its grandchild's pid after node 1 connected: both are past the rendezvous.
        wait_until(lambda: child_pid_file.exists() and child_pid_file.read_text(), timeout=30,
                   message="the rendezvous")
        child = int(child_pid_file.read_text())
        node0 = next(p for p in kubelet.record(name).pods if p.index == 0)
        assert alive(node0.pid) and alive(child)

        t0 = time.monotonic()
        killed = kubelet.kill_pod(name, 1, signal.SIGKILL)
        assert killed.index == 1
        done = wait_until(lambda: finished(server, name), timeout=30, message=f"Job {name} to fail")
        elapsed = time.monotonic() - t0
        failed = conditions(done)["Failed"]
        assert failed["reason"] == "BackoffLimitExceeded" and "Complete" not in conditions(done)
        # Node 0 ignores nothing, so SIGTERM ends it at once; the grace period (2 s) bounds it anyway.
        assert elapsed < 5.0, f"the Job took {elapsed:.1f} s to fail"
        assert done["status"]["failed"] == 1 and not done["status"].get("active")

        # The failed pod stays (its status says why); the other one was terminated and deleted, as the
        # Job controller deletes a failed Job's active pods, and nothing of it runs any more (its
        # grandchild in a session of its own included).
        pods = pods_of(server, name)
        assert sorted(pods) == [1] and terminated(pods[1])["exitCode"] == 128 + signal.SIGKILL
        assert pods[1]["status"]["phase"] == "Failed"
        wait_until(lambda: not alive(node0.pid) and not alive(child), timeout=5, message="node 0's processes")
        assert node0.exit_code is not None and node0.finished is not None
        assert kubelet.record(name).outcome == "Failed" and not kubelet.errors
    server.delete(JOBS, NS, name)


def test_an_exit_code_rule_of_the_pod_failure_policy_fails_an_indexed_job(server: Server) -> None:
    job = node_job("badinput")
    name = job["metadata"]["name"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    container["env"].append({"name": "EXIT", "value": "2"})

    def node_then_exit(argv: list[str], container: Mapping[str, Any], job: Mapping[str, Any]) -> list[str]:
        # Node 1 rejects its input (exit 2, the stage contract's invalid input); node 0 keeps running.
        code = NODE_SCRIPT + "\nif os.environ['NODE_RANK'] == '1': sys.exit(int(os.environ['EXIT']))\n" \
                             "time.sleep(90)\n"
        return [sys.executable, "-c", code]

    with Kubelet(server, translate=node_then_exit, max_concurrency=2, grace=2.0) as kubelet:
        server.create(JOBS, job, NS)
        done = wait_until(lambda: finished(server, name), timeout=40, message=f"Job {name} to fail")
        failed = conditions(done)["Failed"]
        assert failed["reason"] == "PodFailurePolicy" and "exit code 2" in failed["message"]
        pods = pods_of(server, name)
        assert sorted(pods) == [1] and terminated(pods[1])["exitCode"] == 2
        node0 = next(p for p in kubelet.record(name).pods if p.index == 0)
        wait_until(lambda: not alive(node0.pid), timeout=5, message="node 0 to be terminated")
        assert not kubelet.errors
    server.delete(JOBS, NS, name)
