"""A test "kubelet" + Job controller for the kmock emulator (DESIGN §4).

The emulator runs no controllers. `Kubelet` stands in for the Job controller and the kubelet:
for each new, non-suspended `batch/v1` Job it creates a Pod (labelled `job-name: <job>`, owned by the
Job) and runs the Job's single container command as a local process with the container's env;
it then writes the Pod's and the Job's status as a real cluster (1.31+) would:

- running: Job `status.startTime`, `active: 1`; Pod `phase: Running`, container state `running`.
- exit 0: Pod `Succeeded`, `state.terminated.{exitCode: 0, reason: Completed, message}`; Job
  `succeeded: 1`, `completionTime`, conditions `SuccessCriteriaMet` + `Complete`.
- exit != 0: Pod `Failed` (`reason: Error`). The Job's `podFailurePolicy` is evaluated (onExitCodes
  rules, in order): `FailJob` -> conditions `FailureTarget` + `Failed` with reason `PodFailurePolicy`;
  `Ignore` -> a new pod, not counted; otherwise counted in `failed`, and past `backoffLimit`
  (default 6) -> `Failed` reason `BackoffLimitExceeded`, else a new pod after `retry_delay`.
- `activeDeadlineSeconds` -> process killed, `Failed` reason `DeadlineExceeded`.
- `spec.suspend: true` -> process killed, Pod deleted, condition `Suspended`; resuming starts a new pod.
- Job deleted -> process killed (the emulator's ownerReference GC deletes the Pod).

The termination message: the kubelet sets `RLOOP_TERMINATION_LOG` in the process env to a fresh
file per pod and copies its content (at most 4096 bytes, as the real kubelet) into the Pod's
`status.containerStatuses[0].state.terminated.message`; with `terminationMessagePolicy:
FallbackToLogsOnError` an empty message on failure falls back to the log tail.

Env: plain `value` entries (with `$(VAR)` expansion, also in command/args), `valueFrom.secretKeyRef`,
`configMapKeyRef`, `fieldRef` (metadata.name/namespace/uid/labels[...]/annotations[...]) and `envFrom`
read from the emulator. A missing Secret/key that is not optional leaves the pod waiting with
`CreateContainerConfigError` (retried every scan), as in a real cluster; an image whose reference
contains `does-not-exist` never pulls (`ImagePullBackOff`). Both: a Pod object with that waiting
state, the Job `active: 1, ready: 0`.

`evict(job)` evicts a Job's running pod: the process is killed, the Pod gets the `DisruptionTarget`
condition, and the Job's `podFailurePolicy` onPodConditions rules decide (FailJob with the real
Job controller's message, Ignore: a new pod, else counted).

Indexed Jobs (`completionMode: Indexed`, `parallelism == completions`, the shape of a stage of several
nodes): all `completions` pods start together, pod `<job>-<index>-<random>` with the annotation and label
`batch.kubernetes.io/job-completion-index`, env `JOB_COMPLETION_INDEX` appended to the container's (as the
Job controller does) and hostname `<job>-<index>`. Job status: `active` pods, `ready` (the running ones),
`succeeded` and `completedIndexes`; `Complete` once every index succeeded. A failed pod is judged by the
`podFailurePolicy` as above; once the Job fails (with `backoffLimit: 0` its first failed pod) the other
pods are terminated (SIGTERM, then SIGKILL after `grace`), their status written, and deleted, as the Job
controller deletes a failed Job's active pods; under `backoffLimit` a failed index gets a new pod.
`kill_pod(job, index, sig)` sends a signal to one pod's process (SIGKILL: a crashed or lost node).
Rendezvous on 127.0.0.1: `<job>-0.<service>` does not resolve here (no DNS, and one network namespace
for every pod), so a pod whose env has `MASTER_ADDR` gets `127.0.0.1` instead, and `MASTER_PORT` becomes
one free local port chosen per Job (every pod of a Job meets on it; two Jobs never share one).

Every process of a pod carries `TEST_KUBELET_POD=<namespace>/<pod>` in its env; when the pod's main
process ends (or is killed), the rest are killed too, as a container's processes end with it (workers a
launcher started in sessions of their own included).

`translate(argv, container, job) -> argv` maps container commands to local ones
(see `map_executables`). `instant=True` completes Jobs at once with exit 0 and a fixed (or computed)
termination message, without running anything (for scale benchmarks).

Volumes: `downwardAPI` volumes (fieldRef items: metadata.name/namespace/uid/labels[...]/annotations[...])
are written under the pod's directory; the process has no mount namespace, so an env value naming a
path under such a volume's mountPath is rewritten to point there.

Not emulated: images, resources, node selection, other volumes, multiple containers, NonIndexed Jobs with
parallelism > 1, Indexed Jobs with `parallelism` other than `completions`, `backoffLimitPerIndex`,
eviction of an Indexed Job's pods, DNS (see rendezvous above), pod `restartPolicy: OnFailure` restarts in
place (a new pod is made instead).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rloop.contracts import JOB_COMPLETION_INDEX_ENV, MASTER_ADDR_ENV, MASTER_PORT_ENV
from tests.k8s.apiserver import CONFIGMAPS, JOBS, PODS, SECRETS, Server

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 4096  # bytes, as the real kubelet truncates termination messages
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's annotation and label
POD_MARKER_ENV = "TEST_KUBELET_POD"
LOCALHOST = "127.0.0.1"
Translate = Callable[[list[str], Mapping[str, Any], Mapping[str, Any]], list[str]]


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_status(container: Mapping[str, Any], pod_name: str, state: dict[str, Any],
                     ready: bool = False) -> dict[str, Any]:
    """A containerStatuses entry with every field the `kubernetes` client's (pydantic) model requires."""
    image = container.get("image", "")
    return {"name": container.get("name", "main"), "image": image, "imageID": f"kmock://{image}",
            "containerID": f"kmock://{pod_name}", "ready": ready, "started": ready, "restartCount": 0,
            "state": state}


