"""kopf handlers: they only turn watch events into work-queue keys. Run with

    kopf run -m rloop_operator --namespace=<ns>      # or --all-namespaces

Events of an RLoopRun, and of the Jobs it owns, name the run; a worker then reconciles it
(`controller.Controller`). kopf stores nothing on the objects: no finalizers (a run's Jobs are
garbage-collected through their ownerReferences), no progress annotations; all state is in the status
and the Jobs, so a restarted operator simply reconciles every run it lists at start-up.

With leader election (`leader.py`, on by default) every replica watches and queues keys, but only the
Lease holder starts its workers: a standby's queue holds every run it has seen (kopf lists them all at
start), so on taking over it reconciles them all. A leader that cannot renew within the renew deadline
exits (`EXIT_LOST_LEASE`) without another pass, and the Deployment restarts it as a standby, as
controller-runtime's managers do. On SIGTERM it stops its workers, then releases the Lease.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from aiohttp import web

from rloop.spec import API_GROUP, API_VERSION, KIND, PLURAL
from rloop_operator.controller import Controller
from rloop_operator.k8s import COMPONENT, KubeApi
from rloop_operator.leader import Elector, keep_leading, pod_namespace
from rloop_operator.metrics import OperatorMetrics, start_server
from rloop_operator.naming import LABEL_MANAGED_BY, MANAGED_BY
from rloop_operator.settings import OperatorSettings, load_settings
from rloop_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

EXIT_LOST_LEASE = 3
"""Exit status of a leader that could not renew its Lease in time (the Deployment restarts it)."""


@dataclass
class Runtime:
    settings: OperatorSettings
    controller: Controller
    queue: WorkQueue
    metrics: OperatorMetrics
    executor: ThreadPoolExecutor
    elector: Elector | None = None
    """None when leader election is off: this replica acts from the start."""
    election: asyncio.Task[None] | None = None
    lease_executor: ThreadPoolExecutor | None = None
    server: web.AppRunner | None = None
    port: int = 0
    active: bool = field(default=False, init=False)
    """Workers started (this replica leads, or election is off)."""

    def may_act(self) -> bool:
        """Checked before every pass: a leader whose Lease ran out never starts another one."""
        return self.elector is None or self.elector.leading(time.monotonic())

    def start_acting(self) -> None:
        """Start the workers: they reconcile every key queued meanwhile (kopf lists every run)."""
        if self.active:
            return
        self.active = True
        self.metrics.leader.set(1)
        log.info("reconciling: %d run(s) queued", self.queue.depth)
        self.queue.start()

    def healthy(self) -> tuple[bool, str]:
        if not self.active:
            if self.election is not None and self.election.done():
                return False, "leader election stopped"
            return True, "ok"  # a standby is healthy: it watches, queues keys and waits for the Lease
        if not self.queue.alive():
            return False, "reconcile workers stopped"
        waited = time.monotonic() - self.queue.last_progress
        if self.queue.depth and waited > self.settings.stuck_seconds:
            return False, f"{self.queue.depth} run(s) queued and no pass finished for {waited:.0f}s"
        return True, "ok"


def owner_run(body: Any) -> str | None:
    """Name of the RLoopRun controlling a Job (from its ownerReferences)."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{API_GROUP}/"):
            return ref.get("name")
    return None


def lost_lease() -> None:
    """Stop acting at once: exit without cleanup (no pass may start, none is waited for)."""
    log.critical("lost the leader Lease: exiting with status %d to restart as a standby", EXIT_LOST_LEASE)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(EXIT_LOST_LEASE)


