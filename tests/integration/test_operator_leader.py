"""Two operator replicas against one API emulator: only the Lease holder acts, the other takes over.

Real parts (DESIGN §4): two `kopf run -m rloop_operator` processes with leader election on (the
chart's default; 3 s leases here), the patched kmock emulator, the test kubelet in instant mode (a Job
succeeds as soon as it exists, with a stage summary as its termination message: this test is about who
creates Jobs, not about stages). The tiny synthetic run has 5 stages.

1. Both run; exactly one leads. A run succeeds with one Job per stage, all created by the leader; the
   standby never ran a reconcile pass (its /metrics).
2. SIGKILL the leader: the standby takes over once the Lease expires (about the lease duration after
   the last renewal, never before) and finishes a second run.
3. The killed replica restarts as a standby. SIGSTOP the leader (a frozen process: GC pause, partition):
   the restarted replica takes over and finishes a third run. SIGCONT: the frozen leader finds its
   Lease gone and exits with EXIT_LOST_LEASE without creating anything.
4. SIGTERM the leader: it releases the Lease (empty holder) on its way out.
A monitor polls both replicas' `rloop_operator_leader` throughout: never two at once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rloop_operator.handlers import EXIT_LOST_LEASE
from rloop_operator.naming import run_selector
from tests.helpers import small_doc
from tests.k8s.apiserver import JOBS, LEASES, RLOOPRUNS, Server, start
from tests.k8s.kubelet import Kubelet
from tests.k8s.operator import LEASE_ENV, OperatorProcess, sample, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(180)]

NS = "rloop-ha"
LEASE_NAME = "rloop-operator"
LEASE_NAMESPACE = LEASE_ENV["RLOOP_OPERATOR_LEASE_NAMESPACE"]
LEASE_SECONDS = float(LEASE_ENV["RLOOP_OPERATOR_LEASE_DURATION_SECONDS"])
RETRY_SECONDS = float(LEASE_ENV["RLOOP_OPERATOR_RETRY_PERIOD_SECONDS"])
STAGES = 5  # base init, rl, verify, rft, eval heldout


def instant_message(job: dict[str, Any]) -> str:
    stage = job["metadata"]["labels"].get("rloop.dev/stage", "")
    if stage.endswith(".rl"):
        return '{"train_reward_last10pct": 0.5}'
    if ".eval." in stage:
        return '{"avg_at_n": 0.4, "pass_at_k": {"1": 0.4, "4": 0.8}}'
    return "{}"


def metrics_of(op: OperatorProcess) -> str | None:
    try:
        return op.metrics()
    except OSError:
        return None


def is_leader(op: OperatorProcess) -> bool:
    text = metrics_of(op)
    return text is not None and sample(text, "rloop_operator_leader") == 1


def reconcile_passes(op: OperatorProcess) -> float:
    return sample(op.metrics(), "rloop_reconcile_duration_seconds_count") or 0.0


def jobs_created(op: OperatorProcess, run: str) -> float:
    """Jobs this replica created for `run` (rloop_stage_attempts_total, summed over stages)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(op.metrics())
        for s in family.samples
        if s.name == "rloop_stage_attempts_total" and s.labels.get("run") == run
    )


def created_lines(op: OperatorProcess) -> int:
    return op.log_path.read_text(errors="replace").count(": created Job ")


class LeaderMonitor:
    """Polls every running, unfrozen replica's leader gauge; records any instant two claim to lead."""

    def __init__(self, ops: list[OperatorProcess]):
        self.ops = ops
        self.frozen: set[int] = set()
        self.overlaps: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            live = [
                op
                for op in self.ops
                if op.proc is not None and op.proc.poll() is None and id(op) not in self.frozen
            ]
            leaders = [op.log_path.name for op in live if is_leader(op)]
            if len(leaders) > 1:
                self.overlaps.append(f"{time.monotonic():.2f}: {leaders}")

    def __enter__(self) -> LeaderMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def create_run(server: Server, name: str) -> None:
    doc = small_doc(name, iterations=1, eval_base=False)
    doc["metadata"]["namespace"] = NS
    doc["spec"]["storage"] = {"uri": "s3://bucket/runs"}
    server.create(RLOOPRUNS, doc, namespace=NS)


