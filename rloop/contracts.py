"""Contracts between a stage process and the executors that run it (the local runner, the operator).

Light on purpose (no imports beyond the standard library): the operator reads these without
importing the stages, and the stages without importing the operator.
"""

from __future__ import annotations

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
