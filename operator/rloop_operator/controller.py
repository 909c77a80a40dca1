"""One reconcile pass of one run: observe through the API, decide with the pure core, apply, record.

Runs in a worker thread (the `kubernetes` client is synchronous). Nothing here decides anything: the
decisions are `reconcile.reconcile`'s; this module only moves data between it and `k8s.KubeApi`.
Apply order matters for crash safety: Jobs first (a created Job is its own record), then the status
that mentions them, then events (best effort; a crash before them loses an event, never duplicates one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rloop.redact import redact_uris
from rloop_operator.builders import CONTAINER, needs_nodes_service, resume_patch, suspend_patch
from rloop_operator.faults import REFUSAL_BACKOFF_MAX_SECONDS, Refusal
from rloop_operator.jobs import (
    JobView,
    PodProblem,
    completion_index,
    format_time,
    job_of_pod,
    missing_pod,
    needs_message,
    needs_pods,
    parse_time,
    pod_problems,
    termination_messages,
    view_job,
)
from rloop_operator.k8s import CreateRefused, KubeApi
from rloop_operator.metrics import OperatorMetrics, RunKey, RunState
from rloop_operator.naming import parse_job_labels, run_selector
from rloop_operator.reconcile import Actions, Observed, reconcile, status_patch, without_started
from rloop_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

MESSAGE_TRIES = 3
"""Passes that look for a finished Job's pod before its message is taken as empty (pod deleted)."""
NAME_CONFLICT_RETRY = 5.0
"""Seconds before retrying a Job name held by a Job this run does not own (an older run's, being GC'd)."""
REFUSAL_BACKOFF_SECONDS = 10.0
"""First delay after the API refused a Job for now (quota, RBAC); doubles per refusal in a row, capped."""


