"""The local executor: `rloop run FILE` runs the plan's stages as subprocesses on this machine.

It holds no loop state of its own: every pass asks `plan(spec, committed)` what to run, so killing it
at any moment and running it again resumes at the first uncommitted stage.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rloop.contracts import EXIT_CORRUPT_INPUT, EXIT_INVALID_INPUT, EXIT_STORE_UNAVAILABLE
from rloop.plan import Stage, all_stages, plan
from rloop.spec import RLoopRun, SpecError, immutable_changes, parse_run
from rloop.store import RunStore

DEFAULT_STORE = "./rloop-runs"
STORE_UNAVAILABLE_RETRIES = 10
"""Re-runs of a stage that exited EXIT_STORE_UNAVAILABLE (each after its own in-stage retry window)."""
STORE_UNAVAILABLE_WAIT_S = 5.0


class RunFailed(RuntimeError):
    """A stage failed for good (invalid input, or out of retries)."""


@dataclass
class RunResult:
    store: RunStore
    ran: list[str]
    seconds: float


def _die_with_parent() -> None:
    """Child-side: get SIGTERM if the runner dies (even by SIGKILL), so no orphan keeps writing."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stage_command(run_uri: str, stage: Stage) -> list[str]:
    """The same command the operator puts in a Job's container."""
    return [sys.executable, "-m", "rloop", "stage", stage.kind, "--run", run_uri, *stage.cli_args()]


@contextmanager
def _run_lock(store: RunStore):
    """One local runner per run directory (two would race on the same stage attempt)."""
    if not store.is_local:
        yield
        return
    Path(store.base).mkdir(parents=True, exist_ok=True)
    with open(Path(store.base) / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFailed(f"another `rloop run` is working on {store.uri}") from None
        yield


def prepare(run: RLoopRun, store_uri: str) -> RunStore:
    """Open the run's store and snapshot the spec; a resumed run may only change mutable fields."""
    store = RunStore(store_uri, run.metadata.namespace, run.metadata.name)
    if store.exists("spec.json"):
        old = parse_run(store.read_spec())
        changed = immutable_changes(old.spec, run.spec)
        if changed:
            raise SpecError(
                f"{', '.join(changed)} changed since run {run.metadata.name!r} started in {store.uri}; "
                "revert it, or use a new metadata.name (or delete that directory) to start over"
            )
    store.write_spec(run.to_wire())
    return store


def run_local(
    run: RLoopRun,
    store_uri: str = DEFAULT_STORE,
    *,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> RunResult:
    t0 = time.time()
    store = prepare(run, store_uri)
    spec = run.spec
    ids = [s.id for s in all_stages(spec)]
    attempts: dict[str, int] = {}
    unavailable: dict[str, int] = {}
    ran: list[str] = []
    with _run_lock(store):
        while True:
            p = plan(spec, store.committed(ids))
            if p.finished:
                break
            stage = p.ready[0]
            n = attempts.get(stage.id, 0)
            log(f"[{p.done + 1:>2}/{p.total}] {stage.id}" + (f" (attempt {n + 1})" if n else ""))
            rc = _run_child(stage_command(store.uri, stage))
            if rc == 0:
                ran.append(stage.id)
                continue
            if rc == EXIT_INVALID_INPUT:
                raise RunFailed(f"stage {stage.id} rejected its input (exit {rc}); fix the spec/data and run again")
            if rc in (130, -signal.SIGINT):
                raise KeyboardInterrupt
            if rc == EXIT_STORE_UNAVAILABLE:  # nothing was invalidated; retried on a budget of its own
                unavailable[stage.id] = unavailable.get(stage.id, 0) + 1
                if unavailable[stage.id] > STORE_UNAVAILABLE_RETRIES:
                    raise RunFailed(f"stage {stage.id}: the store stayed unavailable through "
                                    f"{unavailable[stage.id]} attempts; check it and run again to resume")
                log(f"      {stage.id}: store unavailable (exit {rc}); retrying in {STORE_UNAVAILABLE_WAIT_S:.0f}s")
                time.sleep(STORE_UNAVAILABLE_WAIT_S)
                continue
            attempts[stage.id] = n + 1
            if rc != EXIT_CORRUPT_INPUT and attempts[stage.id] > spec.retry.limit:
                raise RunFailed(f"stage {stage.id} failed {attempts[stage.id]} times (last exit code {rc})")
            log(f"      {stage.id} exited {rc}; retrying")
    return RunResult(store, ran, time.time() - t0)


def _run_child(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Pass the interrupt on (a terminal Ctrl-C already reached it; `kill -INT` did not), then give the
        # child a moment to exit without committing.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def resolve_run(arg: str, store_uri: str | None = None) -> RunStore:
    """A run from a run URI/directory (`.../<namespace>/<name>`), a manifest file, or a bare name."""
    if arg.endswith((".yaml", ".yml")) and os.path.exists(arg):
        from rloop.manifests import load_run

        run = load_run(arg)
        return RunStore(store_uri or run.spec.storage.uri or DEFAULT_STORE, run.metadata.namespace, run.metadata.name)
    if "/" not in arg:
        return RunStore(store_uri or DEFAULT_STORE, "default", arg)
    return RunStore.from_uri(arg)
