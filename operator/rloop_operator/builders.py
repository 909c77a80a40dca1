"""Pure builders: (run, spec, stage, attempt) → the batch/v1 Job manifest that runs the stage.

The container runs exactly what the local runner runs (`rloop.runner.stage_command`), with the image's
`rloop` entrypoint instead of `python -m rloop`, so both executors execute the same stages.
Same inputs give an identical dict: no clocks, no randomness, no API calls.
"""

from __future__ import annotations

import json
from typing import Any

from rloop.contracts import (
    DEFAULT_MASTER_PORT,
    DISTRIBUTED_STAGE_KINDS,
    EXIT_INVALID_INPUT,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NNODES_ENV,
    NODE_RANK_ENV,
    NPROC_PER_NODE_ENV,
    RUN_MANIFEST_FILE_ENV,
    RUN_MANIFEST_SHA256_ENV,
    manifest_sha256,
)
from rloop.plan import Stage
from rloop.redact import is_redacted
from rloop.spec import API_GROUP, API_VERSION, KIND, RLoopRunSpec, StageResources
from rloop_operator.naming import (
    ANNOTATION_ABANDONED,
    ANNOTATION_SPEC_GENERATION,
    ANNOTATION_SUSPENDED,
    COMPLETION_INDEX_ANNOTATION,
    LABEL_KUEUE_QUEUE,
    job_labels,
    job_name,
    nodes_service_name,
    run_pod_selector,
)

CONTAINER = "stage"
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT = 9400
RUN_AS = 1000
GPU_RESOURCE = "nvidia.com/gpu"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_SECRET_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")
RUN_MANIFEST_ANNOTATION = "rloop.dev/run-manifest"
"""Pod-template annotation holding `run_manifest(...)`; a downward-API volume shows it to the stage as
RUN_MANIFEST_PATH. Not an env variable: env is copied into every process the stage starts (torchrun,
vLLM and verifier workers), shown by `kubectl describe pod`, and one variable is capped at 128 KiB."""
RUN_MANIFEST_PATH = "/etc/rloop/run/manifest.json"
DEFAULT_EPHEMERAL_STORAGE = "50Gi"
"""`/tmp` size and ephemeral-storage request/limit when the spec names none (StageResources.ephemeralStorage)."""
DEFAULT_SHM_SIZE = "16Gi"
"""`/dev/shm` size of GPU pods without a memory setting (StageResources.shmSize)."""

RENDEZVOUS_PORT_NAME = "rendezvous"
"""Port of the headless Service: node 0's torch elastic store (MASTER_PORT); the chart's NetworkPolicy
allows it between stage pods."""
LOCAL_MASTER_ADDR = "127.0.0.1"
"""Rendezvous address of a one-pod stage of several processes: they all run in that pod."""

_RESOURCE_FIELDS = tuple(StageResources.model_fields)
"""Every pod setting merges field-wise (a new StageResources field needs no change here)."""


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


def stage_nodes(spec: RLoopRunSpec, kind: str) -> int:
    """Pods of one attempt of a `kind` stage: resources.<kind>.nodes for rl and rft, else 1."""
    if kind not in DISTRIBUTED_STAGE_KINDS:
        return 1  # the spec refuses nodes elsewhere; this keeps the builder from ever trusting that
    return stage_resources(spec, kind).nodes or 1


def stage_job_name(run_name: str, spec: RLoopRunSpec, stage: Stage, attempt: int) -> str:
    """The Job name of this attempt: shorter for an Indexed Job (its pods' hostnames must fit)."""
    return job_name(run_name, stage, attempt, indexed=stage_nodes(spec, stage.kind) > 1)


def stage_args(stage: Stage, run_uri: str) -> list[str]:
    """The stage command (same arguments as `rloop.runner.stage_command`, after the interpreter)."""
    if not is_redacted(run_uri):  # spec validation rejects these in storage.uri; a command line is public
        raise ValueError("the run URI has userinfo, a query or a fragment; it cannot be a Job argument")
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
        # The manifest itself is a file (RUN_MANIFEST_ANNOTATION); env pins its digest, since a pod's
        # annotations (and so the file) can be edited after the operator made the Job, its env cannot.
        {"name": RUN_MANIFEST_FILE_ENV, "value": RUN_MANIFEST_PATH},
        {"name": RUN_MANIFEST_SHA256_ENV, "value": manifest_sha256(run_manifest(run_name, namespace, spec))},
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


