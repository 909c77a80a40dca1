"""The keyed work queue: coalescing, one worker per key, re-runs after events during a pass, delays,
error backoff, liveness. Real asyncio; waits are polls with a timeout, and "nothing else ran" is shown
with a barrier key (queued behind anything that would have run), not with long sleeps."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from rloop_operator.handlers import Runtime
from rloop_operator.metrics import OperatorMetrics
from rloop_operator.settings import OperatorSettings
from rloop_operator.workqueue import WorkQueue


async def until(predicate, timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.002)


class Recorder:
    """A handler that records (key, loop time) per pass; `block` keys wait for `release`."""

    def __init__(self, result=None, block: tuple[str, ...] = ()):
        self.calls: list[tuple[str, float]] = []
        self.result = result
        self.block = set(block)
        self.release = asyncio.Event()
        self.active: set[str] = set()
        self.overlaps: list[str] = []

    async def __call__(self, key):
        if key in self.active:
            self.overlaps.append(key)
        self.active.add(key)
        self.calls.append((key, asyncio.get_running_loop().time()))
        try:
            if key in self.block:
                await self.release.wait()
            return self.result(key, self.keys.count(key)) if callable(self.result) else self.result
        finally:
            self.active.discard(key)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.calls]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        WorkQueue(Recorder(), workers=0)


@pytest.mark.asyncio
async def test_repeated_adds_coalesce_and_depth_and_alive_follow_the_workers() -> None:
    h = Recorder()
    q = WorkQueue(h, workers=2)
    assert not q.alive() and q.depth == 0
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert q.depth == 2  # five adds of "a" are one entry
    q.start()
    assert q.alive()
    await until(lambda: len(h.calls) == 2)
    assert sorted(h.keys) == ["a", "b"] and q.depth == 0
    q.add("a")  # processed and idle again: an add runs it once more
    await until(lambda: h.keys.count("a") == 2)
    await q.stop()
    assert not q.alive()


@pytest.mark.asyncio
async def test_a_key_runs_on_one_worker_at_a_time_while_other_keys_proceed() -> None:
    h = Recorder(block=("a",))
    q = WorkQueue(h, workers=4)
    q.start()
    q.add("a")
    await until(lambda: "a" in h.active)
    for _ in range(3):
        q.add("a")  # three free workers, yet none may take "a" now
    q.add("b")
    await until(lambda: "b" in h.keys)  # another key runs meanwhile
    assert h.keys == ["a", "b"] and q.depth == 0
    h.release.set()
    await until(lambda: h.keys.count("a") == 2)
    assert h.overlaps == []
    await q.stop()


@pytest.mark.asyncio
async def test_add_during_a_pass_runs_the_key_exactly_once_more_after_it() -> None:
    h = Recorder(block=("run",))
    q = WorkQueue(h, workers=1)
    q.start()
    q.add("run")
    await until(lambda: "run" in h.active)
    q.add("run")
    q.add("run")  # both marks land as one re-run
    q.add("x")
    assert q.depth == 1  # only "x" is queued; "run" is marked dirty, not queued twice
    h.block.clear()
    h.release.set()
    await until(lambda: len(h.calls) == 3)
    q.add("barrier")
    await until(lambda: "barrier" in h.keys)
    assert h.keys == ["run", "x", "run", "barrier"]
    await q.stop()


@pytest.mark.asyncio
async def test_a_returned_delay_requeues_the_key() -> None:
    h = Recorder(result=lambda key, n: 0.03 if (key, n) == ("k", 1) else None)
    q = WorkQueue(h, workers=1)
    q.start()
    q.add("k")
    await until(lambda: len(h.calls) == 2)
    assert h.calls[1][1] - h.calls[0][1] >= 0.029
    q.add_after("barrier", 0.05)  # None from the second pass: no third one before the barrier
    await until(lambda: "barrier" in h.keys)
    assert h.keys == ["k", "k", "barrier"]
    await q.stop()


@pytest.mark.asyncio
async def test_add_after_keeps_the_earliest_request_and_add_cancels_the_timer() -> None:
    h = Recorder()
    q = WorkQueue(h, workers=1)
    q.start()
    t0 = asyncio.get_running_loop().time()
    q.add_after("k", 10.0)
    q.add_after("k", 0.02)  # earlier wins
    q.add_after("k", 5.0)  # later is ignored
    assert q.depth == 0
    await until(lambda: len(h.calls) == 1)
    assert 0.019 <= h.calls[0][1] - t0 < 1.0

    q.add_after("k", 0.03)
    q.add("k")  # an event now cancels the timer: exactly one more pass
    q.add_after("barrier", 0.05)
    await until(lambda: "barrier" in h.keys)
    assert h.keys == ["k", "k", "barrier"]

    q.add_after("now", 0)  # no delay is an add
    q.add_after("now", -1.0)
    assert q.depth == 1
    await q.stop()


def failing(calls: set[int]):
    """A `Recorder` result: key "k" raises on the given pass numbers (1-based); the rest return None."""

    def result(key, n):
        if key == "k" and n in calls:
            raise RuntimeError(f"API down (pass {n})")
        return None

    return result


def gaps(h: Recorder) -> list[float]:
    times = [t for _, t in h.calls]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest.mark.asyncio
async def test_errors_back_off_exponentially_up_to_the_cap() -> None:
    h = Recorder(result=failing({1, 2, 3, 4}))
    q = WorkQueue(h, workers=1, error_backoff=(0.01, 0.02))
    q.start()
    q.add("k")
    await until(lambda: len(h.calls) == 5)
    g = gaps(h)
    assert g[0] >= 0.0095 and min(g[1:]) >= 0.0195  # 0.01, 0.02, then capped at 0.02
    assert sum(g) < 0.13  # uncapped would be 0.01 + 0.02 + 0.04 + 0.08 = 0.15
    assert q.alive()  # the worker survived the exceptions
    await q.stop()


@pytest.mark.asyncio
async def test_success_resets_the_error_history() -> None:
    h = Recorder(result=failing({1, 2, 3, 4, 6}))
    q = WorkQueue(h, workers=1, error_backoff=(0.005, 1.0))
    q.start()
    q.add("k")
    await until(lambda: len(h.calls) == 5)  # gaps 0.005, 0.01, 0.02, 0.04; pass 5 succeeds
    q.add("k")
    await until(lambda: len(h.calls) == 7)  # pass 6 fails: the first failure again, not the fifth
    assert 0.0045 <= gaps(h)[5] < 0.05  # the fifth would wait 0.08
    await q.stop()


@pytest.mark.asyncio
async def test_forget_drops_a_pending_retry_and_the_error_history() -> None:
    h = Recorder(result=failing({1, 2}))
    q = WorkQueue(h, workers=1, error_backoff=(0.03, 1.0))
    q.start()
    q.add("k")
    await until(lambda: len(h.calls) == 1)  # failed; a retry is due in 0.03 s
    q.forget("k")
    q.add_after("barrier", 0.04)  # behind where the retry would have run
    await until(lambda: "barrier" in h.keys)
    assert h.keys == ["k", "barrier"]
    q.add("k")
    await until(lambda: len(h.calls) == 3)  # fails again: retried after 0.03 s (first failure), not 0.06
    q.add_after("barrier", 0.045)
    await until(lambda: len(h.calls) == 5)
    assert h.keys == ["k", "barrier", "k", "k", "barrier"]
    await q.stop()


@pytest.mark.asyncio
async def test_a_key_failing_for_ever_never_kills_its_worker(caplog: pytest.LogCaptureFixture) -> None:
    # 1024 failures in a row (about 17 h at the default backoff) once made 2 ** 1024 overflow a float.
    caplog.set_level(logging.CRITICAL, logger="rloop_operator.workqueue")
    total = 1100
    h = Recorder(result=failing(set(range(1, total))))
    q = WorkQueue(h, workers=1, error_backoff=(0.0, 0.0))
    q.start()
    q.add("k")
    await until(lambda: len(h.calls) == total or not q.alive(), timeout=5.0)
    assert q.alive() and len(h.calls) == total
    await q.stop()


@pytest.mark.asyncio
async def test_stop_cancels_passes_in_flight_and_pending_timers() -> None:
    h = Recorder(block=("slow",))
    q = WorkQueue(h, workers=2)
    q.start()
    q.add("slow")
    await until(lambda: "slow" in h.active)
    q.add_after("later", 0.02)
    await asyncio.wait_for(q.stop(), timeout=1.0)
    assert not q.alive() and h.active == set()  # the blocked pass was cancelled
    await asyncio.sleep(0.04)
    assert q.depth == 0  # the timer never fired into the queue


@pytest.mark.asyncio
async def test_health_after_an_idle_spell_and_when_stuck() -> None:
    h = Recorder(block=("a",))
    q = WorkQueue(h, workers=1)
    runtime = Runtime(OperatorSettings(stuck_seconds=60), None, q, OperatorMetrics(), None)  # type: ignore[arg-type]
    before = q.last_progress
    runtime.start_acting()
    await until(lambda: q.last_progress != before)  # the worker found the queue empty and waits
    q.last_progress -= 3600  # an hour without events
    q.add("a")
    await until(lambda: "a" in h.active)
    q.add("b")  # queued behind a pass that just started: not stuck
    assert q.depth == 1 and runtime.healthy() == (True, "ok")
    q.last_progress = time.monotonic() - 120  # no worker took or finished anything for two minutes
    ok, why = runtime.healthy()
    assert not ok and why.startswith("1 run(s) queued and no pass finished for 12")
    h.release.set()
    await until(lambda: h.keys == ["a", "b"])
    assert runtime.healthy() == (True, "ok")
    await q.stop()
    assert runtime.healthy()[0] is False


@pytest.mark.asyncio
async def test_a_standby_is_healthy_with_keys_queued_and_acts_only_once_it_leads() -> None:
    """A standby queues keys for as long as another replica leads: that is not "stuck". When it starts
    leading, the wait before does not count as time keys waited for a worker."""
    h = Recorder()
    q = WorkQueue(h, workers=1)
    metrics = OperatorMetrics()
    runtime = Runtime(OperatorSettings(stuck_seconds=60), None, q, metrics, None)  # type: ignore[arg-type]
    runtime.election = asyncio.create_task(asyncio.sleep(3600))
    q.add(("ns", "a"))
    q.add(("ns", "b"))
    q.last_progress -= 3600
    assert runtime.healthy() == (True, "ok") and h.keys == []
    runtime.start_acting()
    assert metrics.leader._value.get() == 1
    await until(lambda: sorted(h.keys) == [("ns", "a"), ("ns", "b")])
    assert runtime.healthy() == (True, "ok")
    await q.stop()
    runtime.election.cancel()


@pytest.mark.asyncio
async def test_a_standby_whose_election_loop_died_is_unhealthy() -> None:
    runtime = Runtime(OperatorSettings(), None, WorkQueue(Recorder()), OperatorMetrics(), None)  # type: ignore[arg-type]

    async def crashed() -> None:
        raise RuntimeError("boom")

    runtime.election = asyncio.create_task(crashed())
    await asyncio.sleep(0)
    assert runtime.healthy() == (False, "leader election stopped")
    with pytest.raises(RuntimeError):
        await runtime.election
