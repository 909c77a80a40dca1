"""Stage entry point: `rloop stage <kind> --run URI [--iteration K] [--set NAME]`.

Every stage reads committed inputs, writes its directory, and commits a manifest last. The exit code
is the contract with the executors (see rloop.stages.common: 0 ok, 2 invalid input, 75 corrupt
input invalidated, anything else retryable).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback

from rloop.plan import Stage
from rloop.stages.common import (
    EXIT_CORRUPT_INPUT,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    InputError,
    StageContext,
    write_termination_message,
)
from rloop.store import CorruptArtifact, NotCommitted, StoreError


def _quiet_libraries() -> None:
    """Stage logs show our progress bars and summaries, not every library's loading bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # stages never download: policies come from the store


def run_stage(run_uri: str, stage: Stage) -> int:
    """Run one stage in this process; returns the exit code (never raises for expected failures)."""
    t0 = time.time()
    _quiet_libraries()
    try:
        ctx = StageContext.open(run_uri, stage)
        module = importlib.import_module(f"rloop.stages.{stage.kind}")
        summary = module.run(ctx)
    except InputError as err:
        print(f"rloop stage {stage.id}: invalid input: {err}", file=sys.stderr)
        write_termination_message({"stage": stage.id, "error": "InvalidInput", "message": str(err)[:1500]})
        return EXIT_INVALID_INPUT
    except CorruptArtifact as err:
        what = "input not committed yet" if isinstance(err, NotCommitted) else "corrupt input, invalidated for re-run"
        print(f"rloop stage {stage.id}: {what}: {err}", file=sys.stderr)
        write_termination_message({"stage": stage.id, "error": "CorruptInput", "message": str(err)[:1500]})
        return EXIT_CORRUPT_INPUT
    except StoreError as err:
        print(f"rloop stage {stage.id}: store error: {err}", file=sys.stderr)
        write_termination_message({"stage": stage.id, "error": "StoreError", "message": str(err)[:1500]})
        return 1
    except KeyboardInterrupt:
        print(f"rloop stage {stage.id}: interrupted; nothing was committed", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    summary = {"stage": stage.id, "seconds": round(time.time() - t0, 3), **summary}
    write_termination_message(summary)
    print(f"rloop stage {stage.id}: committed in {summary['seconds']:.1f}s {json.dumps(_brief(summary))}",
          file=sys.stderr)
    return EXIT_OK


def _brief(summary: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()
            if isinstance(v, int | float | str) and k not in ("stage", "seconds")}
