"""Reading observed Jobs: which stage and attempt, finished or not, why it failed, its summary.

Everything here is a pure function of the Job dicts the API returned (and the pods' termination
messages), so the reconcile core never needs to remember anything between passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from rloop.contracts import ERROR_CORRUPT_INPUT, ERROR_INVALID_INPUT, ERROR_STORE_UNAVAILABLE
from rloop.plan import STAGE_KINDS, Stage
from rloop.redact import redact_uris
from rloop.spec import clean_line
from rloop_operator.naming import (
    ANNOTATION_ABANDONED,
    ANNOTATION_SPEC_GENERATION,
    ANNOTATION_SUSPENDED,
    COMPLETION_INDEX_ANNOTATION,
    LABEL_KUEUE_QUEUE,
    LABEL_RUN,
    label_value,
    parse_job_labels,
)

JobState = Literal["Pending", "Running", "Succeeded", "Failed"]
FailureKind = Literal["invalid", "corrupt", "unavailable", "disrupted", "other"]

POD_FAILURE_POLICY_REASON = "PodFailurePolicy"
"""Job condition reason when a podFailurePolicy FailJob rule fired; our only such rule is exit code 2."""
DETAIL_MAX = 300
"""Failure details go into status messages; the whole log tail stays with the pod."""
MESSAGE_MAX = 4096
"""Kubernetes keeps at most 4096 bytes of a container's termination message; longer text did not come
from a kubelet and is cut here, before anything parses it."""
SUMMARY_DEPTH = 4
"""A stage summary is a flat JSON object (pass_at_k is one level down); deeper documents are not summaries."""
ANNOTATION_MAX = 2048
"""Our own annotations are short; a longer value was not written by the operator and is ignored."""
DISRUPTION_CONDITION = "DisruptionTarget"
"""Pod condition of an evicted or preempted pod; the Job's Failed message names it when our FailJob rule fired."""


