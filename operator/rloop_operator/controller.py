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

from rloop_operator.builders import CONTAINER, resume_patch, suspend_patch
from rloop_operator.jobs import format_time, needs_message, parse_time, termination_messages, view_job
from rloop_operator.k8s import KubeApi
from rloop_operator.metrics import OperatorMetrics, RunKey, RunState
from rloop_operator.naming import parse_job_labels, run_selector
from rloop_operator.reconcile import Actions, Observed, reconcile, status_patch, without_started
from rloop_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

MESSAGE_TRIES = 3
"""Passes that look for a finished Job's pod before its message is taken as empty (pod deleted)."""
NAME_CONFLICT_RETRY = 5.0
"""Seconds before retrying a Job name held by a Job this run does not own (an older run's, being GC'd)."""


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
        actions = reconcile(
            Observed(
                name=name,
                namespace=namespace,
                uid=str(meta.get("uid") or ""),
                generation=meta.get("generation"),
                spec=run.get("spec") if isinstance(run.get("spec"), dict) else {},
                status=status,
                jobs=jobs,
                terminated_messages=self._termination_messages(key, jobs),
                now=now,
            ),
            default_image=self.settings.image,
        )
        conflict = self._apply(key, run, status, versions, actions, now)
        self._job_versions[key] = versions
        self._record(key, actions, now)
        delays = [d for d in (actions.requeue_after, conflict) if d is not None]
        return min([*delays, self.settings.resync_seconds])

    def _termination_messages(self, key: RunKey, jobs: list[dict[str, Any]]) -> dict[str, str]:
        """Messages of the run's finished Jobs that matter (`needs_message`); lists the run's pods only
        when one of those is not known yet."""
        with self._lock:
            cache = self._messages.setdefault(key, {})
            tries = self._message_tries.setdefault(key, {})
        out: dict[str, str] = {}
        missing: list[tuple[str, str]] = []
        for job in jobs:
            meta = job.get("metadata") or {}
            uid, name = str(meta.get("uid") or ""), str(meta.get("name") or "")
            view = view_job(job)
            if view is None or not view.finished or not needs_message(view):
                continue
            if uid in cache:
                out[name] = cache[uid]
            else:
                missing.append((uid, name))
        if missing:
            namespace, run = key
            found = termination_messages(self.api.list_pods(namespace, run_selector(run)), CONTAINER)
            for uid, name in missing:
                if name in found:
                    cache[uid] = out[name] = found[name]
                    tries.pop(uid, None)
                else:
                    tries[uid] = tries.get(uid, 0) + 1
                    if tries[uid] >= MESSAGE_TRIES:
                        cache[uid] = ""
        return out

    def _apply(
        self,
        key: RunKey,
        run: dict[str, Any],
        old_status: dict[str, Any],
        versions: dict[str, str],
        actions: Actions,
        now: datetime,
    ) -> float | None:
        """Apply the actions; returns a retry delay when a Job name was held by a Job not ours.
        `versions` (the listed Jobs) gains the Jobs created here."""
        namespace, name = key
        conflict: float | None = None
        not_created: set[str] = set()
        for body in actions.create_jobs:
            job = body["metadata"]["name"]
            if job in versions:
                # Listed but not observed as ours: another owner's Job of the same name (a deleted run of
                # the same name whose Jobs are still being garbage-collected). Wait for it to go.
                log.warning(
                    "%s/%s: Job %s exists but is not owned by this run; retrying", namespace, name, job
                )
                conflict = NAME_CONFLICT_RETRY
                not_created.add(job)
                continue
            created = self.api.create_job(namespace, body)
            if created is None:
                log.info("%s/%s: Job %s already exists (created by an earlier pass)", namespace, name, job)
                not_created.add(job)
                continue
            versions[job] = _version(created)
            parsed = parse_job_labels(body["metadata"].get("labels"))
            kind = parsed[0].kind if parsed else "unknown"
            self.metrics.stage_attempts.labels(namespace, name, kind).inc()
            log.info("%s/%s: created Job %s", namespace, name, job)
        for job in actions.suspend_jobs:
            self.api.patch_job(namespace, job, suspend_patch())
        for job in actions.resume_jobs:
            self.api.patch_job(namespace, job, resume_patch())
        if actions.status_changed:
            rv = self.api.patch_run_status(namespace, name, status_patch(old_status, actions.status))
            if rv is not None:
                self._written[key] = rv
        stamp = format_time(now)
        for type_, reason, message in without_started(actions.events, not_created):
            self.api.create_event(run, type_, reason, message, stamp)
        for view in actions.finished:
            if view.state == "Failed":
                self.metrics.stage_failures.labels(namespace, name, view.stage.kind).inc()
            start, end = view.start_time, view.end_time
            if start and end:
                t0, t1 = parse_time(start), parse_time(end)
                if t0 is not None and t1 is not None and t1 >= t0:
                    self.metrics.stage_duration.labels(namespace, view.stage.kind, view.state).observe(
                        (t1 - t0).total_seconds()
                    )
        return conflict

    def _record(self, key: RunKey, actions: Actions, now: datetime) -> None:
        status = actions.status
        figures = status.get("metrics") or {}
        activity = actions.last_activity
        if actions.create_jobs and (activity is None or activity < now):
            activity = now
        done, total = actions.progress or (None, None)
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
            ),
        )


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