def _tracker_env_from(spec: RLoopRunSpec) -> list[dict[str, Any]]:
    """Every key of the tracker Secrets (tracking.mlflow/wandb.secretRef: MLFLOW_TRACKING_USERNAME,
    WANDB_API_KEY, ...) as environment variables of the stage container; `env` entries win over them.
    Optional: a missing Secret makes the tracker warn and stay off, it never holds a stage back."""
    return [{"secretRef": {"name": name, "optional": True}} for name in spec.tracking.secret_names()]


def _distributed_env(kind: str, res: StageResources, job: str, service: str) -> list[dict[str, Any]]:
    """torchrun's topology for an rl or rft stage of more than one process (nodes x GPUs), else nothing.

    `rloop stage` starts NPROC_PER_NODE workers itself (torch's elastic agent, static rendezvous): node
    NODE_RANK of NNODES meets the others at node 0's MASTER_ADDR:MASTER_PORT. One pod: 127.0.0.1, rank 0.
    Several (an Indexed Job): node 0's stable DNS name through the run's headless Service, and the rank
    is the pod's completion index, read by the downward API from the annotation the Job controller sets
    (also in JOB_COMPLETION_INDEX, which the stage falls back to)."""
    if kind not in DISTRIBUTED_STAGE_KINDS:
        return []
    nodes, per_node = res.nodes or 1, max(res.gpus or 0, 1)
    if nodes * per_node <= 1:
        return []
    if nodes == 1:
        addr, rank = LOCAL_MASTER_ADDR, {"value": "0"}
    else:
        addr = f"{job}-0.{service}"
        rank = {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}
    return [
        {"name": NNODES_ENV, "value": str(nodes)},
        {"name": NODE_RANK_ENV, **rank},
        {"name": NPROC_PER_NODE_ENV, "value": str(per_node)},
        {"name": MASTER_ADDR_ENV, "value": addr},
        {"name": MASTER_PORT_ENV, "value": str(DEFAULT_MASTER_PORT)},
    ]


def _container_resources(res: StageResources) -> dict[str, Any]:
    # Sized, so a stage filling its disk is evicted alone (and says so) instead of the node running out.
    scratch = res.ephemeral_storage or DEFAULT_EPHEMERAL_STORAGE
    requests: dict[str, str] = {"ephemeral-storage": scratch}
    limits: dict[str, str] = {"ephemeral-storage": scratch}
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
    attempt: int,
    run_uri: str,
    image: str,
    res: StageResources,
) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": res.ephemeral_storage or DEFAULT_EPHEMERAL_STORAGE}}
    ]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if res.gpus:
        # The container runtime's default /dev/shm is 64 MiB; NCCL and torch workers need more. It is
        # memory: bounded, so a runaway writer hits its own limit rather than the node's memory.
        shm = res.shm_size or res.memory or DEFAULT_SHM_SIZE
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    # The run manifest, from the pod's own annotation (the stage writes <run>/spec.json from it).
    manifest_dir, manifest_file = RUN_MANIFEST_PATH.rsplit("/", 1)
    annotation = {"fieldPath": f"metadata.annotations['{RUN_MANIFEST_ANNOTATION}']"}
    volumes.append({"name": "run-manifest", "downwardAPI": {"items": [{"path": manifest_file, "fieldRef": annotation}]}})
    mounts.append({"name": "run-manifest", "mountPath": manifest_dir, "readOnly": True})
    job = stage_job_name(run_name, spec, stage, attempt)
    env = _env(run_name, namespace, spec) + _distributed_env(stage.kind, res, job, nodes_service_name(run_name))
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": stage_args(stage, run_uri),
        "env": env,
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
    tracker_secrets = _tracker_env_from(spec)
    if tracker_secrets:
        container["envFrom"] = tracker_secrets
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
    if res.service_account_name:
        # For the store's credentials (IRSA, EKS Pod Identity). automountServiceAccountToken stays off:
        # their webhooks project a token of their own; the API token is still not needed.
        pod["serviceAccountName"] = res.service_account_name
    if stage_nodes(spec, stage.kind) > 1:
        # With the Job controller's hostname `<job>-<index>`, the pod is `<job>-<index>.<service>` in DNS.
        pod["subdomain"] = nodes_service_name(run_name)
    return pod


def pod_failure_policy() -> dict[str, Any]:
    """Preemption/eviction ends the attempt at once, whatever the exit code, so the operator sees it:
    it starts the next attempt without backoff, apart from retry.limit, and counts it against
    retry.disruptionLimit (an in-Job replacement would be invisible and unbounded). Exit code 2
    (invalid input) can never succeed."""
    return {
        "rules": [
            # First match wins. Kubernetes names the condition in the Job's Failed message
            # ("Pod ns/x has condition DisruptionTarget matching FailJob rule at index 0").
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_INVALID_INPUT]},
            },
        ]
    }


