"""Deterministic names and labels of stage Jobs.

A Job's name is a pure function of (run, stage, attempt), so a reconcile pass that runs twice (or an
operator that restarts between "create" and "observe") asks for the same name again and the API's
AlreadyExists makes the second create harmless: no duplicate Jobs, no bookkeeping.
"""

from __future__ import annotations

import hashlib
import re

from rloop.plan import Stage

MAX_NAME = 63
"""Job names must fit a DNS-1123 label: the Job controller copies the name into the pods'
`batch.kubernetes.io/job-name` label, whose value is limited to 63 characters."""

LABEL_RUN = "rloop.dev/run"
LABEL_STAGE = "rloop.dev/stage"
LABEL_ITERATION = "rloop.dev/iteration"
LABEL_ATTEMPT = "rloop.dev/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "rloop-operator"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SUSPENDED = "rloop.dev/suspended"
"""Set on a Job the operator suspended (because the run has `spec.suspend`). Only such Jobs, or Jobs
outside Kueue, are resumed: a Kueue-managed Job is suspended by Kueue itself until admitted, and
resuming it would bypass the queue."""

ANNOTATION_SPEC_GENERATION = "rloop.dev/spec-generation"
"""metadata.generation of the run when the Job was made: a failure the spec caused (exit 2, a refused
Job) holds only while the spec stays at that generation; any edit earns one more attempt."""
ANNOTATION_ABANDONED = "rloop.dev/abandoned"
"""Set, with the Job suspended, when its pod never ran within retry.pendingTimeoutSeconds: the attempt
counts as failed from then on. JSON: {"time": RFC 3339, "reason": the pod's waiting reason, "message"}."""

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
"""Annotation (and, since Kubernetes 1.28, label) the Job controller puts on each pod of an Indexed Job:
its index, 0..completions-1. The stage's NODE_RANK comes from it (downward API)."""
INDEX_SUFFIX_MAX = len("-255")
"""`-<index>` of the last pod of the widest Indexed Job (resources.<kind>.nodes is at most 256)."""
INDEXED_MAX_NAME = MAX_NAME - INDEX_SUFFIX_MAX
"""Names of Indexed Jobs are shorter: the Job controller sets each pod's hostname to `<job>-<index>`
without cutting it, and a hostname is a DNS label (63); a longer one and no pod is ever created."""
NODES_SERVICE_SUFFIX = "-nodes"

BASE_ITERATION = "base"
"""`rloop.dev/iteration` of base-policy stages (init, base eval), which belong to no iteration."""

_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def job_name(run: str, stage: Stage, attempt: int, *, indexed: bool = False) -> str:
    """`<run>-i<k>-<kind>[-<set>]-a<attempt>` (`b` instead of `i<k>` for base stages).

    Lowercase DNS-1123 label. Past 63 characters (INDEXED_MAX_NAME for an Indexed Job, so that its pods'
    hostnames fit) or when the run name had characters a label cannot hold (e.g. dots), the head is cut
    and `-<8 hex of sha256 of the full name>-a<attempt>` appended, so the name stays unique,
    deterministic, and still ends with the attempt (readable in `kubectl get`).
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    it = "b" if stage.iteration is None else f"i{stage.iteration}"
    parts = [run, it, stage.kind, *([stage.eval_set] if stage.eval_set else []), f"a{attempt}"]
    full = "-".join(parts)
    limit = INDEXED_MAX_NAME if indexed else MAX_NAME
    clean = _NOT_DNS.sub("-", full.lower()).strip("-")
    if clean == full and len(full) <= limit:
        return full
    # Hash the *unsanitised* name: `a.b` and `a-b` must not collide after sanitising.
    suffix = f"-{_hash8(full)}-a{attempt}"
    head = clean[: limit - len(suffix)].rstrip("-")
    return f"{head}{suffix}" if head else suffix.lstrip("-")


def nodes_service_name(run: str) -> str:
    """`<run>-nodes`: the headless Service giving the pods of a run's Indexed Jobs their DNS names
    (`<job>-<index>.<service>`), so node 0 is the rendezvous address of the others.

    A Service name is a DNS-1035 label (63, starts with a letter), stricter than a run name (a DNS
    subdomain of up to 253 characters, may start with a digit or hold dots): otherwise the head is cut
    and `-<8 hex of sha256 of the run name>-nodes` appended (`r` first when it would start with a digit)."""
    full = f"{run}{NODES_SERVICE_SUFFIX}"
    clean = _NOT_DNS.sub("-", full.lower()).strip("-")
    if clean == full and len(full) <= MAX_NAME and full[0].isalpha():
        return full
    suffix = f"-{_hash8(run)}{NODES_SERVICE_SUFFIX}"
    head = clean[: MAX_NAME - len(suffix) - 1].removesuffix(NODES_SERVICE_SUFFIX).rstrip("-")
    if not head[:1].isalpha():
        head = f"r{head}"
    return f"{head}{suffix}"


def label_value(text: str) -> str:
    """`text` if it is a valid label value, else a ≤63-character stand-in ending in its hash.

    Run names are DNS subdomains (up to 253 characters); label values hold at most 63."""
    if len(text) <= MAX_NAME and _LABEL_VALUE.match(text):
        return text
    suffix = f"-{_hash8(text)}"
    head = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[: MAX_NAME - len(suffix)]
    head = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", head)
    return f"{head}{suffix}" if head else suffix[1:]


def stage_label(stage: Stage) -> str:
    """The stage id as a label value: '/' is not allowed there, '.' is (and never occurs in an id)."""
    return stage.id.replace("/", ".")


def job_labels(run: str, stage: Stage, attempt: int) -> dict[str, str]:
    """Labels of a stage Job and its pods: select a run's Jobs, group them by stage, dashboards."""
    return {
        LABEL_RUN: label_value(run),
        LABEL_STAGE: stage_label(stage),
        LABEL_ITERATION: BASE_ITERATION if stage.iteration is None else str(stage.iteration),
        LABEL_ATTEMPT: str(attempt),
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def run_pod_selector(run: str) -> dict[str, str]:
    """Labels every stage pod of the run carries (the selector of its headless Service)."""
    return {LABEL_RUN: label_value(run), LABEL_MANAGED_BY: MANAGED_BY}


def run_selector(run: str) -> str:
    """Label selector of one run's Jobs (the API layer lists with it)."""
    return f"{LABEL_RUN}={label_value(run)},{LABEL_MANAGED_BY}={MANAGED_BY}"


def parse_job_labels(labels: dict[str, str] | None) -> tuple[Stage, int] | None:
    """(stage, attempt) of a Job from its labels; None when they are missing or not ours."""
    labels = labels or {}
    try:
        stage = Stage.from_id(labels[LABEL_STAGE].replace(".", "/"))
        attempt = int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError, TypeError):
        return None
    return (stage, attempt) if attempt >= 0 else None
