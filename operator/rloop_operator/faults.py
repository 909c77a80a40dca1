"""Pure rules for what the cluster does to a run's Jobs (docs/operator.md, "Failure modes"): the API
refusing a Job, a pod that never runs, an eviction. `reconcile` applies them; nothing here calls the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rloop.spec import RLoopRunSpec
from rloop_operator.builders import abandon_patch
from rloop_operator.conditions import get_condition
from rloop_operator.jobs import JobView, format_time, parse_time

JOB_REJECTED = "JobRejected"
"""Failed reason when the API server refused a stage Job as invalid: it holds until the spec changes."""
REFUSED_REASONS = ("QuotaExceeded", "JobCreateForbidden", "JobCreateFailed")
REFUSAL_BACKOFF_MAX_SECONDS = 600.0
"""Cap of the delay between tries of a Job the API refused for now (quota, RBAC, an unavailable webhook)."""


@dataclass(frozen=True)
class Refusal:
    """The API server refused to create a stage Job (this pass)."""

    status: int
    """HTTP status: 400/422 invalid, 403 forbidden or over quota, 5xx/429 unavailable."""
    reason: str
    """The Status object's reason (Invalid, Forbidden, ...)."""
    message: str
    """The Status object's message, which names the field or the quota."""
    retry_after: float = 30.0
    """Seconds before trying again when the refusal is not permanent."""

    @property
    def permanent(self) -> bool:
        """Invalid Jobs stay invalid until the spec (or the operator's settings) change."""
        return self.status in (400, 422)

    @property
    def kind(self) -> str:
        """Condition reason for a refusal that may pass."""
        if self.status == 403 and "quota" in self.message.lower():
            return "QuotaExceeded"
        return "JobCreateForbidden" if self.status == 403 else "JobCreateFailed"


def still_rejected(conditions: list[dict[str, Any]], generation: int | None) -> str | None:
    """The message of a JobRejected failure recorded at this generation (None when there is none)."""
    failed = get_condition(conditions, "Failed")
    if failed is None or failed.get("status") != "True" or failed.get("reason") != JOB_REJECTED:
        return None
    if generation is not None and failed.get("observedGeneration") != generation:
        return None
    return str(failed.get("message") or JOB_REJECTED)


def abandonments(spec: RLoopRunSpec, views: list[JobView], now: datetime) -> tuple[dict[str, dict[str, Any]], float | None]:
    """Attempts whose pod has not run for retry.pendingTimeoutSeconds (Job name → patch stopping it), and
    the seconds until the next one is due (None: none is waiting)."""
    timeout = spec.retry.pending_timeout_seconds
    out: dict[str, dict[str, Any]] = {}
    wake: float | None = None
    if timeout <= 0:
        return out, None
    for v in views:
        if v.finished or v.suspended or v.problem is None:
            continue
        since = parse_time(v.problem.since) or parse_time(v.start_time) or parse_time(v.created) or now
        left = (since + timedelta(seconds=timeout) - now).total_seconds()
        if left <= 0:
            out[v.name] = abandon_patch(
                v.problem.reason,
                f"{v.problem.message or 'the pod did not run'} (not running for {timeout} s, "
                "retry.pendingTimeoutSeconds: the attempt was stopped)",
                format_time(now),
            )
        else:
            wake = left if wake is None else min(wake, left)
    return out, wake


def disruption_counts(views: list[JobView], old: dict[str, Any]) -> dict[str, int]:
    """Per stage, attempts that ended in an eviction or preemption; counts of vanished Jobs are kept."""
    counts: dict[str, int] = {}
    for v in views:
        if v.failure == "disrupted":
            counts[v.stage.id] = counts.get(v.stage.id, 0) + 1
    previous = old.get("disruptions")
    if isinstance(previous, dict):
        for sid, n in previous.items():
            if isinstance(sid, str) and isinstance(n, int) and not isinstance(n, bool) and n > counts.get(sid, 0):
                counts[sid] = n
    return counts
