"""Pure builders: (run, spec, stage, attempt) → the batch/v1 Job manifest that runs the stage.

The container runs exactly what the local runner runs (`rloop.runner.stage_command`), with the image's
`rloop` entrypoint instead of `python -m rloop`, so both executors execute the same stages.
Same inputs give an identical dict: no clocks, no randomness, no API calls.
"""

from __future__ import annotations

import json
from typing import Any

from rloop.contracts import EXIT_INVALID_INPUT
from rloop.plan import Stage
from rloop.spec import API_GROUP, API_VERSION, KIND, RLoopRunSpec, StageResources
from rloop_operator.naming import (
    ANNOTATION_SUSPENDED,
    LABEL_KUEUE_QUEUE,
    job_labels,
    job_name,
)

CONTAINER = "stage"
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT = 9400
RUN_AS = 1000
GPU_RESOURCE = "nvidia.com/gpu"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_SECRET_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")
ENV_RUN_MANIFEST = "RLOOP_RUN_MANIFEST"

_RESOURCE_FIELDS = ("image", "gpus", "cpu", "memory", "node_selector", "tolerations", "priority_class_name")


def stage_resources(spec: RLoopRunSpec, kind: str) -> StageResources:
    """The stage kind's pod settings, each unset field taken from `resources.default` (field-wise, so
    `rl: {gpus: 1}` keeps the default image and tolerations)."""
    default = spec.resources.default
    override: StageResources | None = getattr(spec.resources, kind, None)
    if override is None:
        return default
    return StageResources.model_construct(
        **{f: v if (v := getattr(override, f)) is not None else getattr(default, f) for f in _RESOURCE_FIELDS}
    )


def stage_args(stage: Stage, run_uri: str) -> list[str]:
    """The stage command (same arguments as `rloop.runner.stage_command`, after the interpreter)."""
    return ["rloop", "stage", stage.kind, "--run", run_uri, *stage.cli_args()]


def run_manifest(run_name: str, namespace: str, spec: RLoopRunSpec) -> str:
    """The run as a compact, key-sorted RLoopRun manifest (deterministic, so the Job dict is too).

    Stage pods read the spec from `<run>/spec.json` in the store, and on Kubernetes nobody but the stage
    pods holds store credentials: this lets a stage write that snapshot when it is missing."""
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": run_name, "namespace": namespace},
        "spec": spec.to_wire(),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _env(run_name: str, namespace: str, spec: RLoopRunSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The stage writes its summary here; Kubernetes hands it to the operator as the pod's
        # termination message, so metrics reach the status without the operator reading the store.
        {"name": "RLOOP_TERMINATION_LOG", "value": TERMINATION_LOG},
        # The root filesystem is read-only: libraries (HF, torch, matplotlib) write caches under $HOME.
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # Live step metrics (rloop.telemetry) for the chart's PodMonitor.
        {"name": "RLOOP_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": ENV_RUN_MANIFEST, "value": run_manifest(run_name, namespace, spec)},
    ]
    secret = spec.storage.secret_ref
    if secret is not None:
        # Credentials only ever come from the Secret, never from the spec (DESIGN §3.3).
        for key in S3_SECRET_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
        for key in S3_OPTIONAL_SECRET_KEYS:
            env.append(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key, "optional": True}},
                }
            )
    return env


def _container_resources(res: StageResources) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        # No CPU limit on purpose: CFS throttling slows training and rollouts for nothing.
        requests["cpu"] = res.cpu
    if res.memory is not None:
        # Memory request = limit: a stage over its memory is OOM-killed (retryable) rather than
        # evicted at random when the node runs short.
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        # Extended resources cannot be overcommitted: Kubernetes requires requests == limits.
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(res.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_spec(
    run_name: str,
    namespace: str,
    spec: RLoopRunSpec,
    stage: Stage,
    run_uri: str,
    image: str,
    res: StageResources,
) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if res.gpus:
        # The container runtime's default /dev/shm is 64 MiB; NCCL and torch workers need more.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": stage_args(stage, run_uri),
        "env": _env(run_name, namespace, spec),
        "resources": _container_resources(res),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "terminationMessagePath": TERMINATION_LOG,
        # A stage that crashed before writing its summary still tells why (the tail of its log).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        # Required by podFailurePolicy; retries are new Jobs (new attempts), never in-place restarts.
        "restartPolicy": "Never",
        # Stages talk to the object store only, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.to_wire() for t in res.tolerations]
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    return pod


def pod_failure_policy() -> dict[str, Any]:
    """Preemption/eviction is not the stage's fault; exit code 2 (invalid input) can never succeed."""
    return {
        "rules": [
            # First match wins: a disrupted pod is replaced within the same Job, whatever its exit code.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_INVALID_INPUT]},
            },
        ]
    }


def build_job(
    run_name: str,
    namespace: str,
    uid: str,
    spec: RLoopRunSpec,
    stage: Stage,
    attempt: int,
    *,
    run_uri: str,
    default_image: str,
) -> dict[str, Any]:
    """The Job running attempt `attempt` of `stage` for the RLoopRun `namespace/run_name`."""
    res = stage_resources(spec, stage.kind)
    image = res.image or default_image
    labels = job_labels(run_name, stage, attempt)
    job_meta_labels = dict(labels)
    if spec.queue_name:
        job_meta_labels[LABEL_KUEUE_QUEUE] = spec.queue_name
    metadata: dict[str, Any] = {
        "name": job_name(run_name, stage, attempt),
        "namespace": namespace,
        "labels": job_meta_labels,
        "ownerReferences": [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": run_name,
                "uid": uid,
                # Deleting the run deletes its Jobs (and their pods); the store data is kept.
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if spec.suspend:
        metadata["annotations"] = {ANNOTATION_SUSPENDED: "true"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "suspend": spec.suspend,
            # The operator owns retries (with backoff and the run's retry.limit): each attempt is its own
            # Job with its own name, so a failed attempt stays visible and is never re-run in place.
            "backoffLimit": 0,
            # No ttlSecondsAfterFinished: a succeeded Job is the operator's evidence that the stage committed.
            "podFailurePolicy": pod_failure_policy(),
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": _pod_spec(run_name, namespace, spec, stage, run_uri, image, res),
            },
        },
    }


def suspend_patch() -> dict[str, Any]:
    """Merge patch the API layer applies to a Job in `Actions.suspend_jobs`."""
    return {"metadata": {"annotations": {ANNOTATION_SUSPENDED: "true"}}, "spec": {"suspend": True}}


def resume_patch() -> dict[str, Any]:
    """Merge patch for a Job in `Actions.resume_jobs` (null deletes the marker annotation)."""
    return {"metadata": {"annotations": {ANNOTATION_SUSPENDED: None}}, "spec": {"suspend": False}}
