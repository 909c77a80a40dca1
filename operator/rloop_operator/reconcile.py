"""The pure core of the operator: (spec, status, observed Jobs, now) → actions.

Level-based: every pass recomputes everything from what it observes, so a pass may be repeated,
skipped or run after an operator restart with the same result, and nothing is remembered in memory.

- A stage is *committed* when one of its Jobs succeeded: a stage exits 0 only after writing its
  commit manifest, so the Job's success is the operator's evidence (it never reads the store). When a
  later stage fails with "corrupt input" naming it (exit 75: the stage moved that manifest aside), it
  takes one more success to count as committed again, so the producer is re-run. Each commit is also
  recorded in `status.committed` (Job, time, manifest digest): Jobs are deleted by users, TTL policies
  and restores, the record stays, so a committed stage is never planned again for want of its Job.
- `rloop.plan.plan(spec, committed)` says which stages are ready; for each, its Jobs say whether to
  wait, create attempt 0, retry after backoff (attempt n+1, a new Job), or give up.
- The status (conditions, stage, history, metrics, artifacts) is rebuilt from the same facts;
  condition transition times are kept when nothing changed, so "status changed?" is plain equality,
  and events are emitted only for differences between the old and the new status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from rloop.plan import Stage, dependencies, plan, policy_out
from rloop.spec import RLoopRunSpec, RLoopRunStatus, SpecError, clean_line, parse_spec, spec_warnings
from rloop_operator.builders import build_headless_service, build_job, needs_nodes_service, stage_job_name
from rloop_operator.conditions import CONDITION_TYPES, get_condition, set_condition
from rloop_operator.faults import (
    JOB_REJECTED,
    REFUSAL_BACKOFF_MAX_SECONDS,
    REFUSED_REASONS,
    Refusal,
    abandonments,
    disruption_counts,
    still_rejected,
)
from rloop_operator.jobs import JobView, PodProblem, format_time, observe_jobs, parse_time, stage_order

HISTORY_LIMIT = 20
"""Stage attempts kept in status.history; the Jobs themselves (and the store) keep everything."""
MAX_BACKOFF_SECONDS = 6 * 3600
"""Cap of the doubling retry delay (unless retry.backoffSeconds itself is larger)."""
STORE_UNAVAILABLE_LIMIT = 20
"""Attempts in a row that may end "store unavailable" (each after the stage's own retry window) before
the run fails; they do not count against retry.limit, since the stage itself did nothing wrong."""
STORE_UNAVAILABLE_BACKOFF_SECONDS = 60.0
"""Fixed delay before the next attempt after a "store unavailable" exit."""
FINISHED = "Finished"
STAGE_STARTED = "StageStarted"
EVENT_MESSAGE_MAX = 1000
MISSING_STORAGE_URI = "spec.storage.uri: required when running on Kubernetes; set it to s3://bucket/prefix"
SPEC_WARNING = "SpecWarning"
"""Event reason of a setting the spec sets but its mode ignores (`rloop.spec.spec_warnings`)."""
Event = tuple[str, str, str]
"""(type, reason, message): type is Normal or Warning."""

_OWNED_STATUS_KEYS = tuple(f.alias or n for n, f in RLoopRunStatus.model_fields.items())


@dataclass
class Observed:
    """Everything one pass looks at, as the API returned it."""

    name: str
    namespace: str
    uid: str
    generation: int | None
    spec: dict[str, Any]
    status: dict[str, Any]
    jobs: list[dict[str, Any]]
    """The run's Jobs (metadata, spec.suspend, status)."""
    terminated_messages: dict[str, str]
    """Job name → the termination message of its finished pod (a JSON stage summary, or a log tail)."""
    now: datetime
    pod_problems: dict[str, PodProblem] = field(default_factory=dict)
    """Job name → why its pod is not running (only for unfinished Jobs whose pods were looked at)."""
    refused: dict[str, Refusal] = field(default_factory=dict)
    """Job name → why the API server refused to create it in this pass (the pass is then computed again)."""


@dataclass
class Actions:
    """What the API layer should do; every list is safe to apply again (creates may hit AlreadyExists)."""

    create_services: list[dict[str, Any]] = field(default_factory=list)
    """Created before `create_jobs`: the run's headless Service, when one of them is an Indexed Job
    (its pods resolve node 0 through it; AlreadyExists is success)."""
    create_jobs: list[dict[str, Any]] = field(default_factory=list)
    suspend_jobs: list[str] = field(default_factory=list)
    resume_jobs: list[str] = field(default_factory=list)
    abandon_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Job name → merge patch stopping an attempt whose pod never ran (retry.pendingTimeoutSeconds)."""
    status: dict[str, Any] = field(default_factory=dict)
    """The full new status (camelCase, as RLoopRunStatus dumps it)."""
    status_changed: bool = False
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    """Seconds until a retry is due (nothing else will wake the operator then); None: wait for events."""
    finished: list[JobView] = field(default_factory=list)
    """Jobs the old status did not yet show as finished (for duration/failure metrics, counted once)."""
    progress: tuple[int, int] | None = None
    """(stages committed, stages in the plan); None when the spec is invalid."""
    last_activity: datetime | None = None
    """When a stage Job of the run last was created, started or finished (for "stuck" alerts)."""
    iteration_figures: dict[str, dict[int, float]] = field(default_factory=dict)
    """Per-iteration figures of the stage summaries (`iteration_figures`), for the operator's gauges."""


@dataclass(frozen=True)
class _Decision:
    """What to do about one ready stage."""

    stage: Stage
    kind: Literal["create", "running", "waiting", "failed", "refused"]
    job: str
    """The Job to create, running, failed, or (waiting) to be created when `due`."""
    attempt: int
    due: datetime | None = None
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class _Phase:
    name: Literal["Running", "Suspended", "Succeeded", "Failed"]
    reason: str
    message: str


# ------------------------------------------------------------------------------------------ stages
def _by_stage(views: list[JobView]) -> dict[str, list[JobView]]:
    out: dict[str, list[JobView]] = {}
    for v in views:
        out.setdefault(v.stage.id, []).append(v)
    for vs in out.values():
        vs.sort(key=lambda v: v.attempt)
    return out


def _blamed(spec: RLoopRunSpec, view: JobView) -> list[str]:
    """Inputs a corrupt-input failure names: the stage invalidated them (their manifest moved aside)."""
    if view.state != "Failed" or view.failure != "corrupt":
        return []
    text = str((view.summary or {}).get("message") or view.detail or "")
    try:
        deps = dependencies(spec, view.stage)
    except (AssertionError, ValueError):
        return []
    return [d.id for d in deps if f"/{d.id}/" in text]


def committed_stages(spec: RLoopRunSpec, views: list[JobView],
                     recorded: dict[str, dict[str, Any]] | None = None) -> set[str]:
    """Stages with more succeeded Jobs than corrupt-input failures that blamed them, and stages the status
    recorded as committed that no corrupt-input failure blamed since (their Jobs may be gone)."""
    successes: dict[str, int] = {}
    blames: dict[str, int] = {}
    blamed_at: dict[str, list[datetime | None]] = {}
    for v in views:
        if v.state == "Succeeded":
            successes[v.stage.id] = successes.get(v.stage.id, 0) + 1
        for dep in _blamed(spec, v):
            blames[dep] = blames.get(dep, 0) + 1
            blamed_at.setdefault(dep, []).append(v.finished_at)
    done = {sid for sid, n in successes.items() if n > blames.get(sid, 0)}
    for sid, record in (recorded or {}).items():
        if sid in done or sid in successes:  # its Jobs are here: they decide, as above
            continue
        at = parse_time(record.get("time"))
        if not any(b is None or at is None or b >= at for b in blamed_at.get(sid, [])):
            done.add(sid)
    return done


def _old_metrics(old: dict[str, Any]) -> dict[str, float]:
    raw = old.get("metrics")
    if not isinstance(raw, dict):
        return {}
    return {k: float(v) for k, v in raw.items() if isinstance(k, str) and _number(v) is not None}


def _recorded(old: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """status.committed of the last pass, entries that are well-formed."""
    raw = old.get("committed")
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("job"), str)}