def leader_identity() -> str:
    """The pod's name (HOSTNAME) and a random suffix, like client-go: unique even for two processes on
    one host, readable in `kubectl get lease`."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}_{uuid.uuid4().hex[:8]}"


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = load_settings()
    # Only our Jobs travel over the wire (a server-side selector, not a client-side filter).
    settings.watching.label_selectors["batch", "jobs"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    # No kopf peering (its KopfPeering objects freeze every replica of equal priority, and need their
    # own CRDs): replicas coordinate through our Lease (leader.py). No CRD scanning to authorise.
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.posting.reporting_component = COMPONENT
    # kopf logs every handled watch event at INFO; ours say what changed (Jobs created, retries).
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    api = KubeApi.from_environment()
    controller = Controller(api, config, metrics)

    # One thread per worker: the default executor has min(32, CPUs + 4) threads and kopf uses it too.
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rloop-reconcile")
    runtime: Runtime

    async def handle(key: Any) -> float | None:
        if not runtime.may_act():
            return None  # the Lease ran out: this process is about to exit; the next leader does it
        return await asyncio.get_running_loop().run_in_executor(executor, controller.reconcile, key)

    queue = WorkQueue(handle, workers=config.workers)
    metrics.queue_depth = lambda: float(queue.depth)
    runtime = Runtime(config, controller, queue, metrics, executor)
    if config.leader_election:
        runtime.elector = Elector(
            api,
            namespace=config.lease_namespace or pod_namespace(),
            name=config.lease_name,
            identity=leader_identity(),
            lease_duration_seconds=config.lease_duration_seconds,
            renew_deadline_seconds=config.renew_deadline_seconds,
        )
        # Its own thread: a renewal must never wait behind reconcile passes.
        runtime.lease_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rloop-lease")
        metrics.leader.set(0)
        runtime.election = asyncio.create_task(
            keep_leading(
                runtime.elector,
                retry_period=config.retry_period_seconds,
                on_started=runtime.start_acting,
                on_stopped=lost_lease,
                executor=runtime.lease_executor,
            ),
            name="rloop-leader-election",
        )
    else:
        runtime.start_acting()
    runtime.server, runtime.port = await start_server(
        metrics, runtime.healthy, config.metrics_host, config.metrics_port
    )
    memo.rloop = runtime
    log.info(
        "rloop operator: %d workers, default stage image %s, metrics on %s:%d, %s",
        config.workers,
        config.image,
        config.metrics_host,
        runtime.port,
        "leader election off"
        if runtime.elector is None
        else f"leader election on Lease {runtime.elector.namespace}/{runtime.elector.name} "
        f"as {runtime.elector.identity}",
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "rloop", None)
    if runtime is None:
        return
    await runtime.queue.stop()
    # Passes already in their threads finish before the Lease goes (it is still renewed meanwhile): the
    # next leader must not overlap them.
    await asyncio.to_thread(runtime.executor.shutdown, wait=True)
    if runtime.election is not None:
        runtime.election.cancel()
    if runtime.elector is not None and runtime.lease_executor is not None:
        elector = runtime.elector
        try:
            released = await asyncio.get_running_loop().run_in_executor(
                runtime.lease_executor, elector.release, datetime.now(UTC)
            )
        except Exception as err:  # the standby then takes over after the lease duration instead
            log.warning("could not release Lease %s/%s: %s", elector.namespace, elector.name, err)
        else:
            if released:
                log.info("released Lease %s/%s", elector.namespace, elector.name)
        runtime.lease_executor.shutdown(wait=False)
    if runtime.server is not None:
        await runtime.server.cleanup()


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def run_event(event: dict[str, Any], name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.rloop
    key = (namespace, name)
    if event.get("type") == "DELETED":
        runtime.queue.forget(key)
        runtime.controller.forget(key)
        return
    rv = ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion")
    if not runtime.controller.is_own_write(key, rv):  # our own status write needs no new pass
        runtime.queue.add(key)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def job_event(
    event: dict[str, Any], body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    run = owner_run(body)
    if not run:
        return
    runtime: Runtime = memo.rloop
    key = (namespace, run)
    meta = body.get("metadata") or {}
    # The Job as the last pass saw it (e.g. our own create): nothing new to react to.
    if event.get("type") != "DELETED" and runtime.controller.is_known_job(
        key, meta.get("name"), meta.get("resourceVersion")
    ):
        return
    runtime.queue.add(key)
