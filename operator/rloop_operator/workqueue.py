"""A keyed work queue (client-go's workqueue, in asyncio): events only name a run; workers reconcile it.

Why not reconcile inside each kopf event handler: one stage transition produces several events (the
Job's status, our own Job create, our own status write), and the run's and its Jobs' handlers would
race each other on the same run. Here:

- a key is queued at most once however many events name it (coalescing);
- a key is processed by at most one worker at a time; an event arriving meanwhile marks it dirty and it
  is processed once more after the current pass (nothing is lost, nothing runs concurrently);
- `add_after` schedules a key (retry backoff, error backoff, periodic resync); an earlier request wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)

Handler = Callable[[Hashable], Awaitable[float | None]]
"""Processes one key; returns seconds until the key should be processed again (None: only on events)."""


class WorkQueue:
    def __init__(
        self, handler: Handler, *, workers: int = 4, error_backoff: tuple[float, float] = (0.5, 60.0)
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._handler = handler
        self._workers = workers
        self._error_base, self._error_max = error_backoff
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[Hashable, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.last_progress = time.monotonic()
        """Monotonic time a worker last took a key, finished a pass or found the queue empty (liveness)."""

    # ------------------------------------------------------------------------------------ producers
    def add(self, key: Hashable) -> None:
        """Process `key` soon (once, however often it is added before a worker takes it)."""
        self._cancel_timer(key)
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        """Process `key` in `delay` seconds, unless something already asked for it sooner."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        current = self._timers.get(key)
        if current is not None and current[0] <= when:
            return
        self._cancel_timer(key)
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def forget(self, key: Hashable) -> None:
        """Drop timers and error history of a key whose object is gone."""
        self._cancel_timer(key)
        self._failures.pop(key, None)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _cancel_timer(self, key: Hashable) -> None:
        entry = self._timers.pop(key, None)
        if entry is not None:
            entry[1].cancel()

    # ------------------------------------------------------------------------------------ consumers
    def start(self) -> None:
        # Time before the start (a standby waiting for the leader Lease) is not time keys waited for
        # a worker: /healthz must not read it as stuck.
        self.last_progress = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._work(), name=f"rloop-worker-{i}") for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for key in list(self._timers):
            self._cancel_timer(key)

    @property
    def depth(self) -> int:
        """Keys waiting for a worker."""
        return self._queue.qsize()

    def alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def _work(self) -> None:
        while True:
            if self._queue.empty():
                self.last_progress = time.monotonic()
            key = await self._queue.get()
            # Taking a key is progress too: after an idle spell, a burst that fills every worker must not
            # read as "queued and stuck" (the idle time is not time a queued key waited).
            self.last_progress = time.monotonic()
            self._queued.discard(key)
            self._active.add(key)
            delay: float | None
            try:
                delay = await self._handler(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one run stop the workers: back off and try again
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                # Capped exponent: 2**1024 overflows a float (OverflowError here would kill the worker).
                delay = min(self._error_base * 2 ** min(n - 1, 64), self._error_max)
                log.exception("reconcile of %s failed (%d in a row); retrying in %.1fs", key, n, delay)
            finally:
                self._active.discard(key)
                self.last_progress = time.monotonic()
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif delay is not None:
                self.add_after(key, delay)