class Controller:
    def __init__(
        self,
        api: KubeApi,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.api = api
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._messages: dict[RunKey, dict[str, str]] = {}
        """Per run: finished Job uid → its pod's termination message (immutable once finished)."""
        self._message_tries: dict[RunKey, dict[str, int]] = {}
        self._written: dict[RunKey, str] = {}
        """Per run: resourceVersion our last status patch produced (its watch event needs no pass)."""
        self._job_versions: dict[RunKey, dict[str, str]] = {}
        """Per run: Job name → resourceVersion this controller last saw (listed or created)."""
        self._refusals: dict[RunKey, int] = {}
        """Per run: creates refused in a row (for the backoff only; a restart merely starts it over)."""

    # ---------------------------------------------------------------------------------------- entry
    def reconcile(self, key: RunKey) -> float | None:
        """One pass; returns seconds until the next pass is needed without events (None: none)."""
        t0 = time.perf_counter()
        try:
            return self._reconcile(key)
        except Exception:
            self.metrics.reconcile_errors.inc()
            raise
        finally:
            self.metrics.reconcile_duration.observe(time.perf_counter() - t0)

    def is_own_write(self, key: RunKey, resource_version: str | None) -> bool:
        return resource_version is not None and self._written.get(key) == resource_version

    def is_known_job(self, key: RunKey, job: str, resource_version: str | None) -> bool:
        """The Job is in the state the last pass saw (e.g. the watch event of our own create)."""
        seen = self._job_versions.get(key)
        return resource_version is not None and seen is not None and seen.get(job) == resource_version

    def forget(self, key: RunKey) -> None:
        with self._lock:
            self._messages.pop(key, None)
            self._message_tries.pop(key, None)
            self._written.pop(key, None)
            self._job_versions.pop(key, None)
            self._refusals.pop(key, None)
        self.metrics.forget_run(key)

    # ----------------------------------------------------------------------------------------- pass
    def _reconcile(self, key: RunKey) -> float | None:
        namespace, name = key
        run = self.api.get_run(namespace, name)
        meta = (run or {}).get("metadata") or {}
        if run is None or meta.get("deletionTimestamp"):
            # Its Jobs go with it (ownerReferences); the store keeps the data.
            self.forget(key)
            return None
        jobs = self.api.list_jobs(namespace, run_selector(name))
        versions = {_name(j): _version(j) for j in jobs}
        status = run.get("status") if isinstance(run.get("status"), dict) else {}
        now = self.clock()
        messages, problems = self._pod_facts(key, jobs)
        observed = Observed(
            name=name,
            namespace=namespace,
            uid=str(meta.get("uid") or ""),
            generation=meta.get("generation"),
            spec=run.get("spec") if isinstance(run.get("spec"), dict) else {},
            status=status,
            jobs=jobs,
            terminated_messages=messages,
            now=now,
            pod_problems=problems,
        )
        actions = reconcile(observed, default_image=self.settings.image)
        not_created, conflict, refused = self._create_jobs(key, versions, actions)
        if refused:
            # The same pass again, knowing what the API refused: its status says so instead of "created".
            observed.refused = refused
            actions = reconcile(observed, default_image=self.settings.image)
            actions.create_jobs = []
        self._apply(key, run, status, actions, now, not_created)
        if any(r.status >= 500 or r.status == 429 for r in refused.values()):
            # The API server failed (it may even have stored the Job): the status says so, and it also
            # counts as a failed pass for the RLoopReconcileErrors alert.
            self.metrics.reconcile_errors.inc()
        self._job_versions[key] = versions
        self._record(key, actions, now)
        delays = [d for d in (actions.requeue_after, conflict) if d is not None]
        return min([*delays, self.settings.resync_seconds])

    def _pod_facts(self, key: RunKey, jobs: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, PodProblem]]:
        """What the run's pods say: termination messages of finished Jobs that matter (`needs_message`),
        and why unfinished Jobs without a ready pod are not running. Lists the run's pods only when a
        message is not known yet or a Job is not running (so a healthy running run costs no list)."""
        with self._lock:
            cache = self._messages.setdefault(key, {})
            tries = self._message_tries.setdefault(key, {})
        out: dict[str, str] = {}
        missing: list[tuple[str, str]] = []
        stalled: list[JobView] = []
        for job in jobs:
            meta = job.get("metadata") or {}
            uid, name = str(meta.get("uid") or ""), str(meta.get("name") or "")
            view = view_job(job)
            if view is not None and needs_pods(view):
                stalled.append(view)
            if view is None or not view.finished or not needs_message(view):
                continue
            if uid in cache:
                out[name] = cache[uid]
            else:
                missing.append((uid, name))
        if not missing and not stalled:
            return out, {}
        namespace, run = key
        pods = self.api.list_pods(namespace, run_selector(run))
        problems = pod_problems(pods, CONTAINER) if stalled else {}
        for view in stalled:
            present = len({completion_index(p) for p in pods if job_of_pod(p) == view.name})
            if view.name not in problems and present < view.pods:
                problems[view.name] = missing_pod(view, present)
        if missing:
            found = termination_messages(pods, CONTAINER)
            for uid, name in missing:
                if name in found:
                    cache[uid] = out[name] = found[name]
                    tries.pop(uid, None)
                else:
                    tries[uid] = tries.get(uid, 0) + 1
                    if tries[uid] >= MESSAGE_TRIES:
                        cache[uid] = ""
        return out, problems

    def _create_jobs(
        self, key: RunKey, versions: dict[str, str], actions: Actions
    ) -> tuple[set[str], float | None, dict[str, Refusal]]:
        """Create the Jobs the pass asked for (a created Job is its own record, so this comes first).
        Returns the Jobs not created (they existed), a retry delay when a name was held by a Job not
        ours, and what the API refused. `versions` (the listed Jobs) gains the Jobs created here."""
        namespace, name = key
        conflict: float | None = None
        not_created: set[str] = set()
        refused: dict[str, Refusal] = {}
        service_refused = self._create_services(key, actions)
        for body in actions.create_jobs:
            job = body["metadata"]["name"]
            if service_refused is not None and needs_nodes_service(body):
                # Its pods could not find node 0: not created, and the status says why, as for the Job.
                refused[job] = service_refused
                not_created.add(job)
                continue
            if job in versions:
                # Listed but not observed as ours: another owner's Job of the same name (a deleted run of
                # the same name whose Jobs are still being garbage-collected). Wait for it to go.
                log.warning(
                    "%s/%s: Job %s exists but is not owned by this run; retrying", namespace, name, job
                )
                conflict = NAME_CONFLICT_RETRY
                not_created.add(job)
                continue
            try:
                created = self.api.create_job(namespace, body)
            except CreateRefused as err:
                log.warning("%s/%s: the API server refused Job %s: %s", namespace, name, job, err)
                refused[job] = Refusal(err.status, err.reason, err.message, retry_after=self._refusal_delay(key))
                not_created.add(job)
                continue
            if created is None:
                log.info("%s/%s: Job %s already exists (created by an earlier pass)", namespace, name, job)
                not_created.add(job)
                continue
            versions[job] = _version(created)
            parsed = parse_job_labels(body["metadata"].get("labels"))
            kind, attempt = (parsed[0].kind, parsed[1]) if parsed else ("unknown", 0)
            self.metrics.stage_created(namespace, name, kind, attempt)
            log.info("%s/%s: created Job %s", namespace, name, job)
        if actions.create_jobs and not refused:
            self._refusals.pop(key, None)
        return not_created, conflict, refused

    def _create_services(self, key: RunKey, actions: Actions) -> Refusal | None:
        """Create the Services the pass's Indexed Jobs need (an existing one is fine: one per run).
        Returns what the API refused, if it did."""
        namespace, name = key
        for body in actions.create_services:
            service = body["metadata"]["name"]
            try:
                created = self.api.create_service(namespace, body)
            except CreateRefused as err:
                log.warning("%s/%s: the API server refused Service %s: %s", namespace, name, service, err)
                return Refusal(err.status, err.reason, f"Service {service}: {err.message}",
                               retry_after=self._refusal_delay(key))
            if created is not None:
                log.info("%s/%s: created Service %s", namespace, name, service)
        return None

    def _refusal_delay(self, key: RunKey) -> float:
        n = self._refusals[key] = self._refusals.get(key, 0) + 1
        return min(REFUSAL_BACKOFF_SECONDS * 2 ** (n - 1), REFUSAL_BACKOFF_MAX_SECONDS)

    def _apply(
        self,
        key: RunKey,
        run: dict[str, Any],
        old_status: dict[str, Any],
        actions: Actions,
        now: datetime,
        not_created: set[str],
    ) -> None:
        """Apply the rest of the pass (Jobs are created already): Job patches, the status that mentions
        them, then events (best effort; a crash before them loses an event, never duplicates one)."""
        namespace, name = key
        for job in actions.suspend_jobs:
            self.api.patch_job(namespace, job, suspend_patch())
        for job in actions.resume_jobs:
            self.api.patch_job(namespace, job, resume_patch())
        for job, patch in actions.abandon_jobs.items():
            log.warning("%s/%s: stopping Job %s, whose pod never ran", namespace, name, job)
            self.api.patch_job(namespace, job, patch)
        if actions.status_changed:
            rv = self.api.patch_run_status(namespace, name, status_patch(old_status, actions.status))
            if rv is not None:
                self._written[key] = rv
        stamp = format_time(now)
        for type_, reason, message in without_started(actions.events, not_created):
            # Events are readable by more people than the run; no URI secret reaches one, whatever built it.
            self.api.create_event(run, type_, reason, redact_uris(message), stamp)
        for view in actions.finished:
            if view.state == "Failed":
                self.metrics.stage_failures.labels(namespace, name, view.stage.kind).inc()
            if view.failure == "disrupted":
                self.metrics.stage_disruptions.labels(namespace, name, view.stage.kind).inc()
            start, end = view.start_time, view.end_time
            if start and end:
                t0, t1 = parse_time(start), parse_time(end)
                if t0 is not None and t1 is not None and t1 >= t0:
                    self.metrics.stage_duration.labels(namespace, view.stage.kind, view.state).observe(
                        (t1 - t0).total_seconds()
                    )

    def _record(self, key: RunKey, actions: Actions, now: datetime) -> None:
        status = actions.status
        figures = status.get("metrics") or {}
        activity = actions.last_activity
        if actions.create_jobs and (activity is None or activity < now):
            activity = now
        done, total = actions.progress or (None, None)
        # Figures of iterations whose Jobs are gone (TTL, deleted by hand) stay as last seen.
        before = self.metrics.snapshot().get(key) or RunState()
        per_iteration = actions.iteration_figures
        self.metrics.set_run(
            key,
            RunState(
                conditions=frozenset(
                    c["type"] for c in status.get("conditions") or [] if c.get("status") == "True"
                ),
                iteration=status.get("iteration"),
                stage=status.get("stage"),
                stages_committed=done,
                stages_total=total,
                train_reward=figures.get("trainReward"),
                eval_avg_at_n=figures.get("evalAvgAtN"),
                eval_pass_at_k=figures.get("evalPassAtK"),
                last_activity=activity.timestamp() if activity else None,
                expert_trajectories={**before.expert_trajectories, **per_iteration.get("expert_trajectories", {})},
                rft_loss_before={**before.rft_loss_before, **per_iteration.get("rft_loss_before", {})},
                rft_loss={**before.rft_loss, **per_iteration.get("rft_loss", {})},
            ),
        )


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
