"""Stage attempts, recorded in the run's store by the stage process itself, so `rloop status` and
`rloop runs` show attempts, durations and live progress for local runs and Kubernetes runs alike.

One small JSON object per attempt, beside the stages and outside every stage directory (a new attempt
wipes its stage directory; its history must survive that):

    <run>/_attempts/<stage id>/<start, ms>-<host>-<pid>.json
        {"stage", "started", "host", "pid", "ended", "exit_code", "outcome", "progress"}

It is a record for people, not for the planner: the commit manifests alone say what is done. So every
write here is a single best-effort try: a store outage must not slow a stage down or fail it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rloop.store import RunStore

ATTEMPTS_DIR = "_attempts"
PROGRESS_WRITE_SECONDS = 30.0
"""At most one progress write per attempt in this many seconds."""


@dataclass
class Attempt:
    stage: str
    started: float
    host: str = ""
    pid: int = 0
    ended: float | None = None
    exit_code: int | None = None
    outcome: str | None = None
    """"committed", or why it failed ("invalid input", "store unavailable", "crashed", ...)."""
    progress: str | None = None
    """The latest one-line progress of a running attempt (`rloop.progress`)."""

    @property
    def seconds(self) -> float | None:
        """Wall time of a finished attempt, or the time so far of an unfinished one."""
        return (self.ended if self.ended is not None else time.time()) - self.started

    @property
    def finished(self) -> bool:
        return self.ended is not None

    def process_gone(self) -> bool:
        """An unfinished attempt whose process (on this host) no longer exists: killed without a word."""
        if self.finished or self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _is_zombie(self.pid)


def _is_zombie(pid: int) -> bool:
    """A killed child whose parent has not reaped it yet still answers kill(pid, 0): Linux says Z."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


class AttemptRecord:
    """The record of this process's attempt at one stage."""

    def __init__(self, store: RunStore, stage_id: str, started: float | None = None):
        self.store = store
        self.attempt = Attempt(stage_id, started or time.time(), socket.gethostname(), os.getpid())
        self.rel = f"{ATTEMPTS_DIR}/{stage_id}/{int(self.attempt.started * 1000):013d}-{self.attempt.host}-{self.attempt.pid}.json"
        self._last_progress_write = -PROGRESS_WRITE_SECONDS
        self._writer: threading.Thread | None = None
        self._warned = False

    def start(self) -> None:
        self._write()

    def progress(self, line: str) -> None:
        """Keep the latest progress line; write it at most every PROGRESS_WRITE_SECONDS, off the stage's
        thread (a store that is down may take a client's retries to answer; the training loop never waits)."""
        self.attempt.progress = line
        now = time.monotonic()
        busy = self._writer is not None and self._writer.is_alive()
        if now - self._last_progress_write >= PROGRESS_WRITE_SECONDS and not busy:
            self._last_progress_write = now
            self._writer = threading.Thread(target=self._write, name="rloop-attempt-progress", daemon=True)
            self._writer.start()

    def end(self, exit_code: int, outcome: str) -> None:
        if self._writer is not None:  # a progress write still in flight must not land after the end
            self._writer.join(timeout=10)
        self.attempt.ended, self.attempt.exit_code, self.attempt.outcome = time.time(), exit_code, outcome
        self._write()

    def _write(self) -> None:
        data = json.dumps(asdict(self.attempt), sort_keys=True).encode()  # a snapshot: the dict is copied
        try:  # one try, no retry window: see the module docstring
            self.store._write(self.store.path(self.rel), data)
        except Exception as err:  # any store client error; the stage's own work decides its exit code
            if not self._warned:
                self._warned = True
                print(f"rloop: could not record the stage attempt in the store ({str(err)[:160]})", file=sys.stderr)


_current: AttemptRecord | None = None


def begin(store: RunStore, stage_id: str, started: float | None = None) -> AttemptRecord:
    """Record the start of this process's attempt; `current()` returns it for progress reporting."""
    global _current
    _current = AttemptRecord(store, stage_id, started)
    _current.start()
    return _current


def current() -> AttemptRecord | None:
    return _current


def finish(exit_code: int, outcome: str) -> None:
    global _current
    if _current is not None:
        _current.end(exit_code, outcome)
        _current = None


def read_attempts(store: RunStore) -> dict[str, list[Attempt]]:
    """Every recorded attempt of the run, by stage id, oldest first. Unreadable records are skipped."""
    try:
        paths = store.call(store.fs.glob, store.path(f"{ATTEMPTS_DIR}/**/*.json"))
    except FileNotFoundError:
        return {}
    out: dict[str, list[Attempt]] = {}
    for path in sorted(paths):
        try:
            raw = json.loads(store._read(path))
            attempt = Attempt(**{k: raw[k] for k in Attempt.__dataclass_fields__ if k in raw})
        except (OSError, ValueError, TypeError, KeyError):
            continue
        out.setdefault(attempt.stage, []).append(attempt)
    for attempts in out.values():
        attempts.sort(key=lambda a: a.started)
    return out