def _owner_reference(run_name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": run_name,
        "uid": uid,
        # Deleting the run deletes its Jobs (and their pods) and its Service; the store data is kept.
        "controller": True,
        "blockOwnerDeletion": True,
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
    generation: int | None = None,
) -> dict[str, Any]:
    """The Job running attempt `attempt` of `stage` for the RLoopRun `namespace/run_name` (whose
    metadata.generation is `generation`)."""
    res = stage_resources(spec, stage.kind)
    image = res.image or default_image
    labels = job_labels(run_name, stage, attempt)
    job_meta_labels = dict(labels)
    if spec.queue_name:
        job_meta_labels[LABEL_KUEUE_QUEUE] = spec.queue_name
    metadata: dict[str, Any] = {
        "name": stage_job_name(run_name, spec, stage, attempt),
        "namespace": namespace,
        "labels": job_meta_labels,
        "ownerReferences": [_owner_reference(run_name, uid)],
    }
    annotations: dict[str, str] = {}
    if generation is not None:
        annotations[ANNOTATION_SPEC_GENERATION] = str(generation)
    if spec.suspend:
        annotations[ANNOTATION_SUSPENDED] = "true"
    if annotations:
        metadata["annotations"] = annotations
    job_spec: dict[str, Any] = {
        "suspend": spec.suspend,
        # The operator owns retries (with backoff and the run's retry.limit): each attempt is its own
        # Job with its own name, so a failed attempt stays visible and is never re-run in place.
        "backoffLimit": 0,
        # No ttlSecondsAfterFinished: status.committed, not the Job, records that the stage committed.
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {
                "labels": dict(labels),
                "annotations": {RUN_MANIFEST_ANNOTATION: run_manifest(run_name, namespace, spec)},
            },
            "spec": _pod_spec(run_name, namespace, spec, stage, attempt, run_uri, image, res),
        },
    }
    if res.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = res.active_deadline_seconds
    job_spec |= _indexed_fields(stage_nodes(spec, stage.kind))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def _indexed_fields(nodes: int) -> dict[str, Any]:
    """A stage of several pods is one Indexed Job: all pods at once (completions = parallelism), each
    with its index. backoffLimit 0 and the pod failure policy apply to the whole Job, so any pod failing
    fails it at once and the Job controller terminates the other pods: no node waits on a dead peer, and
    the operator's next attempt is the retry. Kueue admits an Indexed Job as one Workload of
    `parallelism` pods (all or nothing), from the queue label the Job already carries."""
    if nodes <= 1:
        return {}
    return {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes}


def needs_nodes_service(job: dict[str, Any]) -> bool:
    """Whether a built Job's pods find each other through the run's headless Service."""
    return (job.get("spec") or {}).get("completionMode") == "Indexed"


def build_headless_service(run_name: str, namespace: str, uid: str) -> dict[str, Any]:
    """The run's headless Service (`nodes_service_name`), the `subdomain` of its Indexed Jobs' pods.

    No cluster IP: it only publishes DNS records of the selected pods, so `<job>-0.<service>` is node 0.
    Not-ready pods are published too: the nodes rendezvous while starting, before any of them could be
    ready. One per run, for all its stages and attempts (a pod's hostname tells them apart), owned by the
    run so it goes with it."""
    labels = run_pod_selector(run_name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": nodes_service_name(run_name),
            "namespace": namespace,
            "labels": dict(labels),
            "ownerReferences": [_owner_reference(run_name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": dict(labels),
            "ports": [
                {"name": RENDEZVOUS_PORT_NAME, "port": DEFAULT_MASTER_PORT, "targetPort": DEFAULT_MASTER_PORT,
                 "protocol": "TCP"}
            ],
        },
    }


def abandon_patch(reason: str, message: str, time: str) -> dict[str, Any]:
    """Merge patch for a Job in `Actions.abandon_jobs`: suspending deletes its pod; the annotation makes
    every later pass read the attempt as failed, with the pod's reason."""
    record = json.dumps({"time": time, "reason": reason, "message": message}, sort_keys=True)
    return {"metadata": {"annotations": {ANNOTATION_ABANDONED: record}}, "spec": {"suspend": True}}


def suspend_patch() -> dict[str, Any]:
    """Merge patch the API layer applies to a Job in `Actions.suspend_jobs`."""
    return {"metadata": {"annotations": {ANNOTATION_SUSPENDED: "true"}}, "spec": {"suspend": True}}


def resume_patch() -> dict[str, Any]:
    """Merge patch for a Job in `Actions.resume_jobs` (null deletes the marker annotation)."""
    return {"metadata": {"annotations": {ANNOTATION_SUSPENDED: None}}, "spec": {"suspend": False}}
