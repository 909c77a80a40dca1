"""The keyed work queue: coalescing, one worker per key, re-runs after events during a pass, delays,
error backoff. Driven with real asyncio and short, bounded waits."""

from __future__ import annotations

import asyncio

import pytest

from rloop_operator.workqueue import WorkQueue


async def until(predicate, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        WorkQueue(lambda k: None, workers=0)  # type: ignore[arg-type,return-value]


@pytest.mark.asyncio
async def test_repeated_adds_coalesce_and_keys_run_alone() -> None:
    calls: list[str] = []
    active: set[str] = set()
    overlap: list[str] = []

    async def handle(key):
        if key in active:
            overlap.append(key)
        active.add(key)
        calls.append(key)
        await asyncio.sleep(0.02)
        active.discard(key)
        return None

    q = WorkQueue(handle, workers=4)
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert q.depth == 2  # five adds of "a" are one entry
    q.start()
    await until(lambda: len(calls) == 2)
    q.add("a")  # while idle: runs again
    await until(lambda: calls.count("a") == 2)
    assert not overlap and q.alive()
    await q.stop()
    assert not q.alive()


@pytest.mark.asyncio
async def test_add_during_a_pass_runs_the_key_once_more_after_it() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    calls: list[str] = []

    async def handle(key):
        calls.append(key)
        if len(calls) == 1:
            started.set()
            await release.wait()
        return None

    q = WorkQueue(handle, workers=2)
    q.start()
    q.add("run")
    await started.wait()
    q.add("run")
    q.add("run")  # both land as one re-run, not in parallel
    await asyncio.sleep(0.03)
    assert calls == ["run"]
    release.set()
    await until(lambda: len(calls) == 2)
    await asyncio.sleep(0.03)
    assert calls == ["run", "run"]
    await q.stop()


@pytest.mark.asyncio
async def test_returned_delay_requeues_and_add_after_keeps_the_earliest() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    async def handle(key):
        calls.append(loop.time())
        return 0.05 if len(calls) == 1 else None

    q = WorkQueue(handle, workers=1)
    q.start()
    q.add("k")
    await until(lambda: len(calls) == 2)
    assert calls[1] - calls[0] >= 0.045
    q.add_after("k", 10.0)
    q.add_after("k", 0.02)  # earlier wins
    q.add_after("k", 5.0)  # later is ignored
    await until(lambda: len(calls) == 3, timeout=1.0)
    q.add_after("k", 0.05)
    q.add("k")  # an event now cancels the timer: exactly one more pass
    await until(lambda: len(calls) == 4)
    await asyncio.sleep(0.1)
    assert len(calls) == 4
    await q.stop()


@pytest.mark.asyncio
async def test_errors_back_off_exponentially_and_forget_drops_the_history() -> None:
    times: list[float] = []
    loop = asyncio.get_running_loop()

    async def handle(key):
        times.append(loop.time())
        if len(times) <= 3:
            raise RuntimeError("API down")
        return None

    q = WorkQueue(handle, workers=1, error_backoff=(0.02, 1.0))
    q.start()
    q.add("k")
    await until(lambda: len(times) == 4)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.018 and gaps[1] >= 0.038 and gaps[2] >= 0.078  # 0.02, 0.04, 0.08
    assert q.alive()  # the worker survived the exceptions
    q.add_after("k", 0.05)
    q.forget("k")
    await asyncio.sleep(0.1)
    assert len(times) == 4
    await q.stop()
