"""Live step metrics of a stage process, for Prometheus (the Helm chart's PodMonitor scrapes them).

Off unless `RLOOP_METRICS_PORT` is set (the operator sets it on stage pods; local runs leave it unset).
Names use the `rloop_` prefix and base units; labels are only `run`, `stage` (the stage kind) and, for
phase timings, `phase`. The Pod's namespace comes from the scrape target.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

from rloop import metric_names as names
from rloop.metric_names import PHASES

log = logging.getLogger(__name__)

ENV_PORT = "RLOOP_METRICS_PORT"
__all__ = ["ENV_PORT", "PHASES", "STEP_GAUGES", "StageTelemetry"]

# metric name → (key in the RL step's metrics dict, help)
STEP_GAUGES: dict[str, tuple[str, str]] = {
    names.TRAIN_STEP: ("step", "Index of the latest finished RL step."),
    names.TRAIN_REWARD: ("reward", "Mean reward of the latest RL step's samples."),
    names.TRAIN_PASS_RATE: ("pass_rate", "Fraction of the latest RL step's samples that were correct."),
    names.TRAIN_ENTROPY: ("entropy", "Mean token entropy of the latest RL step's responses."),
    names.TRAIN_TOKENS_PER_SECOND: ("tokens_per_s", "Generated tokens per second over the whole RL step."),
    names.ROLLOUT_TOKENS_PER_SECOND: ("rollout_tokens_per_s", "Generated tokens per second in rollout."),
}


class StageTelemetry:
    """Gauges updated once per RL step; a no-op when the port is not configured."""

    def __init__(self, run: str, stage: str, port: int | None):
        self.enabled = port is not None
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = {"run": run, "stage": stage}
        self._labels = labels
        self._gauges = {
            name: Gauge(name, doc, list(labels), registry=self.registry).labels(**labels)
            for name, (_, doc) in STEP_GAUGES.items()
        }
        self._phase = Gauge(
            names.TRAIN_PHASE_SECONDS,
            "Seconds the latest RL step spent in each phase.",
            [*labels, "phase"],
            registry=self.registry,
        )
        self._steps = Counter(
            names.TRAIN_STEPS, "RL steps finished by this stage process.", list(labels), registry=self.registry
        ).labels(**labels)
        start_http_server(port, registry=self.registry)
        log.info("stage metrics on :%d/metrics", port)

    @classmethod
    def from_env(cls, run: str, stage: str) -> StageTelemetry:
        raw = os.environ.get(ENV_PORT)
        try:
            port = int(raw) if raw else None
        except ValueError:
            log.warning("%s=%r is not a port number; stage metrics are off", ENV_PORT, raw)
            port = None
        try:
            return cls(run, stage, port)
        except OSError as err:  # port taken: metrics are worth less than the stage
            log.warning("stage metrics are off: %s", err)
            return cls(run, stage, None)

    def observe_step(self, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, (key, _) in STEP_GAUGES.items():
            value = metrics.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                self._gauges[name].set(value)
        for phase in PHASES:
            value = metrics.get(f"time_{phase}_s")
            if isinstance(value, int | float) and math.isfinite(value):
                self._phase.labels(**self._labels, phase=phase).set(value)
        self._steps.inc()
