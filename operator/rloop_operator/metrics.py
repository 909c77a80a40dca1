"""Prometheus metrics of the operator (`rloop_` prefix, base units) and the /metrics + /healthz server.

Label sets are bounded: namespace, run, stage (the stage *kind*: init, rl, rollout, verify, rft, eval)
and condition. Per-run series are dropped when the run is deleted.

Per-run gauges are not set imperatively: a collector renders them at scrape time from the last
observed state of each run (`RunState`), so a deleted run's series vanish with its entry.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rloop.plan import STAGE_KINDS
from rloop_operator.conditions import CONDITION_TYPES

STAGE_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

RunKey = tuple[str, str]
"""(namespace, name)"""


@dataclass
class RunState:
    """What the last reconcile pass of one run saw (the per-run gauges)."""

    conditions: frozenset[str] = frozenset()
    """Condition types that are True."""
    iteration: int | None = None
    stage: str | None = None
    stages_committed: int | None = None
    stages_total: int | None = None
    train_reward: float | None = None
    eval_avg_at_n: float | None = None
    eval_pass_at_k: float | None = None
    last_activity: float | None = None
    """Unix time a stage Job last was created, started or finished."""


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    runs: dict[RunKey, RunState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: the operator's own footprint
        PlatformCollector(registry=r)
        self._lock = threading.Lock()
        self.stage_duration = Histogram(
            "rloop_stage_duration_seconds",
            "Wall time of finished stage Jobs (start to end), by outcome.",
            ["namespace", "stage", "outcome"],
            buckets=STAGE_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_attempts = Counter(
            "rloop_stage_attempts",
            "Stage Jobs created (every attempt, retries included).",
            ["namespace", "run", "stage"],
            registry=r,
        )
        self.stage_failures = Counter(
            "rloop_stage_failures",
            "Stage Jobs that failed.",
            ["namespace", "run", "stage"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "rloop_reconcile_duration_seconds",
            "Wall time of one reconcile pass of one run (API calls included).",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "rloop_reconcile_errors", "Reconcile passes that raised (retried with backoff).", registry=r
        )
        self.leader = Gauge(
            "rloop_operator_leader",
            "1 while this replica holds the leader Lease and reconciles (also when leader election is "
            "off); 0 on a standby.",
            registry=r,
        )
        self.queue_depth: Callable[[], float] = lambda: 0.0
        r.register(_RunCollector(self))

    def set_run(self, key: RunKey, state: RunState) -> None:
        with self._lock:
            self.runs[key] = state

    def forget_run(self, key: RunKey) -> None:
        """Drop every series of a deleted run."""
        with self._lock:
            self.runs.pop(key, None)
        ns, name = key
        for kind in STAGE_KINDS:
            for counter in (self.stage_attempts, self.stage_failures):
                with contextlib.suppress(KeyError):
                    counter.remove(ns, name, kind)

    def snapshot(self) -> dict[RunKey, RunState]:
        with self._lock:
            return dict(self.runs)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RunCollector(Collector):
    def __init__(self, metrics: OperatorMetrics):
        self._m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runs = self._m.snapshot()
        by_condition = GaugeMetricFamily(
            "rloop_runs",
            "RLoopRuns whose condition is True, by namespace and condition.",
            labels=["namespace", "condition"],
        )
        counts: dict[tuple[str, str], int] = {}
        for (ns, _), state in runs.items():
            for c in CONDITION_TYPES:
                counts[(ns, c)] = counts.get((ns, c), 0) + (c in state.conditions)
        for (ns, c), n in sorted(counts.items()):
            by_condition.add_metric([ns, c], n)
        yield by_condition

        gauges = {
            "iteration": ("rloop_run_iteration", "Iteration of the run's current (or last) stage."),
            "stages_committed": ("rloop_run_stages_committed", "Stages of the run committed so far."),
            "stages_total": ("rloop_run_stages", "Stages in the run's plan."),
            "train_reward": (
                "rloop_run_train_reward",
                "Mean train reward over the last 10% of the latest RL stage.",
            ),
            "eval_avg_at_n": (
                "rloop_run_eval_avg_at_n",
                "Held-out avg@n of the latest evaluation (first eval set).",
            ),
            "eval_pass_at_k": (
                "rloop_run_eval_pass_at_k",
                "Held-out pass@k (largest k) of the latest evaluation.",
            ),
            "last_activity": (
                "rloop_run_last_activity_timestamp_seconds",
                "Unix time a stage Job of the run was last created, started or finished.",
            ),
        }
        families = {
            attr: GaugeMetricFamily(name, doc, labels=["namespace", "run"])
            for attr, (name, doc) in gauges.items()
        }
        condition = GaugeMetricFamily(
            "rloop_run_condition",
            "1 when the run's condition is True.",
            labels=["namespace", "run", "condition"],
        )
        stage = GaugeMetricFamily(
            "rloop_run_stage_info",
            "The run's current stage (value 1; the stage id is a label).",
            labels=["namespace", "run", "stage"],
        )
        for (ns, name), state in sorted(runs.items()):
            for attr, family in families.items():
                value = getattr(state, attr)
                if value is not None:
                    family.add_metric([ns, name], float(value))
            for c in CONDITION_TYPES:
                condition.add_metric([ns, name, c], 1.0 if c in state.conditions else 0.0)
            if state.stage:
                stage.add_metric([ns, name, state.stage], 1.0)
        yield from families.values()
        yield condition
        yield stage
        yield GaugeMetricFamily(
            "rloop_workqueue_depth", "Runs waiting for a reconcile worker.", value=self._m.queue_depth()
        )


# ------------------------------------------------------------------------------------------ server
async def start_server(
    metrics: OperatorMetrics, healthy: Callable[[], tuple[bool, str]], host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Serve GET /metrics and GET /healthz; returns the runner (for cleanup) and the bound port."""

    async def get_metrics(_: web.Request) -> web.Response:
        body = metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_healthz(_: web.Request) -> web.Response:
        ok, why = healthy()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound
