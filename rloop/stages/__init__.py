"""Stage entry point: `rloop stage <kind> --run URI [--iteration K] [--set NAME]`.

Every stage reads committed inputs, writes its directory, and commits a manifest last. The exit code
is the contract with the executors (rloop.contracts: 0 ok, 2 invalid input, 69 store unavailable,
75 corrupt input invalidated, anything else retryable).

A stage whose own commit manifest already validates (sizes and sha256) exits 0 at once with the
committed summary: an executor that lost track of it (a deleted Job, a restarted runner) never makes
it wipe and redo work that later stages may already have consumed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback

from rloop import attempts
from rloop.contracts import (
    ERROR_CORRUPT_INPUT,
    ERROR_INVALID_INPUT,
    ERROR_STORE,
    ERROR_STORE_UNAVAILABLE,
    EXIT_CORRUPT_INPUT,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_STORE_UNAVAILABLE,
)
from rloop.plan import Stage
from rloop.redact import redact_uris
from rloop.stages.common import InputError, StageContext, write_termination_message
from rloop.store import CorruptArtifact, Manifest, NotCommitted, StoreError, StoreUnavailable
from rloop.tracking import StageTracker


def _quiet_libraries() -> None:
    """Stage logs show our progress bars and summaries, not every library's loading bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # stages never download: policies come from the store


OUTCOMES = {
    EXIT_OK: "committed",
    EXIT_INVALID_INPUT: "invalid input",
    EXIT_STORE_UNAVAILABLE: "store unavailable",
    EXIT_CORRUPT_INPUT: "corrupt input",
    130: "interrupted",
}
"""What an attempt record (rloop.attempts) says of an exit code; any other code is "failed"."""


def run_stage(run_uri: str, stage: Stage) -> int:
    """Run one stage in this process; returns the exit code (never raises for expected failures)."""
    code = _run_stage(run_uri, stage)
    attempts.finish(code, OUTCOMES.get(code, "failed"))
    return code


def _run_stage(run_uri: str, stage: Stage) -> int:
    t0 = time.time()
    _quiet_libraries()
    try:
        ctx = StageContext.open(run_uri, stage)
        done = _already_committed(ctx)
        if done is not None:  # the manifest just validated is the one reported: no second read
            summary = {**done.summary, "already_committed": True, "manifest_sha256": done.digest}
            write_termination_message({"stage": stage.id, **summary})
            print(f"rloop stage {stage.id}: already committed, nothing to do", file=sys.stderr)
            return EXIT_OK
        if int(os.environ.get("RANK", "0")) == 0:  # one record per attempt, however many processes
            attempts.begin(ctx.store, stage.id, started=t0)
            ctx.tracker = StageTracker.open(ctx.run, stage, ctx.store.uri)  # rank 0 alone reports to trackers
        module = importlib.import_module(f"rloop.stages.{stage.kind}")
        try:
            summary = module.run(ctx)
        finally:
            ctx.tracker.close()  # tracker runs of an attempt that did not commit end as failed
    except InputError as err:
        _report_failure(stage, "invalid input", err, ERROR_INVALID_INPUT)
        return EXIT_INVALID_INPUT
    except StoreUnavailable as err:
        _report_failure(stage, "store unavailable, nothing was invalidated", err, ERROR_STORE_UNAVAILABLE)
        return EXIT_STORE_UNAVAILABLE
    except CorruptArtifact as err:
        what = "input not committed yet" if isinstance(err, NotCommitted) else "corrupt input, invalidated for re-run"
        _report_failure(stage, what, err, ERROR_CORRUPT_INPUT)
        return EXIT_CORRUPT_INPUT
    except StoreError as err:
        _report_failure(stage, "store error", err, ERROR_STORE)
        return 1
    except KeyboardInterrupt:
        print(f"rloop stage {stage.id}: interrupted; nothing was committed", file=sys.stderr)
        return 130
    except Exception:
        # The log tail becomes the termination message of a crashed pod (FallbackToLogsOnError).
        print(redact_uris(traceback.format_exc()), end="", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:  # a worker of a multi-process stage: rank 0 reports
        return EXIT_OK
    ctx.tracker.after_commit(ctx.store)
    summary = {"stage": stage.id, "seconds": round(time.time() - t0, 3), **summary,
               "manifest_sha256": _manifest_digest(ctx)}
    write_termination_message(summary)
    print(f"rloop stage {stage.id}: committed in {summary['seconds']:.1f}s {json.dumps(_brief(summary))}",
          file=sys.stderr)
    return EXIT_OK


def _report_failure(stage: Stage, what: str, err: BaseException, error: str) -> None:
    """Say why the stage failed in its log and its termination message, without URI secrets (a data path
    may be a presigned URL; botocore errors quote endpoints)."""
    text = redact_uris(str(err))
    print(f"rloop stage {stage.id}: {what}: {text}", file=sys.stderr)
    write_termination_message({"stage": stage.id, "error": error, "message": text[:1500]})


def _already_committed(ctx: StageContext) -> Manifest | None:
    """The stage's manifest when its own output validates in full, else None (then a new attempt starts
    from scratch, as before)."""
    try:
        return ctx.store.validate(ctx.stage.id, deep=True)
    except CorruptArtifact:
        return None


def _manifest_digest(ctx: StageContext) -> str | None:
    """sha256 of the commit manifest the stage just wrote (the operator records it in the run's status)."""
    try:
        return ctx.store.read_manifest(ctx.stage.id).digest
    except StoreError:
        return None


def _brief(summary: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()
            if isinstance(v, int | float | str) and k not in ("stage", "seconds", "manifest_sha256")}
