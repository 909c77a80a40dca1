"""Prometheus metrics of the operator (`rloop_` prefix, base units) and the /metrics + /healthz server.

Label sets are bounded: namespace, run, stage (the stage *kind*: init, rl, rollout, verify, rft, eval),
condition and iteration (below spec.loop.iterations). Per-run series are dropped when the run is deleted.
The names are `rloop.metric_names`' (shared with the stage pods and the Grafana dashboard).

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

from rloop import metric_names as names
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
    expert_trajectories: dict[int, float] = field(default_factory=dict)
    """Iteration → expert-set size its verify stage reported."""
    rft_loss_before: dict[int, float] = field(default_factory=dict)
    """Iteration → the RFT stage's mean NLL of the expert set before training."""
    rft_loss: dict[int, float] = field(default_factory=dict)
    """Iteration → the RFT stage's mean NLL of the expert set after training."""


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
            names.STAGE_DURATION,
            "Wall time of finished stage Jobs (start to end), by outcome.",
            ["namespace", "stage", "outcome"],
            buckets=STAGE_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_attempts = Counter(
            names.STAGE_ATTEMPTS,
            "Stage Jobs created (every attempt, retries included).",
            ["namespace", "run", "stage"],
            registry=r,
        )
        self.stage_failures = Counter(
            names.STAGE_FAILURES,
            "Stage Jobs that failed.",
            ["namespace", "run", "stage"],
            registry=r,
        )
        self.stage_retries = Counter(
            names.STAGE_RETRIES,
            "Stage Jobs created beyond a stage's first attempt (retries, restarts after an eviction, re-runs).",
            ["namespace", "run", "stage"],
            registry=r,
        )
        self.stage_disruptions = Counter(
            names.STAGE_DISRUPTIONS,
            "Stage Jobs that ended in an eviction or preemption (restarted at once, counted against "
            "retry.disruptionLimit instead of retry.limit).",
            ["namespace", "run", "stage"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            names.RECONCILE_DURATION,
            "Wall time of one reconcile pass of one run (API calls included).",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            names.RECONCILE_ERRORS, "Reconcile passes that raised (retried with backoff).", registry=r
        )
        self.leader = Gauge(
            names.OPERATOR_LEADER,
            "1 while this replica holds the leader Lease and reconciles (also when leader election is "
            "off); 0 on a standby.",
            registry=r,
        )
        self.queue_depth: Callable[[], float] = lambda: 0.0
        r.register(_RunCollector(self))

    def stage_created(self, namespace: str, run: str, kind: str, attempt: int) -> None:
        """Count a created stage Job. Its run/stage series start at 0 here, so the first retry or
        eviction is an increase that `increase()` sees, not a series appearing out of nowhere."""
        labels = (namespace, run, kind)
        self.stage_attempts.labels(*labels).inc()
        self.stage_failures.labels(*labels)
        self.stage_disruptions.labels(*labels)
        retries = self.stage_retries.labels(*labels)
        if attempt > 0:
            retries.inc()

    def set_run(self, key: RunKey, state: RunState) -> None:
        with self._lock:
            self.runs[key] = state

    def forget_run(self, key: RunKey) -> None:
        """Drop every series of a deleted run."""
        with self._lock:
            self.runs.pop(key, None)
        ns, name = key
        for kind in STAGE_KINDS:
            for counter in (self.stage_attempts, self.stage_failures, self.stage_retries, self.stage_disruptions):
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
            names.RUNS,
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
            "iteration": (names.RUN_ITERATION, "Iteration of the run's current (or last) stage."),
            "stages_committed": (names.RUN_STAGES_COMMITTED, "Stages of the run committed so far."),
            "stages_total": (names.RUN_STAGES, "Stages in the run's plan."),
            "train_reward": (
                names.RUN_TRAIN_REWARD,
                "Mean train reward over the last 10% of the latest RL stage.",
            ),
            "eval_avg_at_n": (
                names.RUN_EVAL_AVG_AT_N,
                "Held-out avg@n of the latest evaluation (first eval set).",
            ),
            "eval_pass_at_k": (
                names.RUN_EVAL_PASS_AT_K,
                "Held-out pass@k (largest k) of the latest evaluation.",
            ),
            "last_activity": (
                names.RUN_LAST_ACTIVITY,
                "Unix time a stage Job of the run was last created, started or finished.",
            ),
        }
        families = {
            attr: GaugeMetricFamily(name, doc, labels=["namespace", "run"])
            for attr, (name, doc) in gauges.items()
        }
        condition = GaugeMetricFamily(
            names.RUN_CONDITION,
            "1 when the run's condition is True.",
            labels=["namespace", "run", "condition"],
        )
        stage = GaugeMetricFamily(
            names.RUN_STAGE_INFO,
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
        yield from _per_iteration(runs)
        yield GaugeMetricFamily(
            names.WORKQUEUE_DEPTH, "Runs waiting for a reconcile worker.", value=self._m.queue_depth()
        )


PER_ITERATION_GAUGES = {
    "expert_trajectories": (
        names.RUN_EXPERT_TRAJECTORIES,
        "Size of the expert set the iteration's verify stage kept (trajectories).",
    ),
    "rft_loss_before": (
        names.RUN_RFT_LOSS_BEFORE,
        "Mean token NLL (nats) of the iteration's expert set under the RFT stage's initial policy.",
    ),
    "rft_loss": (
        names.RUN_RFT_LOSS,
        "Mean token NLL (nats) of the iteration's expert set after the RFT stage trained on it.",
    ),
}
"""RunState attribute (iteration → value) → (metric name, help)."""


def _per_iteration(runs: dict[RunKey, RunState]) -> Iterator[GaugeMetricFamily]:
    for attr, (metric, doc) in PER_ITERATION_GAUGES.items():
        family = GaugeMetricFamily(metric, doc, labels=["namespace", "run", "iteration"])
        for (ns, name), state in sorted(runs.items()):
            for iteration, value in sorted(getattr(state, attr).items()):
                family.add_metric([ns, name, str(iteration)], float(value))
        yield family


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