def map_executables(mapping: Mapping[str, str]) -> Translate:
    """A `translate` hook replacing argv[0] by basename: e.g. {'rloop': '<venv>/bin/rloop'}."""

    def translate(argv: list[str], container: Mapping[str, Any], job: Mapping[str, Any]) -> list[str]:
        if argv and os.path.basename(argv[0]) in mapping:
            return [mapping[os.path.basename(argv[0])], *argv[1:]]
        return argv

    return translate


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined vars are substituted, `$$` escapes, unknown refs stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


class _ConfigError(Exception):
    """A container's env cannot be resolved yet (CreateContainerConfigError)."""


class _ImagePullError(Exception):
    """A container's image cannot be pulled (ImagePullBackOff)."""


@dataclass
class PodRun:
    pod_name: str
    argv: list[str]
    log_path: Path
    index: int | None = None  # completion index (Indexed Jobs)
    pid: int | None = None
    marker: str = ""  # POD_MARKER_ENV of its processes
    exit_code: int | None = None
    message: str = ""
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=_now)
    finished: float | None = None


@dataclass
class JobRecord:
    """What the kubelet did for one Job (for assertions and debugging)."""

    namespace: str
    name: str
    uid: str
    pods: list[PodRun] = field(default_factory=list)
    outcome: str | None = None  # "Complete" | "Failed"
    reason: str | None = None
    finished_at: float | None = None  # time.time() when the final status was written

    @property
    def last(self) -> PodRun | None:
        return self.pods[-1] if self.pods else None


@dataclass
class _Running:
    job: dict[str, Any]
    record: JobRecord
    run: PodRun
    proc: subprocess.Popen[bytes]
    term_path: Path
    log_file: Any
    deadline: float | None


@dataclass
class _PodPlan:
    manifest: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str]
    argv: list[str]
    index: int | None


@dataclass
class _IndexedRun:
    """The pods of one Indexed Job: started together, one per completion index."""

    job: dict[str, Any]
    record: JobRecord
    container: dict[str, Any]
    completions: int
    deadline: float | None
    pods: dict[int, _Running] = field(default_factory=dict)  # running, by index
    stuck: dict[int, str] = field(default_factory=dict)  # index -> name of its Pod waiting (config, image)
    waiting: dict[int, float] = field(default_factory=dict)  # index -> monotonic time its pod may start
    succeeded: set[int] = field(default_factory=set)
    failed: int = 0
    reported: dict[str, Any] = field(default_factory=dict)  # the counts last written to the Job's status


def _is_indexed(job: Mapping[str, Any]) -> bool:
    return (job.get("spec") or {}).get("completionMode") == "Indexed"


def _completions(job: Mapping[str, Any]) -> int:
    value = int((job.get("spec") or {}).get("completions") or 1)
    if value < 1:
        raise ValueError(f"completions must be at least 1, got {value}")
    return value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def index_ranges(indexes: set[int]) -> str:
    """`status.completedIndexes` as the Job controller writes it: "0-2,5"."""
    out: list[str] = []
    for i in sorted(indexes):
        if out and (last := out[-1].split("-"))[-1] == str(i - 1):
            out[-1] = f"{last[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def pod_processes(marker: str) -> list[int]:
    """Pids of the live processes whose env carries POD_MARKER_ENV=marker (Linux /proc)."""
    needle = f"{POD_MARKER_ENV}={marker}".encode()
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


