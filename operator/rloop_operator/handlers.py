"""kopf handlers: they only turn watch events into work-queue keys. Run with

    kopf run -m rloop_operator --namespace=<ns>      # or --all-namespaces

Events of an RLoopRun, and of the Jobs it owns, name the run; a worker then reconciles it
(`controller.Controller`). kopf stores nothing on the objects: no finalizers (a run's Jobs are
garbage-collected through their ownerReferences), no progress annotations; all state is in the status
and the Jobs, so a restarted operator simply reconciles every run it lists at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
from aiohttp import web

from rloop.spec import API_GROUP, API_VERSION, KIND, PLURAL
from rloop_operator.controller import Controller
from rloop_operator.k8s import COMPONENT, KubeApi
from rloop_operator.metrics import OperatorMetrics, start_server
from rloop_operator.naming import LABEL_MANAGED_BY, MANAGED_BY
from rloop_operator.settings import OperatorSettings, load_settings
from rloop_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: OperatorSettings
    controller: Controller
    queue: WorkQueue
    server: web.AppRunner | None = None
    port: int = 0

    def healthy(self) -> tuple[bool, str]:
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


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = load_settings()
    # Only our Jobs travel over the wire (a server-side selector, not a client-side filter).
    settings.watching.label_selectors["batch", "jobs"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    # One replica (Deployment strategy Recreate): no peering objects, no CRD scanning to authorise.
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.posting.reporting_component = COMPONENT
    # kopf logs every handled watch event at INFO; ours say what changed (Jobs created, retries).
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    controller = Controller(KubeApi.from_environment(), config, metrics)

    # One thread per worker: the default executor has min(32, CPUs + 4) threads and kopf uses it too.
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rloop-reconcile")

    async def handle(key: Any) -> float | None:
        return await asyncio.get_running_loop().run_in_executor(executor, controller.reconcile, key)

    queue = WorkQueue(handle, workers=config.workers)
    metrics.queue_depth = lambda: float(queue.depth)
    queue.start()
    runtime = Runtime(config, controller, queue)
    runtime.server, runtime.port = await start_server(
        metrics, runtime.healthy, config.metrics_host, config.metrics_port
    )
    memo.rloop = runtime
    log.info(
        "rloop operator: %d workers, default stage image %s, metrics on %s:%d",
        config.workers,
        config.image,
        config.metrics_host,
        runtime.port,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "rloop", None)
    if runtime is not None:
        await runtime.queue.stop()
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