@dataclass(frozen=True)
class PodProblem:
    """Why an unfinished Job's pod is not running: a waiting container, an unschedulable or unready pod."""

    reason: str
    """ImagePullBackOff, CreateContainerConfigError, Unschedulable, NotReady, ..."""
    message: str
    since: str | None
    """When the pod stopped being ready (its Ready condition's transition), else when it was created."""

    def text(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


@dataclass(frozen=True)
class JobView:
    """One observed attempt of one stage."""

    name: str
    stage: Stage
    attempt: int
    state: JobState
    suspended: bool
    resumable: bool
    """Suspended by the operator (marker annotation), or not Kueue's to release: safe to resume."""
    created: str | None
    start_time: str | None
    end_time: str | None
    failure: FailureKind | None
    detail: str | None
    summary: dict[str, Any] | None
    """The stage's termination message when it is a JSON object (metrics of a succeeded stage)."""
    generation: int | None = None
    """The run's metadata.generation the Job was made from (its annotation)."""
    problem: PodProblem | None = None
    """Unfinished and its pod not running: why (None while it runs, or when its pods are not known)."""
    pods: int = 1
    """Pods the attempt runs at once: the nodes of an Indexed Job, else 1."""

    @property
    def finished(self) -> bool:
        return self.state in ("Succeeded", "Failed")

    @property
    def finished_at(self) -> datetime | None:
        """When it finished, falling back to when it started or was created (clocks we can trust)."""
        for t in (self.end_time, self.start_time, self.created):
            dt = parse_time(t)
            if dt is not None:
                return dt
        return None


def parse_time(text: Any) -> datetime | None:
    """An RFC 3339 timestamp as an aware UTC datetime; None when missing or malformed."""
    if not isinstance(text, str) or not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def format_time(dt: datetime) -> str:
    """Kubernetes' timestamp format (seconds, UTC, `Z`)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_termination_message(text: Any) -> dict[str, Any] | None:
    """The stage summary a pod left as its termination message; None unless it is a JSON object.

    With FallbackToLogsOnError a crashed pod's message is its log tail, which is not JSON. Bounded: text
    over MESSAGE_MAX, nesting deeper than SUMMARY_DEPTH (json recurses) and non-objects are no summary;
    integers beyond int64 become floats (inf when huge), which no float conversion downstream trips on."""
    if not isinstance(text, str) or not text.strip() or len(text) > MESSAGE_MAX:
        return None
    try:
        doc = json.loads(text, parse_int=_json_int)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) and _depth(doc) <= SUMMARY_DEPTH else None


def _json_int(text: str) -> int | float:
    value = int(text)
    return value if -(2**63) <= value < 2**63 else float(text)


def _depth(doc: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest, todo = 0, [(doc, 0)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth + 1)
            todo.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def stage_order(stage: Stage) -> tuple[int, int, str]:
    """DAG order without the spec: base first, then by iteration, kind (init, rl, ..., eval), set."""
    it = -1 if stage.iteration is None else stage.iteration
    return (it, STAGE_KINDS.index(stage.kind), stage.eval_set or "")


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _failure(status: dict[str, Any], summary: dict[str, Any] | None, raw: Any) -> tuple[FailureKind, str]:
    failed = _condition(status, "Failed") or {}
    error = summary.get("error") if summary else None
    by_policy = failed.get("reason") == POD_FAILURE_POLICY_REASON
    if by_policy and DISRUPTION_CONDITION in str(failed.get("message") or ""):
        kind: FailureKind = "disrupted"
    elif error == ERROR_INVALID_INPUT or by_policy:
        kind = "invalid"
    elif error == ERROR_CORRUPT_INPUT:
        kind = "corrupt"
    elif error == ERROR_STORE_UNAVAILABLE:
        kind = "unavailable"
    else:
        kind = "other"
    if summary and isinstance(summary.get("message"), str) and summary["message"].strip():
        detail = summary["message"].strip()
    elif isinstance(raw, str) and raw.strip() and summary is None:
        detail = _last_line(raw)
    else:
        detail = str(failed.get("message") or failed.get("reason") or "the pod failed (no message)")
    # One printable line (no control or bidi characters): it ends up in condition messages and Events.
    # Credentials and presigned tokens in URIs go first, before cleaning or cutting could split a URI.
    return kind, clean_line(redact_uris(detail), DETAIL_MAX)


def _generation(annotations: dict[str, Any]) -> int | None:
    text = annotations.get(ANNOTATION_SPEC_GENERATION)
    if isinstance(text, str) and text.isdigit() and len(text) <= 19:
        return int(text)
    return None


def abandoned(annotations: dict[str, Any]) -> dict[str, str] | None:
    """The operator's record that it stopped this attempt for never running (ANNOTATION_ABANDONED)."""
    text = annotations.get(ANNOTATION_ABANDONED)
    if not isinstance(text, str) or len(text) > ANNOTATION_MAX:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return {k: clean_line(str(doc.get(k) or ""), DETAIL_MAX) for k in ("time", "reason", "message")}


def pods_of_job(spec: dict[str, Any]) -> int:
    """Pods that must succeed: `completions` of an Indexed Job (the nodes of one stage attempt), else 1."""
    if spec.get("completionMode") != "Indexed":
        return 1
    return max(_int(spec.get("completions")), 1)


def view_job(job: dict[str, Any], message: Any = None, problem: PodProblem | None = None) -> JobView | None:
    """A JobView of an observed Job (None when its labels do not name a stage and attempt); `problem`:
    why its pod is not running, when the caller looked."""
    meta = job.get("metadata") or {}
    parsed = parse_job_labels(meta.get("labels"))
    name = meta.get("name")
    if parsed is None or not isinstance(name, str):
        return None
    stage, attempt = parsed
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    summary = parse_termination_message(message)
    complete = _condition(status, "Complete")
    failed = _condition(status, "Failed")
    pods = pods_of_job(spec)
    succeeded = _int(status.get("succeeded"))
    # backoffLimit is 0, so one failed pod fails the Job even before the controller adds its condition.
    if succeeded >= pods or complete:
        state: JobState = "Succeeded"
    elif _int(status.get("failed")) >= 1 or failed:
        state = "Failed"
    elif succeeded + _int(status.get("ready")) >= pods or (
        succeeded + _int(status.get("active")) >= pods and "ready" not in status
    ):
        # An active pod that is not ready (ImagePullBackOff, a missing Secret key, a lost node) is not
        # running yet; clusters before 1.24 report no `ready`, and there an active pod counts as running.
        # A stage of several pods runs once every pod does (its nodes wait for each other until then).
        state = "Running"
    else:
        state = "Pending"
    end = status.get("completionTime") or (complete or failed or {}).get("lastTransitionTime")
    failure, detail = _failure(status, summary, message) if state == "Failed" else (None, None)
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    gave_up = abandoned(annotations) if state != "Succeeded" else None
    if gave_up is not None:  # stopped by the operator: failed, whatever the suspended Job says
        state, failure, end = "Failed", "other", gave_up["time"] or None
        detail = clean_line(f"{gave_up['reason']}: {gave_up['message']}", DETAIL_MAX)
    elif state in ("Pending", "Running") and problem is not None:
        state = "Pending"
    labels = meta.get("labels") or {}
    suspended = bool(spec.get("suspend"))
    return JobView(
        name=name,
        stage=stage,
        attempt=attempt,
        state=state,
        suspended=suspended,
        resumable=suspended
        and (annotations.get(ANNOTATION_SUSPENDED) == "true" or LABEL_KUEUE_QUEUE not in labels),
        created=meta.get("creationTimestamp"),
        start_time=status.get("startTime"),
        end_time=end if state in ("Succeeded", "Failed") else None,
        failure=failure,
        detail=detail,
        summary=summary,
        generation=_generation(annotations),
        problem=problem if state == "Pending" else None,
        pods=pods,
    )


def _owned(job: dict[str, Any], run_name: str, uid: str) -> bool:
    meta = job.get("metadata") or {}
    if (meta.get("labels") or {}).get(LABEL_RUN) != label_value(run_name):
        return False
    # A Job left behind by an earlier run of the same name (another uid) is not evidence for this one.
    for ref in meta.get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") and uid and ref.get("uid") and ref["uid"] != uid:
            return False
    return True


def observe_jobs(
    jobs: list[dict[str, Any]],
    run_name: str,
    uid: str,
    messages: dict[str, str] | None = None,
    problems: dict[str, PodProblem] | None = None,
) -> list[JobView]:
    """This run's Jobs as JobViews in DAG order (stage, then attempt), one per name.

    Filters by label and owner here because not every API server honours label selectors."""
    messages, problems = messages or {}, problems or {}
    seen: dict[str, JobView] = {}
    for job in jobs:
        if not isinstance(job, dict) or not _owned(job, run_name, uid):
            continue
        name = (job.get("metadata") or {}).get("name", "")
        view = view_job(job, messages.get(name), problems.get(name))
        if view is not None:
            seen[view.name] = view
    return sorted(seen.values(), key=lambda v: (stage_order(v.stage), v.attempt, v.name))


JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
SUMMARY_KINDS = ("rl", "verify", "rft", "eval")
"""Stage kinds whose succeeded summary the operator uses: trainReward, evalAvgAtN, evalPassAtK in the
status; the expert-set size and RFT loss per iteration in its metrics."""


def needs_message(view: JobView) -> bool:
    """Whether the reconcile reads this finished Job's termination message: a failed Job's tells why
    (and which input was corrupt); a succeeded one's matters only for the metrics in the status."""
    return view.state == "Failed" or (view.state == "Succeeded" and view.stage.kind in SUMMARY_KINDS)


def completion_index(pod: dict[str, Any]) -> int | None:
    """The pod's index in an Indexed Job (COMPLETION_INDEX_ANNOTATION), None for other pods."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    return int(text) if isinstance(text, str) and text.isdigit() and len(text) <= 6 else None


def _message_rank(pod: dict[str, Any], terminated: dict[str, Any]) -> tuple[int, int, int]:
    """Which pod of an Indexed Job speaks for it (smallest first). Node 0 writes the stage's summary, so
    its message is the Job's when the stage succeeded. When the Job failed, the pod that failed on its
    own says why: the Job controller deletes the others (deletionTimestamp), so a pod still there with a
    non-zero exit comes first, and among several such the lowest index."""
    deleted = 1 if (pod.get("metadata") or {}).get("deletionTimestamp") else 0
    exited_zero = 1 if _int(terminated.get("exitCode")) == 0 else 0
    return deleted, exited_zero, completion_index(pod) or 0


def termination_messages(pods: list[dict[str, Any]], container: str) -> dict[str, str]:
    """Job name → the termination message of its pod's terminated `container`.

    Pods come from a LIST; a Job has one pod (restartPolicy Never, backoffLimit 0) unless a disruption
    replaced it, in which case the most recently started one is the one that decided the Job (latest pod
    wins). Of the pods of an Indexed Job (a stage of several nodes), `_message_rank` picks the one."""
    latest: dict[str, tuple[str, str]] = {}
    ranked: dict[str, tuple[tuple[int, int, int], str]] = {}
    for pod in pods:
        if not isinstance(pod, dict):
            continue
        job = job_of_pod(pod)
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            if not isinstance(cs, dict) or cs.get("name") != container:
                continue
            terminated = (cs.get("state") or {}).get("terminated")
            if job is None or not isinstance(terminated, dict):
                continue
            message = str(terminated.get("message") or "")[:MESSAGE_MAX]
            if completion_index(pod) is not None:
                rank = _message_rank(pod, terminated)
                if job not in ranked or rank < ranked[job][0]:
                    ranked[job] = (rank, message)
                continue
            started = str(terminated.get("startedAt") or status.get("startTime") or "")
            if job not in latest or started >= latest[job][0]:
                latest[job] = (started, message)
    return {job: message for job, (_, message) in (latest | ranked).items()}


def needs_pods(view: JobView) -> bool:
    """Whether to look at an unfinished Job's pods: the Job controller has started it (startTime), it
    is not suspended, and no pod of it is ready (status.ready, Kubernetes 1.24+): something holds it."""
    return not view.finished and not view.suspended and view.state == "Pending" and view.start_time is not None


NO_POD = "NoPod"
"""PodProblem reason of a started Job that has no pod at all: the Job controller's pod creates are refused."""


def missing_pod(view: JobView, present: int = 0) -> PodProblem:
    """Why a started Job has fewer live pods (`present`) than it runs at once."""
    have = "no pod" if present == 0 else f"{present} of its {view.pods} pods"
    return PodProblem(NO_POD, f"the Job has {have}: its pod creates are refused (a ResourceQuota, LimitRange "
                      "or admission webhook; see `kubectl describe job`)", view.start_time)


def job_of_pod(pod: dict[str, Any]) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return next((labels[k] for k in JOB_NAME_LABELS if isinstance(labels.get(k), str)), None)


def _pod_condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == type_:
            return c
    return None


def pod_problem(pod: dict[str, Any], container: str) -> PodProblem | None:
    """Why this pod is not running its `container`, or None when it runs (or has terminated)."""
    status = pod.get("status") if isinstance(pod.get("status"), dict) else {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    ready = _pod_condition(status, "Ready") or {}
    since = ready.get("lastTransitionTime") if ready.get("status") == "False" else None
    since = since or (pod.get("metadata") or {}).get("creationTimestamp")
    for cs in status.get("containerStatuses") or []:
        if not isinstance(cs, dict) or cs.get("name") != container:
            continue
        waiting = (cs.get("state") or {}).get("waiting")
        if isinstance(waiting, dict):
            return PodProblem(clean_line(str(waiting.get("reason") or "Waiting"), 80),
                              clean_line(str(waiting.get("message") or ""), DETAIL_MAX), since)
        running = bool((cs.get("state") or {}).get("running")) and ready.get("status") != "False"
        if cs.get("ready") is True or running:
            return None
    scheduled = _pod_condition(status, "PodScheduled") or {}
    if scheduled.get("status") == "False":
        return PodProblem(clean_line(str(scheduled.get("reason") or "Unschedulable"), 80),
                          clean_line(str(scheduled.get("message") or ""), DETAIL_MAX), since)
    if ready.get("status") == "False":
        return PodProblem(clean_line(str(ready.get("reason") or "NotReady"), 80),
                          clean_line(str(ready.get("message") or ""), DETAIL_MAX), since)
    return PodProblem("Pending", "the pod has not started", since)


def pod_problems(pods: list[dict[str, Any]], container: str) -> dict[str, PodProblem]:
    """Job name → why its newest live pod is not running (Jobs whose pod runs are absent). An Indexed
    Job runs only when all its pods do: the newest pod of each index counts, the lowest index that is
    not running names the problem."""
    newest: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
    for pod in pods:
        if not isinstance(pod, dict) or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        job = job_of_pod(pod)
        slot = (str(job), completion_index(pod) or 0)
        created = str((pod.get("metadata") or {}).get("creationTimestamp") or "")
        if job is not None and (slot not in newest or created >= newest[slot][0]):
            newest[slot] = (created, pod)
    out: dict[str, PodProblem] = {}
    for (job, _), (_, pod) in sorted(newest.items(), key=lambda item: item[0]):
        problem = pod_problem(pod, container)
        if problem is not None and job not in out:
            out[job] = problem
    return out
