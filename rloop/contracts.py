"""Contracts between a stage process and the executors that run it (the local runner, the operator).

Light on purpose (no imports beyond the standard library): the operator reads these without
importing the stages, and the stages without importing the operator.
"""

from __future__ import annotations

import hashlib

# Stage exit codes.
EXIT_OK = 0
EXIT_INVALID_INPUT = 2
"""Bad spec, data or arguments: retrying cannot help, fail the run (podFailurePolicy: FailJob)."""
EXIT_STORE_UNAVAILABLE = 69
"""The object store stayed unreachable through the stage's own retries (EX_UNAVAILABLE). Nothing was
invalidated; executors retry on a budget of their own, not `retry.limit`."""
EXIT_CORRUPT_INPUT = 75
"""An input artifact failed its manifest (size or sha256) and was invalidated: re-plan, re-run its producer."""
# Anything else (1 from an uncaught exception, 137 from an OOM kill, ...) is retryable within retry.limit.

# The `error` field of a failed stage's termination message (a JSON object, at most 4 KiB).
ERROR_INVALID_INPUT = "InvalidInput"
ERROR_CORRUPT_INPUT = "CorruptInput"
ERROR_STORE_UNAVAILABLE = "StoreUnavailable"
ERROR_STORE = "StoreError"

STORE_RETRY_ENV = "RLOOP_STORE_RETRY_SECONDS"
"""How long a stage retries transient store errors before it exits EXIT_STORE_UNAVAILABLE."""
STORE_RETRY_DEFAULT_SECONDS = 120.0

# The run's manifest, which a stage snapshots as `<run>/spec.json` (the operator holds no store
# credentials, so stages write it). The operator passes a file, not the manifest itself, in the env.
RUN_MANIFEST_FILE_ENV = "RLOOP_RUN_MANIFEST_FILE"
"""Path of a file holding the resolved RLoopRun as JSON (on Kubernetes: a downward-API volume)."""
RUN_MANIFEST_SHA256_ENV = "RLOOP_RUN_MANIFEST_SHA256"
"""sha256 (hex) of that file's bytes, as the operator made it; a file that differs is refused."""
RUN_MANIFEST_LEGACY_ENV = "RLOOP_RUN_MANIFEST"
"""The manifest itself, as the 0.1 operator passed it; stages still read it for one release (its Jobs)."""


def manifest_sha256(text: str) -> str:
    """Digest of a run manifest as the operator writes it and the stage checks it."""
    return hashlib.sha256(text.encode()).hexdigest()

# A stage of several processes (resources.<stage>.gpus > 1 or nodes > 1). The operator sets these on the
# stage container; `rloop stage` reads them and starts one worker process per GPU under torch's elastic
# agent (torchrun's launcher), node NODE_RANK of NNODES, rendezvous at MASTER_ADDR:MASTER_PORT. The names
# are torchrun's own, so `torchrun` by hand reads the same values (Kubeflow Trainer's PET_* convention).
NNODES_ENV = "NNODES"
NODE_RANK_ENV = "NODE_RANK"
NPROC_PER_NODE_ENV = "NPROC_PER_NODE"
MASTER_ADDR_ENV = "MASTER_ADDR"
MASTER_PORT_ENV = "MASTER_PORT"
DEFAULT_MASTER_PORT = 29500
JOB_COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
"""Set by Kubernetes in each pod of an Indexed Job; NODE_RANK falls back to it when unset."""
DISTRIBUTED_STAGE_KINDS = ("rl", "rft")
"""Stages that run as several processes; the others use one process (vLLM spans a pod's GPUs itself)."""