def wait_succeeded(server: Server, name: str, op: OperatorProcess) -> None:
    def succeeded() -> bool:
        conditions = ((server.get(RLOOPRUNS, NS, name) or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Succeeded" and c["status"] == "True" for c in conditions)

    wait_for(succeeded, 45, f"run {name} to succeed", op)


def job_names(server: Server, run: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in server.list(JOBS, NS, labels=run_selector(run)))


def lease_spec(server: Server) -> dict[str, Any]:
    return (server.get(LEASES, LEASE_NAMESPACE, LEASE_NAME) or {}).get("spec") or {}


def test_two_replicas_only_the_leader_acts_and_the_standby_takes_over(tmp_path: Path) -> None:
    server = start()
    server.create_namespace(NS)
    kubelet = Kubelet(server, namespace=NS, instant=True, instant_message=instant_message, poll_interval=0.1)
    kubelet.start()
    a = OperatorProcess(server, tmp_path / "a.log", namespace=NS)
    b = OperatorProcess(server, tmp_path / "b.log", namespace=NS)
    ops = [a, b]
    monitor = LeaderMonitor(ops)
    try:
        a.start()
        b.start()
        with monitor:
            # ---------------------------------------------------------- 1. one leader, one standby
            leader = wait_for(
                lambda: next((op for op in ops if is_leader(op)), None), 20, "a leader", a
            )
            standby = b if leader is a else a
            create_run(server, "first")
            wait_succeeded(server, "first", leader)
            assert len(job_names(server, "first")) == STAGES
            assert all(name.endswith("-a0") for name in job_names(server, "first"))
            assert jobs_created(leader, "first") == STAGES
            assert jobs_created(standby, "first") == 0
            assert reconcile_passes(standby) == 0 and reconcile_passes(leader) > 0
            assert not is_leader(standby)
            assert lease_spec(server)["leaseTransitions"] == 0

            # ------------------------------------------- 2. the leader dies; the standby takes over
            leader.kill()
            killed_at = time.monotonic()
            create_run(server, "second")
            wait_for(lambda: is_leader(standby), LEASE_SECONDS + 10, "the standby to take over", standby)
            took = time.monotonic() - killed_at
            # Not before the Lease expired (the last renewal was at most one retry period before the
            # kill), and about one lease duration after it.
            assert LEASE_SECONDS - RETRY_SECONDS - 0.5 <= took <= LEASE_SECONDS + RETRY_SECONDS + 3.0, took
            wait_succeeded(server, "second", standby)
            assert len(job_names(server, "second")) == STAGES
            assert jobs_created(standby, "second") == STAGES
            assert len(job_names(server, "first")) == STAGES  # the finished run was left alone
            assert lease_spec(server)["leaseTransitions"] == 1
            new_leader, restarted = standby, leader

            # ------------------ 3. restart the dead one as a standby; freeze the leader; it must go
            restarted.start()
            assert not is_leader(restarted) and reconcile_passes(restarted) == 0
            monitor.frozen.add(id(new_leader))
            new_leader.pause()
            frozen_created = created_lines(new_leader)
            create_run(server, "third")
            wait_for(lambda: is_leader(restarted), LEASE_SECONDS + 10, "the restarted one to lead", restarted)
            wait_succeeded(server, "third", restarted)
            assert jobs_created(restarted, "third") == STAGES
            new_leader.resume()
            assert new_leader.proc is not None
            code = new_leader.proc.wait(10)  # it wakes past its renew deadline: no Lease, exit at once
            monitor.frozen.discard(id(new_leader))
            assert code == EXIT_LOST_LEASE, new_leader.log_tail()
            assert "lost the leader Lease" in new_leader.log_path.read_text()
            assert created_lines(new_leader) == frozen_created  # it created nothing after waking
            assert len(job_names(server, "third")) == STAGES
            assert lease_spec(server)["leaseTransitions"] == 2

            # ----------------------------------------- 4. a graceful stop releases the Lease
            assert restarted.proc is not None
            restarted.stop()
            assert restarted.proc.returncode == 0, restarted.log_tail()
            spec = lease_spec(server)
            assert spec["holderIdentity"] == "" and spec["leaseTransitions"] == 2
        assert not monitor.overlaps, monitor.overlaps
        assert not kubelet.errors, kubelet.errors
    finally:
        for op in ops:
            if op.proc is not None and op.proc.poll() is None:
                op.resume()  # a stopped process would not see SIGTERM
            op.stop()
        kubelet.stop()
        server.stop()