def commit_records(committed: set[str], views: list[JobView], old: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """status.committed for the committed stages: the latest succeeded Job's evidence, else the old record."""
    out: dict[str, Any] = {}
    latest: dict[str, JobView] = {}
    for v in views:
        if v.state == "Succeeded" and (v.stage.id not in latest or v.attempt > latest[v.stage.id].attempt):
            latest[v.stage.id] = v
    for sid in sorted(committed):
        v = latest.get(sid)
        if v is not None:
            digest = (v.summary or {}).get("manifest_sha256")
            record = {"job": v.name, "time": v.end_time or v.start_time or v.created}
            if isinstance(digest, str):
                record["digest"] = digest[:64]
            out[sid] = {k: val for k, val in record.items() if val is not None}
        elif sid in old:
            out[sid] = old[sid]
    return out


def retry_delay(spec: RLoopRunSpec, failures: int) -> float:
    """Seconds before the retry after the `failures`-th failure in a row (backoff, doubling, capped)."""
    base = spec.retry.backoff_seconds
    return float(min(base * 2 ** max(failures - 1, 0), max(base, MAX_BACKOFF_SECONDS)))


def _stale(view: JobView, generation: int | None) -> bool:
    """A failure the spec caused, from a spec that has been edited since (any edit: even a revert)."""
    return (
        view.failure == "invalid"
        and generation is not None
        and view.generation is not None
        and view.generation != generation
    )


def _decide(
    name: str, spec: RLoopRunSpec, stage: Stage, views: list[JobView], now: datetime, generation: int | None = None
) -> _Decision:
    def attempt_job(attempt: int) -> str:  # the name build_job gives it (shorter for an Indexed Job)
        return stage_job_name(name, spec, stage, attempt)

    if not views:
        return _Decision(stage, "create", attempt_job(0), 0)
    latest = views[-1]
    if not latest.finished:
        problem = latest.problem
        return _Decision(stage, "running", latest.name, latest.attempt,
                         reason="StagePending" if problem else "", message=problem.text() if problem else "")
    nxt = latest.attempt + 1
    if latest.state == "Succeeded":  # its output was invalidated since: make it again, now
        return _Decision(stage, "create", attempt_job(nxt), nxt)
    if _stale(latest, generation):  # the spec changed since it was refused: try the new one, now
        return _Decision(stage, "create", attempt_job(nxt), nxt)
    if latest.failure == "disrupted":  # evicted or preempted: not the stage's fault, restart at once
        disruptions = sum(v.failure == "disrupted" for v in views)
        if disruptions > spec.retry.disruption_limit:
            return _Decision(
                stage, "failed", latest.name, latest.attempt, reason="TooManyDisruptions",
                message=f"stage {stage.id} was evicted or preempted {disruptions} time(s) "
                f"(retry.disruptionLimit {spec.retry.disruption_limit}); last Job {latest.name}: {latest.detail}; "
                "raise retry.disruptionLimit, or give the stage a higher priorityClassName",
            )
        return _Decision(stage, "create", attempt_job(nxt), nxt)
    if latest.failure == "invalid":
        return _Decision(
            stage,
            "failed",
            latest.name,
            latest.attempt,
            reason="InvalidInput",
            message=f"stage {stage.id} rejected its input (Job {latest.name}): {latest.detail}; "
            "retrying cannot help: fix the spec or the data",
        )
    failures = unavailable = 0  # in a row, since the stage last succeeded; outages counted apart
    for v in views:
        if v.state != "Failed" or _stale(v, generation):
            failures = unavailable = 0
        elif v.failure == "disrupted":  # counted against retry.disruptionLimit instead
            continue
        elif v.failure == "unavailable":
            unavailable += 1
        else:
            failures, unavailable = failures + 1, 0
    if latest.failure == "unavailable":
        if unavailable > STORE_UNAVAILABLE_LIMIT:
            return _Decision(
                stage, "failed", latest.name, latest.attempt, reason="StoreUnavailable",
                message=f"stage {stage.id}: the store stayed unavailable through {unavailable} attempts; "
                f"last Job {latest.name}: {latest.detail}",
            )
        due = (latest.finished_at or now) + timedelta(seconds=STORE_UNAVAILABLE_BACKOFF_SECONDS)
        if due <= now:
            return _Decision(stage, "create", attempt_job(nxt), nxt)
        return _Decision(stage, "waiting", attempt_job(nxt), nxt, due=due, reason="StoreUnavailable",
                         message=str(latest.detail or ""))
    if failures > spec.retry.limit:
        return _Decision(
            stage,
            "failed",
            latest.name,
            latest.attempt,
            reason="StageFailed",
            message=f"stage {stage.id} failed {failures} time(s) (retry.limit {spec.retry.limit}); "
            f"last Job {latest.name}: {latest.detail}",
        )
    finished = latest.finished_at
    due = now if finished is None else finished + timedelta(seconds=retry_delay(spec, failures))
    if due <= now:
        return _Decision(stage, "create", attempt_job(nxt), nxt)
    return _Decision(stage, "waiting", attempt_job(nxt), nxt, due=due)


# ------------------------------------------------------------------------------------------ status
def _record(v: JobView) -> dict[str, Any]:
    rec: dict[str, Any] = {"stage": v.stage.id, "attempt": v.attempt, "job": v.name, "state": v.state}
    if v.start_time:
        rec["startTime"] = v.start_time
    if v.end_time:
        rec["endTime"] = v.end_time
    if v.detail:
        rec["message"] = v.detail
    elif v.problem is not None:
        rec["message"] = clean_line(f"not running: {v.problem.text()}", 300)
    return rec


def _history(views: list[JobView], created: list[_Decision]) -> list[dict[str, Any]]:
    """Last HISTORY_LIMIT attempts in DAG order (time-free, so a repeated pass gives the same list)."""
    rows = [((stage_order(v.stage), v.attempt, v.name), _record(v)) for v in views]
    rows += [
        (
            (stage_order(d.stage), d.attempt, d.job),
            {"stage": d.stage.id, "attempt": d.attempt, "job": d.job, "state": "Pending"},
        )
        for d in created
    ]
    rows.sort(key=lambda r: r[0])
    return [rec for _, rec in rows[-HISTORY_LIMIT:]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def run_metrics(spec: RLoopRunSpec, views: list[JobView]) -> dict[str, float]:
    """trainReward of the latest RL stage; evalAvgAtN / evalPassAtK (largest k) of the latest eval."""
    out: dict[str, float] = {}
    ok = [v for v in views if v.state == "Succeeded" and v.summary]
    rl = [
        v for v in ok if v.stage.kind == "rl" and _number(v.summary.get("train_reward_last10pct")) is not None
    ]
    if rl:
        latest = max(rl, key=lambda v: (stage_order(v.stage), v.attempt))
        out["trainReward"] = _number(latest.summary["train_reward_last10pct"])
    set_rank = {s.name: i for i, s in enumerate(spec.data.eval)}
    evals = [v for v in ok if v.stage.kind == "eval"]
    if evals:
        # Latest iteration first; within it the first set of the spec (the run's headline number).
        latest = min(
            evals, key=lambda v: (-stage_order(v.stage)[0], set_rank.get(v.stage.eval_set, 99), -v.attempt)
        )
        avg = _number(latest.summary.get("avg_at_n"))
        if avg is not None:
            out["evalAvgAtN"] = avg
        pass_at_k = latest.summary.get("pass_at_k")
        if isinstance(pass_at_k, dict):
            ks = []
            for k, val in pass_at_k.items():
                try:
                    ks.append((int(k), _number(val)))
                except (TypeError, ValueError):
                    continue
            ks = [(k, val) for k, val in ks if val is not None]
            if ks:
                out["evalPassAtK"] = max(ks)[1]
    return out


ITERATION_FIGURES = {
    "expert_trajectories": ("verify", "expert_trajectories"),
    "rft_loss_before": ("rft", "nll_before"),
    "rft_loss": ("rft", "nll_after"),
}
"""Figure → (stage kind, key of its succeeded summary): one value per iteration."""


def iteration_figures(views: list[JobView]) -> dict[str, dict[int, float]]:
    """Figure → iteration → value, from the latest succeeded attempt of each iteration's stage that
    reported it (a re-run stage's newer summary wins)."""
    out: dict[str, dict[int, float]] = {}
    ok = sorted(
        (v for v in views if v.state == "Succeeded" and v.summary and v.stage.iteration is not None),
        key=lambda v: v.attempt,
    )
    for figure, (kind, key) in ITERATION_FIGURES.items():
        for v in ok:
            value = _number(v.summary.get(key)) if v.stage.kind == kind else None
            if value is not None:
                out.setdefault(figure, {})[v.stage.iteration] = value
    return out


def run_artifacts(spec: RLoopRunSpec, run_uri: str, committed: set[str]) -> dict[str, str]:
    """runUri, and latestPolicy: the policy of the last finished iteration (else P_0 once built)."""
    out = {"runUri": run_uri}
    for k in reversed(range(spec.loop.iterations)):
        path = policy_out(spec, k)
        if path.rsplit("/", 1)[0] in committed:
            out["latestPolicy"] = f"{run_uri}/{path}"
            return out
    if "base/init" in committed:
        out["latestPolicy"] = f"{run_uri}/base/init/policy"
    return out


def _conditions(
    old: list[dict[str, Any]],
    phase: _Phase,
    progressing: tuple[str, str] | None,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """All five conditions for the phase, in canonical order; transition times kept where unchanged."""
    p = phase
    table: dict[str, tuple[str, str, str]]
    if p.name == "Succeeded":
        table = {t: ("False", "Succeeded", "") for t in CONDITION_TYPES}
        table["Ready"] = table["Succeeded"] = ("True", "Succeeded", p.message)
    elif p.name == "Failed":
        table = {t: ("False", p.reason, "") for t in CONDITION_TYPES}
        table["Ready"] = ("False", p.reason, p.message)
        table["Failed"] = ("True", p.reason, p.message)
    elif p.name == "Suspended":
        table = {t: ("False", "Suspended", p.message) for t in CONDITION_TYPES}
        table["Failed"] = ("False", "Suspended", "")
        table["Suspended"] = (
            "True",
            "Suspended",
            "spec.suspend is true: running stage Jobs are suspended and "
            "no new stage starts; set it to false to resume",
        )
    else:
        table = {t: ("False", "Running", "") for t in CONDITION_TYPES}
        table["Ready"] = table["Succeeded"] = ("False", "Running", p.message)
        reason, message = progressing or ("StageRunning", p.message)
        # Not progressing while the API refuses the stage's Job (quota, RBAC): the run waits on someone.
        table["Progressing"] = ("False" if reason in REFUSED_REASONS else "True", reason, message)
    current = [c for c in old if isinstance(c, dict) and c.get("type") in CONDITION_TYPES]
    for t in CONDITION_TYPES:
        status, reason, message = table[t]
        current = set_condition(current, t, status, reason, message, now, generation)
    return [get_condition(current, t) for t in CONDITION_TYPES]


def _progress(done: int, total: int) -> str:
    return f"{done}/{total} stages committed"


def started_message(stage: Stage, job: str, attempt: int) -> str:
    return f"stage {stage.id}: created Job {job} (attempt {attempt})"


def without_started(events: list[Event], jobs: set[str]) -> list[Event]:
    """`events` minus the StageStarted events of `jobs` (Jobs a create found already existing)."""
    return [
        e for e in events if not (e[1] == STAGE_STARTED and any(f"created Job {j} (" in e[2] for j in jobs))
    ]


def newly_finished(old: dict[str, Any], new: dict[str, Any], views: list[JobView]) -> list[JobView]:
    """Finished Jobs in the new status's history that the old status did not show in that state."""
    old_states = {h.get("job"): h.get("state") for h in old.get("history") or [] if isinstance(h, dict)}
    in_history = {h["job"] for h in new.get("history") or []}
    return [v for v in views if v.name in in_history and v.finished and old_states.get(v.name) != v.state]


def last_activity(views: list[JobView]) -> datetime | None:
    """Latest creation, start or end time among the run's Jobs."""
    times = [parse_time(t) for v in views for t in (v.created, v.start_time, v.end_time)]
    return max((t for t in times if t is not None), default=None)


def _events(
    old: dict[str, Any],
    new: dict[str, Any],
    views: list[JobView],
    created: list[_Decision],
    extra: list[Event] | None = None,
) -> list[Event]:
    """Events for what changed between the old and the new status, in causal order: Jobs that finished,
    Jobs whose pod stopped running, Jobs being created (or refused: `extra`), then the run's own
    transitions."""
    events: list[Event] = []
    for v in newly_finished(old, new, views):
        if v.state == "Succeeded":
            events.append(("Normal", "StageSucceeded", f"stage {v.stage.id}: Job {v.name} succeeded"))
        else:
            events.append(("Warning", "JobFailed", f"stage {v.stage.id}: Job {v.name} failed: {v.detail}"))
    old_messages = {h.get("job"): h.get("message") for h in old.get("history") or [] if isinstance(h, dict)}
    for v in views:
        if v.problem is None or v.finished:
            continue
        text = _record(v)["message"]  # "not running: <reason>: <message>"
        if old_messages.get(v.name) != text:
            events.append(("Warning", "StagePending", f"stage {v.stage.id}: Job {v.name} is {text}"))
    for d in created:
        events.append(("Normal", STAGE_STARTED, started_message(d.stage, d.job, d.attempt)))
    events += extra or []
    old_conds = old.get("conditions") or []

    def flipped(t: str, status: str) -> dict[str, Any] | None:
        o, n = get_condition(old_conds, t), get_condition(new["conditions"], t)
        if n is None or n["status"] != status:
            return None
        same = o is not None and (o.get("status"), o.get("reason"), o.get("message")) == (
            n["status"],
            n["reason"],
            n["message"],
        )
        if status == "False":  # "turned off": only a change of status counts
            same = o is None or o.get("status") != "True"
        return None if same else n

    if c := flipped("Failed", "True"):
        events.append(("Warning", c["reason"], c["message"]))
    if c := flipped("Succeeded", "True"):
        events.append(("Normal", "RunSucceeded", c["message"]))
    if c := flipped("Suspended", "True"):
        events.append(("Normal", "Suspended", c["message"]))
    if flipped("Suspended", "False"):
        events.append(("Normal", "Resumed", "spec.suspend is false: stage Jobs resume"))
    return events


def _finish(
    old: dict[str, Any],
    new: dict[str, Any],
    views: list[JobView],
    created: list[_Decision],
    actions: Actions,
    extra_events: list[Event] | None = None,
) -> Actions:
    actions.status = RLoopRunStatus.model_validate(new).to_wire()
    actions.status_changed = actions.status != _owned(old)
    actions.finished = newly_finished(old, actions.status, views)
    actions.last_activity = last_activity(views)
    actions.iteration_figures = iteration_figures(views)
    # Kubernetes caps an Event's message at 1 KiB.
    actions.events = [
        (t, r, m[:EVENT_MESSAGE_MAX]) for t, r, m in _events(old, actions.status, views, created, extra_events)
    ]
    return actions


def _owned(status: dict[str, Any]) -> dict[str, Any]:
    """The part of a stored status this module writes (other writers' keys are not compared)."""
    return {k: v for k, v in status.items() if k in _OWNED_STATUS_KEYS and v is not None}


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` into `new`: keys this module owns that `new` dropped become null."""
    patch = dict(new)
    for k in _owned(old or {}):
        patch.setdefault(k, None)
    return patch


def _after_refusal(d: _Decision, refusal: Refusal | None, now: datetime) -> _Decision:
    """The decision to create a Job, once the API server refused it."""
    if d.kind != "create" or refusal is None:
        return d
    if refusal.permanent:
        return _Decision(
            d.stage, "failed", d.job, d.attempt, reason=JOB_REJECTED,
            message=f"stage {d.stage.id}: the API server refused Job {d.job} as invalid: {refusal.message}; "
            "fix the field it names (spec.resources, spec.queueName, or the operator's stage image): "
            "any edit of the spec makes the operator try again",
        )
    due = now + timedelta(seconds=min(refusal.retry_after, REFUSAL_BACKOFF_MAX_SECONDS))
    return _Decision(d.stage, "waiting", d.job, d.attempt, due=due, reason=refusal.kind, message=refusal.message)


def _waiting_text(d: _Decision) -> str:
    what = {
        "StoreUnavailable": "could not reach the store",
        "QuotaExceeded": "is over a ResourceQuota",
        "JobCreateForbidden": "may not create its Job",
        "JobCreateFailed": "could not create its Job",
    }.get(d.reason, "failed")
    detail = f" ({d.message[:200]})" if d.message else ""
    return f"{d.stage.id} {what}; attempt {d.attempt} (Job {d.job}) starts at {format_time(d.due)}{detail}"


# ------------------------------------------------------------------------------------------- entry
def run_uri_of(spec: RLoopRunSpec, namespace: str, name: str) -> str:
    """`<storage.uri>/<namespace>/<name>`, the same layout the local runner uses."""
    if not spec.storage.uri:
        raise SpecError(MISSING_STORAGE_URI)
    return f"{spec.storage.uri.rstrip('/')}/{namespace}/{name}"


def reconcile(obs: Observed, *, default_image: str) -> Actions:
    """One reconcile pass. Pure: the same Observed gives the same Actions."""
    now = obs.now if obs.now.tzinfo else obs.now.replace(tzinfo=UTC)
    now_s = format_time(now)
    old = obs.status if isinstance(obs.status, dict) else {}
    old_conds = old.get("conditions") if isinstance(old.get("conditions"), list) else []
    views = observe_jobs(obs.jobs or [], obs.name, obs.uid, obs.terminated_messages or {}, obs.pod_problems)
    gen = obs.generation

    try:
        spec = parse_spec(obs.spec if isinstance(obs.spec, dict) else {})
        run_uri = run_uri_of(spec, obs.namespace, obs.name)
    except SpecError as err:
        # Nothing can run; keep what the status already says about progress, and name the bad field.
        phase = _Phase("Failed", "InvalidSpec", str(err))
        new = {k: old[k] for k in ("iteration", "stage", "metrics", "artifacts") if old.get(k) is not None}
        try:
            RLoopRunStatus.model_validate(new)
        except ValueError:  # a hand-edited status must not wedge the run: drop what does not validate
            new = {}
        new |= {
            "observedGeneration": gen,
            "conditions": _conditions(old_conds, phase, None, now_s, gen),
            "history": _history(views, []),
        }
        return _finish(old, new, views, [], Actions())

    by_stage = _by_stage(views)
    recorded = _recorded(old)
    committed = committed_stages(spec, views, recorded)
    p = plan(spec, committed)
    decisions = [_decide(obs.name, spec, s, by_stage.get(s.id, []), now, gen) for s in p.ready]
    extra_events: list[Event] = []
    if obs.refused:
        decisions = [_after_refusal(d, obs.refused.get(d.job), now) for d in decisions]
        extra_events = [
            ("Warning", d.reason, f"stage {d.stage.id}: the API server refused Job {d.job}: {d.message}")
            for d in decisions if d.job in obs.refused and d.reason in REFUSED_REASONS
        ]
    if old.get("observedGeneration") != gen:  # once per spec generation: settings the mode ignores
        extra_events += [("Warning", SPEC_WARNING, w) for w in spec_warnings(spec)]
    failed = [d for d in decisions if d.kind == "failed"]
    rejected = still_rejected(old_conds, gen)
    if rejected is not None and not failed and not p.finished:
        # Refused as invalid in an earlier pass, and the spec has not changed since: trying again would
        # be refused again. Any spec edit (a new generation) lifts this.
        failed = [_Decision(p.ready[0], "failed", "", 0, reason=JOB_REJECTED, message=rejected)]
    progress = _progress(p.done, p.total)

    actions = Actions(progress=(p.done, p.total))
    if spec.suspend:
        actions.suspend_jobs = [v.name for v in views if not v.finished and not v.suspended]
    else:
        actions.resume_jobs = [v.name for v in views if not v.finished and v.suspended and v.resumable]
        actions.abandon_jobs, wake = abandonments(spec, views, now)
        if wake is not None:
            actions.requeue_after = wake

    created: list[_Decision] = []
    progressing: tuple[str, str] | None = None
    if p.finished:
        phase = _Phase("Succeeded", "Succeeded", f"all {p.total} stages committed")
        stage_id, iteration = FINISHED, spec.loop.iterations - 1
    elif failed:
        first = failed[0]
        phase = _Phase("Failed", first.reason, first.message)
        stage_id, iteration = first.stage.id, first.stage.iteration
    else:
        # Not finished means some stage is ready (follow uncommitted dependencies down to one whose
        # dependencies are all committed: that one is ready).
        current = p.ready[0]
        stage_id, iteration = current.id, current.iteration
        if spec.suspend:
            phase = _Phase("Suspended", "Suspended", progress)
        else:
            phase = _Phase(
                "Running", "Running", f"in progress: {', '.join(s.id for s in p.ready)}; {progress}"
            )
            created = [d for d in decisions if d.kind == "create"]
            actions.create_jobs = [
                build_job(
                    obs.name,
                    obs.namespace,
                    obs.uid,
                    spec,
                    d.stage,
                    d.attempt,
                    run_uri=run_uri,
                    default_image=default_image,
                    generation=gen,
                )
                for d in created
            ]
            if any(needs_nodes_service(job) for job in actions.create_jobs):
                actions.create_services = [build_headless_service(obs.name, obs.namespace, obs.uid)]
            active = [d for d in decisions if d.kind in ("create", "running")]
            running = [f"{d.stage.id} (Job {d.job})" for d in active if d.reason != "StagePending"]
            pending = [f"{d.stage.id} (Job {d.job}: {d.message[:200]})" for d in active if d.reason == "StagePending"]
            waiting = [d for d in decisions if d.kind == "waiting"]
            parts = [f"running {', '.join(running)}"] if running else []
            parts += [f"not running yet: {', '.join(pending)}"] if pending else []
            parts += [_waiting_text(d) for d in waiting]
            reason = "StageRunning" if running else "StagePending" if pending else "RetryBackoff"
            if not active and waiting:
                reasons = {d.reason for d in waiting}
                if len(reasons) == 1 and reasons & {"StoreUnavailable", *REFUSED_REASONS}:
                    reason = reasons.pop()
            progressing = (reason, "; ".join([*parts, progress]))
            if waiting:
                due = max(min((d.due - now).total_seconds() for d in waiting), 0.0)
                actions.requeue_after = due if actions.requeue_after is None else min(due, actions.requeue_after)

    new = {
        "observedGeneration": gen,
        "conditions": _conditions(old_conds, phase, progressing, now_s, gen),
        "iteration": iteration,
        "stage": stage_id,
        "history": _history(views, created),
        # Figures of stages whose Jobs are gone stay as last reported.
        "metrics": {**_old_metrics(old), **run_metrics(spec, views)},
        "artifacts": run_artifacts(spec, run_uri, committed),
        "committed": commit_records(committed, views, recorded),
        "disruptions": disruption_counts(views, old),
    }
    return _finish(old, new, views, created, actions, extra_events)