class Kubelet:
    """Runs Jobs from the emulator as local processes. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        server: Server,
        *,
        translate: Translate | None = None,
        max_concurrency: int = 4,
        instant: bool = False,
        instant_message: str | Callable[[Mapping[str, Any]], str] = '{"instant": true}',
        namespace: str | None = None,
        inherit_env: bool = True,
        extra_env: Mapping[str, str] | None = None,
        poll_interval: float = 0.5,
        retry_delay: float = 0.2,
        grace: float = 3.0,
        workdir: str | Path | None = None,
    ):
        self.server = server
        self.translate = translate or (lambda argv, container, job: argv)
        self.max_concurrency = max_concurrency
        self.instant = instant
        self.instant_message = instant_message
        self.namespace = namespace
        self.inherit_env = inherit_env
        self.extra_env = dict(extra_env or {})
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self.grace = grace
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rloop-kubelet-"))
        self.records: dict[str, JobRecord] = {}  # by Job uid
        self._running: dict[str, _Running] = {}  # by Job uid
        self._done: set[str] = set()  # Job uids with a final status written
        self._suspended: set[str] = set()  # Job uids whose Suspended condition we wrote
        self._not_before: dict[str, float] = {}  # Job uid -> monotonic time of the next pod (retries)
        self._stuck_pods: dict[str, str] = {}  # Job uid -> name of its Pod waiting (config error, image pull)
        self._indexed: dict[str, _IndexedRun] = {}  # Indexed Jobs with pods to run, by Job uid
        self._ports: dict[str, int] = {}  # Job uid -> the local MASTER_PORT of its pods
        self._evictions: set[tuple[str, str]] = set()  # (namespace, Job name) to evict on the next scan
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Kubelet:
        self.server.add_listener(self._on_event)
        self._thread = threading.Thread(target=self._loop, name="test-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop scanning and kill the running processes (their Jobs keep their last status)."""
        self._stopping.set()
        self._wake.set()
        self.server.remove_listener(self._on_event)
        if self._thread is not None:
            self._thread.join(timeout)
        for uid in list(self._running):
            self._kill(self._running.pop(uid))
        for uid in list(self._indexed):
            self._kill_all(list(self._indexed.pop(uid).pods.values()))
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_event(self, resource: Any, event: Mapping[str, Any]) -> None:
        if getattr(resource, "plural", None) == "jobs":
            self._wake.set()

    # ------------------------------------------------------------------ queries for tests
    def record(self, name: str, namespace: str = "default") -> JobRecord | None:
        """The latest record for a Job name (a re-created Job gets a new record)."""
        found = [r for r in self.records.values() if r.name == name and r.namespace == namespace]
        return found[-1] if found else None

    def kill_pod(self, name: str, index: int | None = None, sig: int = signal.SIGKILL,
                 namespace: str = "default") -> PodRun:
        """Send `sig` to the main process of Job `namespace/name`'s running pod (of completion index
        `index` in an Indexed Job); the next scan sees it exit, like a container whose process died.
        LookupError when no such pod runs."""
        for run in list(self._indexed.values()):
            meta = run.job["metadata"]
            if (meta["namespace"], meta["name"]) == (namespace, name) and index in run.pods:
                return self._signal(run.pods[index], sig)
        for running in list(self._running.values()):
            meta = running.job["metadata"]
            if (meta["namespace"], meta["name"]) == (namespace, name) and index is None:
                return self._signal(running, sig)
        raise LookupError(f"no running pod of Job {namespace}/{name} with index {index}")

    def _signal(self, running: _Running, sig: int) -> PodRun:
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.proc.pid, sig)
        self._wake.set()
        return running.run

    def log_text(self, name: str, namespace: str = "default") -> str:
        rec = self.record(name, namespace)
        if rec is None or rec.last is None or not rec.last.log_path.exists():
            return ""
        return rec.last.log_path.read_text(errors="replace")

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._scan()
            except Exception as e:  # keep serving; surface to tests via .errors
                log.exception("kubelet scan failed")
                self.errors.append(e)
            timeout = 0.05 if (self._running or self._not_before or self._indexed) else self.poll_interval
            self._wake.wait(timeout)
            self._wake.clear()

    def evict(self, name: str, namespace: str = "default") -> None:
        """Evict the running pod of Job `namespace/name` on the next scan (as the Eviction API would)."""
        with self._lock:
            self._evictions.add((namespace, name))
        self._wake.set()

    def _evict_requested(self, jobs: dict[str, Any]) -> None:
        with self._lock:
            wanted, self._evictions = self._evictions, set()
        for uid in list(self._running):
            meta = self._running[uid].job["metadata"]
            if (meta["namespace"], meta["name"]) not in wanted:
                continue
            wanted.discard((meta["namespace"], meta["name"]))
            running = self._running.pop(uid)
            self._kill(running)
            job = copy.deepcopy(jobs.get(uid) or running.job)
            ns, pod_name = meta["namespace"], running.run.pod_name
            self._finish_pod(running, exit_code=143, reason="Error")
            now = _now()
            self._patch_pod_status(ns, pod_name, {"conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                 "message": "Eviction API: evicting", "lastTransitionTime": now}]})
            self._after_disruption(job, running.record, pod_name)
        with self._lock:
            self._evictions |= wanted  # not running yet: evict once it runs

    def _after_disruption(self, job: dict[str, Any], record: JobRecord, pod_name: str) -> None:
        ns = job["metadata"]["namespace"]
        for index, rule in enumerate((job.get("spec") or {}).get("podFailurePolicy", {}).get("rules") or []):
            if any(c.get("type") == "DisruptionTarget" for c in rule.get("onPodConditions") or []):
                if rule.get("action") == "FailJob":
                    self._fail_job(job, record, "PodFailurePolicy",
                                   f"Pod {ns}/{pod_name} has condition DisruptionTarget matching FailJob rule "
                                   f"at index {index}")
                    return
                if rule.get("action") == "Ignore":
                    self._patch_job_status(job, {"active": None, "ready": 0})
                    self._not_before[job["metadata"]["uid"]] = time.monotonic() + self.retry_delay
                    return
        self._after_failure(job, record, self._container(job), 143, pod_name)

    def _scan(self) -> None:
        # Not copied (most are finished and skipped): a Job is deep-copied below before it is used.
        jobs = {j["metadata"]["uid"]: j for j in self.server.list(JOBS, self.namespace, copy_out=False)}
        if self._evictions:
            self._evict_requested(jobs)
        # Running processes: deleted / suspended / finished / past deadline.
        for uid in list(self._running):
            running = self._running[uid]
            job = jobs.get(uid)
            if job is None:
                self._kill(self._running.pop(uid))
                continue
            job = running.job = copy.deepcopy(job)
            if (job.get("spec") or {}).get("suspend"):
                self._kill(self._running.pop(uid))
                self._write_suspended(job, running.run.pod_name)
                continue
            code = running.proc.poll()
            if code is None and running.deadline is not None and time.monotonic() > running.deadline:
                self._kill(self._running.pop(uid))
                self._finish_pod(running, exit_code=137, reason="DeadlineExceeded")
                self._fail_job(job, running.record, "DeadlineExceeded",
                               "Job was active longer than specified deadline")
                continue
            if code is not None:
                self._running.pop(uid)
                self._complete(running, code)
        for uid in list(self._indexed):
            self._scan_indexed(uid, jobs.get(uid))
        # New (or resumed, or retried) Jobs.
        for uid, job in jobs.items():
            if self._stopping.is_set():
                return
            if uid in self._done or uid in self._running or uid in self._indexed:
                continue
            status = job.get("status") or {}
            if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in status.get("conditions") or []):
                self._done.add(uid)
                continue
            if (job.get("spec") or {}).get("suspend"):
                if uid not in self._suspended:
                    self._write_suspended(copy.deepcopy(job), self._stuck_pods.pop(uid, None))
                continue
            if self._not_before.get(uid, 0.0) > time.monotonic():
                continue
            job = copy.deepcopy(job)
            if self.instant:
                self._complete_instantly(job)
                continue
            if _is_indexed(job):
                pods = self._pods_running()
                if pods and pods + _completions(job) > self.max_concurrency:
                    continue  # all of its pods at once, or none yet (one Job wider than the limit still runs)
                self._start_indexed(job)
                continue
            if self._pods_running() >= self.max_concurrency:
                continue
            self._not_before.pop(uid, None)
            self._start(job)

    def _pods_running(self) -> int:
        return len(self._running) + sum(len(r.pods) for r in self._indexed.values())

    # ------------------------------------------------------------------ helpers
    def _record_for(self, job: Mapping[str, Any]) -> JobRecord:
        meta = job["metadata"]
        if meta["uid"] not in self.records:
            self.records[meta["uid"]] = JobRecord(meta["namespace"], meta["name"], meta["uid"])
        return self.records[meta["uid"]]

    def _container(self, job: Mapping[str, Any]) -> dict[str, Any]:
        containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if len(containers) != 1:
            raise ValueError(f"the test kubelet runs exactly one container per Job, got {len(containers)}")
        return containers[0]

    def _patch_job_status(self, job: Mapping[str, Any], status: dict[str, Any]) -> None:
        meta = job["metadata"]
        with contextlib.suppress(Exception):  # the Job may be gone already
            self.server.patch(JOBS, meta["namespace"], meta["name"], {"status": status}, subresource="status")

    def _patch_pod_status(self, namespace: str, pod: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.server.patch(PODS, namespace, pod, {"status": status}, subresource="status")

    def _pod_manifest(self, job: Mapping[str, Any], container: Mapping[str, Any], phase: str,
                      state: dict[str, Any], index: int | None = None) -> dict[str, Any]:
        """The Pod the Job controller would create; of completion index `index` in an Indexed Job (its
        name, annotation, label, hostname and JOB_COMPLETION_INDEX env, as the Job controller adds them)."""
        meta = job["metadata"]
        template = (job.get("spec") or {}).get("template") or {}
        suffix = "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update({"job-name": meta["name"], "batch.kubernetes.io/job-name": meta["name"],
                       "controller-uid": meta["uid"], "batch.kubernetes.io/controller-uid": meta["uid"]})
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        pod_spec = {**(template.get("spec") or {}), "nodeName": "kmock-node"}
        prefix = f"{meta['name'][:57]}-"
        if index is not None:
            labels[COMPLETION_INDEX] = annotations[COMPLETION_INDEX] = str(index)
            at = f"-{index}-"  # the Job controller's podGenerateNameWithIndex: cut to 58 characters
            prefix = f"{meta['name']}{at}" if len(meta["name"]) + len(at) <= 58 else f"{meta['name'][:58 - len(at)]}{at}"
            pod_spec["hostname"] = f"{meta['name']}-{index}"
            indexed = copy.deepcopy(dict(container))
            indexed["env"] = [*(indexed.get("env") or []), {"name": JOB_COMPLETION_INDEX_ENV, "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}}]
            pod_spec["containers"] = [indexed]
            container = indexed
        name = f"{prefix}{suffix}"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": pod_spec,
            "status": {
                "phase": phase,
                "startTime": _now(),
                "containerStatuses": [container_status(container, name, state, ready=phase == "Running")],
            },
        }

    def _mount_downward_api(self, job: Mapping[str, Any], container: Mapping[str, Any], pod_dir: Path,
                            pod: Mapping[str, Any], env: dict[str, str]) -> dict[str, str]:
        """Write the pod's downwardAPI volumes under `pod_dir`; `env` with paths under their mounts moved there.
        `pod`: the Pod's metadata (its labels and annotations)."""
        template = (job.get("spec") or {}).get("template") or {}
        tmeta = pod
        pod_meta = {"name": pod["name"], "namespace": job["metadata"]["namespace"], "uid": job["metadata"]["uid"]}
        local: dict[str, Path] = {}
        for volume in (template.get("spec") or {}).get("volumes") or []:
            if "downwardAPI" not in volume:
                continue
            root = pod_dir / "volumes" / volume["name"]
            for item in volume["downwardAPI"].get("items") or []:
                path = (item.get("fieldRef") or {}).get("fieldPath", "")
                if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
                    value = str((tmeta.get(m.group(1)) or {}).get(m.group(2), ""))
                else:
                    value = str(pod_meta.get(path.removeprefix("metadata."), ""))
                (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (root / item["path"]).write_text(value)
            local[volume["name"]] = root
        moved = dict(env)
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in local:
                continue
            mount_path = mount["mountPath"].rstrip("/")
            for key, value in env.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    moved[key] = str(local[mount["name"]]) + value[len(mount_path):]
        return moved

    def _resolve_env(self, job: Mapping[str, Any], container: Mapping[str, Any],
                     pod: Mapping[str, Any]) -> dict[str, str]:
        """The container's env; fieldRefs read `pod` (the Pod's metadata: its labels and annotations)."""
        ns = job["metadata"]["namespace"]
        pod_name = pod["name"]
        resolved: dict[str, str] = {}

        def from_source(kind: str, name: str, key: str | None, optional: bool) -> dict[str, str] | str | None:
            obj = self.server.get(SECRETS if kind == "secret" else CONFIGMAPS, ns, name)
            if obj is None:
                if optional:
                    return None
                raise _ConfigError(f'{kind} "{name}" not found')
            values: dict[str, str] = {}
            for k, v in (obj.get("data") or {}).items():
                values[k] = base64.b64decode(v).decode() if kind == "secret" else str(v)
            values.update({k: str(v) for k, v in (obj.get("stringData") or {}).items()})
            if key is None:
                return values
            if key not in values:
                if optional:
                    return None
                raise _ConfigError(f'couldn\'t find key {key} in {kind.capitalize()} {ns}/{name}')
            return values[key]

        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, ref in (("secret", src.get("secretRef")), ("configmap", src.get("configMapRef"))):
                if ref:
                    values = from_source(kind, ref["name"], None, bool(ref.get("optional")))
                    if isinstance(values, dict):
                        resolved.update({prefix + k: v for k, v in values.items()})
        pod_meta = {"name": pod_name, "namespace": ns, "uid": job["metadata"]["uid"]}
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                resolved[name] = expand(str(item.get("value", "")), resolved)
                continue
            source = item["valueFrom"]
            value: Any = None
            if ref := source.get("secretKeyRef"):
                value = from_source("secret", ref["name"], ref["key"], bool(ref.get("optional")))
            elif ref := source.get("configMapKeyRef"):
                value = from_source("configmap", ref["name"], ref["key"], bool(ref.get("optional")))
            elif ref := source.get("fieldRef"):
                path = ref.get("fieldPath", "")
                if path.startswith("metadata.") and path[9:] in pod_meta:
                    value = pod_meta[path[9:]]
                elif m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
                    value = (pod.get(m.group(1)) or {}).get(m.group(2), "")
                elif path == "spec.nodeName":
                    value = "kmock-node"
                elif path in ("status.podIP", "status.hostIP"):
                    value = "127.0.0.1"
                else:
                    value = ""
            if value is not None:
                resolved[name] = str(value)
        return resolved

    # ------------------------------------------------------------------ running
    def _note_resumed(self, job: dict[str, Any]) -> dict[str, Any]:
        """A resumed Job gets Suspended=False (JobResumed); returns the Job with that status."""
        if job["metadata"]["uid"] not in self._suspended:
            return job
        self._suspended.discard(job["metadata"]["uid"])
        conditions = self._conditions(job, {"type": "Suspended", "status": "False", "reason": "JobResumed",
                                            "message": "Job resumed"})
        self._patch_job_status(job, {"conditions": conditions})
        return {**job, "status": {**(job.get("status") or {}), "conditions": conditions}}

    def _start(self, job: dict[str, Any]) -> None:
        record = self._record_for(job)
        meta = job["metadata"]
        ns = meta["namespace"]
        job = self._note_resumed(job)
        try:
            container = self._container(job)
            plan = self._plan_pod(job, container)
        except ValueError as e:
            self._fail_job(job, record, "InvalidPodTemplate", str(e))
            return
        except (_ConfigError, _ImagePullError) as e:
            # As a real kubelet: the pod stays Pending, waiting (retried on the next scans).
            if not record.pods or record.pods[-1].pod_name != "<config-error>":
                record.pods.append(PodRun("<config-error>", [], self.workdir / "none", message=str(e)))
                stuck = self._stuck_pod(job, container, e)
                self.server.create(PODS, stuck, ns)
                self._stuck_pods[meta["uid"]] = stuck["metadata"]["name"]
                self._patch_job_status(job, {"startTime": (job.get("status") or {}).get("startTime") or _now(),
                                             "active": 1, "ready": 0})
            return
        if record.pods and record.pods[-1].pod_name == "<config-error>":
            record.pods.pop()
            with contextlib.suppress(Exception):
                self.server.delete(PODS, ns, self._stuck_pods.pop(meta["uid"]))
        running = self._run_pod(job, record, plan)
        if running is None:  # the command could not start
            self._after_failure(job, record, container, 128, record.pods[-1].pod_name)
            return
        status = job.get("status") or {}
        self._patch_job_status(job, {"startTime": status.get("startTime") or running.run.started_at,
                                     "active": 1, "ready": 1})
        self._running[meta["uid"]] = running
        log.info("kubelet: started %s/%s pod %s: %s", ns, meta["name"], running.run.pod_name, running.run.argv)

    def _stuck_pod(self, job: Mapping[str, Any], container: Mapping[str, Any], error: Exception,
                   index: int | None = None) -> dict[str, Any]:
        reason = "ImagePullBackOff" if isinstance(error, _ImagePullError) else "CreateContainerConfigError"
        return self._pod_manifest(job, container, "Pending", {"waiting": {"reason": reason, "message": str(error)}},
                                  index)

    def _plan_pod(self, job: Mapping[str, Any], container: Mapping[str, Any], index: int | None = None) -> _PodPlan:
        """The Pod to create and the process to run for it. _ImagePullError or _ConfigError while its
        image or env cannot be had (nothing is created then); ValueError for a pod no kubelet can run."""
        manifest = self._pod_manifest(job, container, "Pending", {"waiting": {"reason": "ContainerCreating"}}, index)
        (pod_container,) = manifest["spec"]["containers"]
        if "does-not-exist" in str(pod_container.get("image") or ""):
            raise _ImagePullError(f'Back-off pulling image "{pod_container.get("image")}"')
        env = self._resolve_env(job, pod_container, manifest["metadata"])
        argv = [expand(str(a), env) for a in (pod_container.get("command") or []) + (pod_container.get("args") or [])]
        if not argv:
            raise ValueError("the test kubelet needs an explicit command")
        argv = list(self.translate(argv, pod_container, job))
        return _PodPlan(manifest, pod_container, self._local_rendezvous(job, env), argv, index)

    def _local_rendezvous(self, job: Mapping[str, Any], env: dict[str, str]) -> dict[str, str]:
        """MASTER_ADDR -> 127.0.0.1 and MASTER_PORT -> the Job's own free local port (module docstring)."""
        out = dict(env)
        if MASTER_ADDR_ENV in out:
            out[MASTER_ADDR_ENV] = LOCALHOST
        if MASTER_PORT_ENV in out:
            uid = job["metadata"]["uid"]
            if uid not in self._ports:
                self._ports[uid] = _free_port()
            out[MASTER_PORT_ENV] = str(self._ports[uid])
        return out

    def _run_pod(self, job: Mapping[str, Any], record: JobRecord, plan: _PodPlan) -> _Running | None:
        """Create the Pod (Running) and start its process; None when the process could not start (the
        Pod is then Failed with StartError)."""
        ns = job["metadata"]["namespace"]
        manifest, container = plan.manifest, plan.container
        pod_name = manifest["metadata"]["name"]
        pod_dir = self.workdir / ns / pod_name
        pod_dir.mkdir(parents=True, exist_ok=True)
        term_path = pod_dir / "termination-log"
        term_path.write_text("")
        log_path = pod_dir / "log.txt"
        full_env = dict(os.environ) if self.inherit_env else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        full_env.update(self.extra_env)
        full_env.update(self._mount_downward_api(job, container, pod_dir, manifest["metadata"], plan.env))
        full_env["RLOOP_TERMINATION_LOG"] = str(term_path)
        full_env["HOSTNAME"] = manifest["spec"].get("hostname") or pod_name
        full_env[POD_MARKER_ENV] = f"{ns}/{pod_name}"

        now = _now()
        manifest["status"]["phase"] = "Running"
        manifest["status"]["containerStatuses"] = [container_status(container, pod_name,
                                                                    {"running": {"startedAt": now}}, ready=True)]
        self.server.create(PODS, manifest, ns)
        run = PodRun(pod_name, plan.argv, log_path, index=plan.index, marker=full_env[POD_MARKER_ENV],
                     started_at=now)
        record.pods.append(run)
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed when the pod finishes
        try:
            proc = subprocess.Popen(plan.argv, env=full_env, cwd=pod_dir, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log_file.write(f"failed to start {plan.argv!r}: {e}\n".encode())
            log_file.close()
            run.exit_code, run.message, run.finished = 128, f"StartError: {e}", time.monotonic()
            self._patch_pod_status(ns, pod_name, {"phase": "Failed", "containerStatuses": [container_status(
                container, pod_name, {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(e)}})]})
            return None
        run.pid = proc.pid
        deadline_s = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return _Running(dict(job), record, run, proc, term_path, log_file,
                        time.monotonic() + float(deadline_s) if deadline_s else None)

    def _kill(self, running: _Running) -> None:
        self._kill_all([running])

    def _kill_all(self, runnings: list[_Running]) -> None:
        """Stop pods as the kubelet does: SIGTERM, `grace` seconds (for all of them together), SIGKILL;
        then whatever else still runs in them (_reap)."""
        alive = [r for r in runnings if r.proc.poll() is None]
        for r in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGTERM)
        end = time.monotonic() + self.grace
        for r in alive:
            try:
                r.proc.wait(max(end - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait(5)
        for r in runnings:
            r.log_file.close()
            self._reap(r.run)
            r.run.exit_code = r.proc.returncode
            r.run.finished = time.monotonic()

    @staticmethod
    def _reap(run: PodRun) -> None:
        """SIGKILL the pod's processes still alive after its main process ended (a container's end with it)."""
        if not run.marker:
            return
        for pid in pod_processes(run.marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _read_message(self, running: _Running, container: Mapping[str, Any], exit_code: int) -> str:
        data = running.term_path.read_bytes()[:MESSAGE_LIMIT] if running.term_path.exists() else b""
        message = data.decode(errors="replace")
        if not message.strip() and exit_code != 0 and container.get("terminationMessagePolicy") == \
                "FallbackToLogsOnError":
            lines = running.run.log_path.read_bytes().splitlines()[-80:]
            message = b"\n".join(lines)[-2048:].decode(errors="replace")
        return message

    def _finish_pod(self, running: _Running, exit_code: int, reason: str | None = None) -> str:
        container = self._container(running.job)
        if not running.log_file.closed:
            running.log_file.close()
        self._reap(running.run)
        message = self._read_message(running, container, exit_code)
        run = running.run
        run.exit_code, run.message, run.finished = exit_code, message, time.monotonic()
        terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                      "startedAt": run.started_at, "finishedAt": _now()}
        if message:
            terminated["message"] = message
        self._patch_pod_status(running.job["metadata"]["namespace"], run.pod_name, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [container_status(container, run.pod_name, {"terminated": terminated})],
        })
        return message

    def _complete(self, running: _Running, code: int) -> None:
        # A process killed by a signal reports -N; containers report 128+N.
        exit_code = code if code >= 0 else 128 - code
        self._finish_pod(running, exit_code)
        job, record = running.job, running.record
        log.info("kubelet: %s/%s pod %s exited %s", job["metadata"]["namespace"], job["metadata"]["name"],
                 running.run.pod_name, exit_code)
        if exit_code == 0:
            self._succeed_job(job, record)
        else:
            self._after_failure(job, record, self._container(job), exit_code, running.run.pod_name)

    def _after_failure(self, job: dict[str, Any], record: JobRecord, container: Mapping[str, Any],
                       exit_code: int, pod_name: str) -> None:
        spec = job.get("spec") or {}
        action, message = self._policy_verdict(job, container, exit_code, pod_name)
        if action == "FailJob":
            self._fail_job(job, record, "PodFailurePolicy", message)
            return
        status = job.get("status") or {}
        failed = int(status.get("failed") or 0) + (0 if action == "Ignore" else 1)
        backoff_limit = int(spec.get("backoffLimit", 6))
        if failed > backoff_limit:
            self._patch_job_status(job, {"failed": failed})
            job = {**job, "status": {**status, "failed": failed}}
            self._fail_job(job, record, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            return
        self._patch_job_status(job, {"failed": failed, "active": None, "ready": 0})
        self._not_before[job["metadata"]["uid"]] = time.monotonic() + self.retry_delay

    @staticmethod
    def _policy_verdict(job: Mapping[str, Any], container: Mapping[str, Any], exit_code: int,
                        pod_name: str) -> tuple[str, str]:
        """(action, message) of the Job's podFailurePolicy for a container's exit code (onExitCodes rules in
        order, first match wins): FailJob with the Job controller's message, Ignore, or Count."""
        spec = job.get("spec") or {}
        ns = job["metadata"]["namespace"]
        cname = container.get("name", "main")
        for index, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
            on_codes = rule.get("onExitCodes")
            if not on_codes:
                continue  # onPodConditions (DisruptionTarget, ...) never happen here
            if on_codes.get("containerName") not in (None, cname):
                continue
            values = set(on_codes.get("values") or [])
            matched = exit_code in values if on_codes.get("operator", "In") == "In" else exit_code not in values
            if not matched:
                continue
            action = rule.get("action", "Count")
            if action in ("FailJob", "FailIndex"):
                return "FailJob", (f"Container {cname} for pod {ns}/{pod_name} failed with exit code "
                                   f"{exit_code} matching FailJob rule at index {index}")
            return action, ""
        return "Count", ""

    def _conditions(self, job: Mapping[str, Any], *new: dict[str, Any]) -> list[dict[str, Any]]:
        now = _now()
        keep = [c for c in ((job.get("status") or {}).get("conditions") or [])
                if c.get("type") not in {n["type"] for n in new}]
        return keep + [{"status": "True", "lastProbeTime": now, "lastTransitionTime": now, **n} for n in new]

    def _succeed_job(self, job: dict[str, Any], record: JobRecord, succeeded: int = 1,
                     completed_indexes: str | None = None) -> None:
        now = _now()
        status = job.get("status") or {}
        extra = {"completedIndexes": completed_indexes} if completed_indexes is not None else {}
        self._patch_job_status(job, {
            **extra,
            "startTime": status.get("startTime") or now,
            "completionTime": now,
            "active": None,
            "ready": 0,
            "succeeded": succeeded,
            "conditions": self._conditions(
                job,
                {"type": "SuccessCriteriaMet", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods"},
                {"type": "Complete", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods"},
            ),
        })
        self._mark_done(job, record, "Complete", "CompletionsReached")

    def _fail_job(self, job: dict[str, Any], record: JobRecord, reason: str, message: str) -> None:
        self._patch_job_status(job, {
            "active": None,
            "ready": 0,
            "failed": max(1, int((job.get("status") or {}).get("failed") or 0)),
            "conditions": self._conditions(job, {"type": "FailureTarget", "reason": reason, "message": message},
                                           {"type": "Failed", "reason": reason, "message": message}),
        })
        self._mark_done(job, record, "Failed", reason)

    def _mark_done(self, job: Mapping[str, Any], record: JobRecord, outcome: str, reason: str) -> None:
        uid = job["metadata"]["uid"]
        self._done.add(uid)
        self._not_before.pop(uid, None)
        record.outcome, record.reason, record.finished_at = outcome, reason, time.time()

    def _write_suspended(self, job: dict[str, Any], pod_name: str | None) -> None:
        ns = job["metadata"]["namespace"]
        if pod_name:
            self.server.delete(PODS, ns, pod_name)
        self._suspended.add(job["metadata"]["uid"])
        self._patch_job_status(job, {
            "active": None, "ready": 0, "startTime": None,
            "conditions": self._conditions(job, {"type": "Suspended", "reason": "JobSuspended",
                                                 "message": "Job suspended"}),
        })

    # ------------------------------------------------------------------ Indexed Jobs
    def _start_indexed(self, job: dict[str, Any]) -> None:
        """Start every pod of a new (or resumed) Indexed Job."""
        record = self._record_for(job)
        job = self._note_resumed(job)
        spec = job.get("spec") or {}
        try:
            container = self._container(job)
            completions = _completions(job)
            if int(spec.get("parallelism", completions)) != completions:
                raise ValueError("the test kubelet runs Indexed Jobs with parallelism == completions")
        except (ValueError, TypeError) as e:
            self._fail_job(job, record, "InvalidPodTemplate", str(e))
            return
        deadline_s = spec.get("activeDeadlineSeconds")
        run = _IndexedRun(job, record, container, completions,
                          time.monotonic() + float(deadline_s) if deadline_s else None,
                          waiting=dict.fromkeys(range(completions), 0.0))
        self._indexed[job["metadata"]["uid"]] = run
        self._start_waiting(run)
        if job["metadata"]["uid"] in self._indexed:
            self._report(run)

    def _scan_indexed(self, uid: str, job: dict[str, Any] | None) -> None:
        """One scan of an Indexed Job: deleted, suspended, past its deadline, pods that exited, pods to start."""
        run = self._indexed[uid]
        if job is None:  # deleted: the emulator's garbage collection deletes its pods
            del self._indexed[uid]
            self._kill_all(list(run.pods.values()))
            return
        run.job = copy.deepcopy(job)
        ns = job["metadata"]["namespace"]
        if (job.get("spec") or {}).get("suspend"):
            del self._indexed[uid]
            self._kill_all(list(run.pods.values()))
            for name in [r.run.pod_name for r in run.pods.values()] + list(run.stuck.values()):
                with contextlib.suppress(Exception):
                    self.server.delete(PODS, ns, name)
            self._write_suspended(run.job, None)
            return
        if run.deadline is not None and time.monotonic() > run.deadline:
            self._end_failed(run, "DeadlineExceeded", "Job was active longer than specified deadline",
                             exit_code=137, pod_reason="DeadlineExceeded")
            return
        for index, pod in sorted(run.pods.items()):
            code = pod.proc.poll()
            if code is None:
                continue
            del run.pods[index]
            exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128+N, as containers report
            pod.job = run.job
            self._finish_pod(pod, exit_code)
            log.info("kubelet: %s/%s pod %s (index %s) exited %s", ns, job["metadata"]["name"], pod.run.pod_name,
                     index, exit_code)
            if exit_code == 0:
                run.succeeded.add(index)
            elif self._index_failed(run, index, exit_code, pod.run.pod_name):
                return
        if len(run.succeeded) == run.completions:
            del self._indexed[uid]
            self._succeed_job(run.job, run.record, succeeded=run.completions,
                              completed_indexes=index_ranges(run.succeeded))
            return
        self._start_waiting(run)
        if uid in self._indexed:
            self._report(run)

    def _start_waiting(self, run: _IndexedRun) -> None:
        """Start the pods of the indexes that are due (a pod whose env or image cannot be had waits)."""
        ns = run.job["metadata"]["namespace"]
        for index, not_before in sorted(run.waiting.items()):
            if not_before > time.monotonic():
                continue
            try:
                plan = self._plan_pod(run.job, run.container, index)
            except ValueError as e:
                self._end_failed(run, "InvalidPodTemplate", str(e))
                return
            except (_ConfigError, _ImagePullError) as e:
                if index not in run.stuck:
                    stuck = self._stuck_pod(run.job, run.container, e, index)
                    self.server.create(PODS, stuck, ns)
                    run.stuck[index] = stuck["metadata"]["name"]
                continue
            if index in run.stuck:
                with contextlib.suppress(Exception):
                    self.server.delete(PODS, ns, run.stuck.pop(index))
            del run.waiting[index]
            running = self._run_pod(run.job, run.record, plan)
            if running is None:
                if self._index_failed(run, index, 128, run.record.pods[-1].pod_name):
                    return
                continue
            run.pods[index] = running
            log.info("kubelet: started %s/%s pod %s (index %s): %s", ns, run.job["metadata"]["name"],
                     running.run.pod_name, index, running.run.argv)

    def _index_failed(self, run: _IndexedRun, index: int, exit_code: int, pod_name: str) -> bool:
        """Judge a failed pod by the podFailurePolicy and backoffLimit; True when that failed the Job
        (its other pods are then terminated), else the index gets a new pod after `retry_delay`."""
        action, message = self._policy_verdict(run.job, run.container, exit_code, pod_name)
        if action != "Ignore":
            run.failed += 1
        if action == "FailJob":
            self._end_failed(run, "PodFailurePolicy", message)
            return True
        if run.failed > int((run.job.get("spec") or {}).get("backoffLimit", 6)):
            self._end_failed(run, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            return True
        run.waiting[index] = time.monotonic() + self.retry_delay
        return False

    def _end_failed(self, run: _IndexedRun, reason: str, message: str, *, exit_code: int | None = None,
                    pod_reason: str | None = None) -> None:
        """Fail the Job as the Job controller does: terminate its other pods (their status written, with
        `exit_code` and `pod_reason` when given), delete them, then the Failed condition."""
        uid, ns = run.job["metadata"]["uid"], run.job["metadata"]["namespace"]
        self._indexed.pop(uid, None)
        others = list(run.pods.values())
        run.pods.clear()
        self._kill_all(others)
        for pod in others:
            code = pod.proc.returncode if exit_code is None else exit_code
            pod.job = run.job
            self._finish_pod(pod, 137 if code is None else code if code >= 0 else 128 - code, pod_reason)
        for name in [pod.run.pod_name for pod in others] + list(run.stuck.values()):
            with contextlib.suppress(Exception):
                self.server.delete(PODS, ns, name)
        status = {**(run.job.get("status") or {}), "failed": max(run.failed, 1)}
        self._fail_job({**run.job, "status": status}, run.record, reason, message)

    def _report(self, run: _IndexedRun) -> None:
        """Write the Job's pod counts when they changed."""
        counts: dict[str, Any] = {
            "active": (len(run.pods) + len(run.stuck)) or None,
            "ready": len(run.pods),
            "succeeded": len(run.succeeded) or None,
            "failed": run.failed or None,
            "completedIndexes": index_ranges(run.succeeded) or None,
        }
        if counts == run.reported:
            return
        status = run.job.get("status") or {}
        self._patch_job_status(run.job, {"startTime": status.get("startTime") or _now(), **counts})
        run.job = {**run.job, "status": {**status, "startTime": status.get("startTime") or _now(), **counts}}
        run.reported = counts

    def _complete_instantly(self, job: dict[str, Any]) -> None:
        record = self._record_for(job)
        uid = job["metadata"]["uid"]
        self._suspended.discard(uid)
        try:
            container = self._container(job)
        except ValueError as e:
            self._fail_job(job, record, "InvalidPodTemplate", str(e))
            return
        message = self.instant_message(job) if callable(self.instant_message) else self.instant_message
        now = _now()
        manifest = self._pod_manifest(job, container, "Succeeded", {"terminated": {
            "exitCode": 0, "reason": "Completed", "message": message, "startedAt": now, "finishedAt": now}})
        self.server.create(PODS, manifest, job["metadata"]["namespace"])
        record.pods.append(PodRun(manifest["metadata"]["name"], [], self.workdir / "none", exit_code=0,
                                  message=message, finished=time.monotonic()))
        self._succeed_job(job, record)
