"""Verifiers: score a model response against a ground truth, 1.0 / 0.0, or None if unscorable.

A verifier is `(response, ground_truth, **row) -> float | None`; `row` carries per-example fields
(e.g. the subset-sum digits and target). None means "cannot judge" and is left out of baselines.

"math" runs math-verify, whose timeouts rely on SIGALRM and therefore on the main thread of a
process. It is scored in a reused pool of spawned worker processes: inside a worker math-verify's
own timeouts interrupt slow parsing/comparison cheaply, and the parent additionally kills the pool
if an item overruns its deadline (e.g. stuck in C code that signals cannot interrupt).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import math
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rloop.data.synthetic import score_subset_sum

logger = logging.getLogger(__name__)

Verifier = Callable[..., float | None]

# Slack on top of timeout_s before the parent gives up on an item: covers pickling and queue hops.
_KILL_GRACE_S = 0.5
# Spawning workers imports sympy; allow for a slow, loaded machine before declaring failure.
_STARTUP_TIMEOUT_S = 120.0
# A worker crash takes every in-flight job with it; a job caught in this many crashes scores None.
_MAX_CRASHES = 2
_TRAILING_PERIOD = re.compile(r"\.\s*$")
_WHITESPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------- built-in verifiers


def score_exact(response: str, ground_truth: str, **_row: Any) -> float:
    """1.0 if the stripped strings match, also after dropping a trailing period and collapsing spaces."""
    if response.strip() == ground_truth.strip():
        return 1.0
    return 1.0 if _normalize_text(response) == _normalize_text(ground_truth) else 0.0


def score_math(response: str, ground_truth: str, *, timeout_s: float = 5.0, **_row: Any) -> float | None:
    """Math-verify equivalence; must run on a process's main thread (math-verify uses SIGALRM).

    Both sides go through `parse` (gold first, as math-verify expects). A gold that parses to
    nothing, or a parse/compare that times out without any match, is unscorable (None).
    Use score_batch("math", ...) from other threads or for batches.
    """
    from math_verify import parse
    from math_verify.errors import TimeoutException

    if threading.current_thread() is not threading.main_thread():
        # math-verify would raise a ValueError that looks like a parse failure; say what is wrong.
        raise RuntimeError(
            "score_math needs the main thread (SIGALRM timeouts); use score_batch('math', ...)"
        )

    op_timeout = _op_timeout(timeout_s)
    try:
        gold = parse(ground_truth, parsing_timeout=op_timeout, raise_on_error=True)
    except (Exception, TimeoutException):
        return None
    if not gold:
        return None
    try:
        pred = parse(response, parsing_timeout=op_timeout, raise_on_error=True)
    except TimeoutException:
        return None
    except Exception:
        return 0.0  # an unparsable response is simply wrong
    return _compare_parsed(gold, pred, op_timeout)


def _subset_sum_verifier(response: str, ground_truth: str, **row: Any) -> float | None:
    """Adapt score_subset_sum to a row: digits/target at top level or in row["extra"], or a prompt."""
    extra = row.get("extra") if isinstance(row.get("extra"), dict) else {}
    return score_subset_sum(
        response,
        ground_truth,
        digits=row.get("digits", extra.get("digits")),
        target=row.get("target", extra.get("target")),
        prompt=row.get("prompt"),
    )


VERIFIERS: dict[str, Verifier] = {
    "exact": score_exact,
    "math": score_math,
    "subset_sum": _subset_sum_verifier,
}
# Verifiers that need the signal-safe worker pool instead of inline scoring.
_POOLED = frozenset({"math"})


def register_verifier(name: str, fn: Verifier) -> None:
    """Add a custom (inline-scored) verifier under `name`."""
    if name in VERIFIERS:
        raise ValueError(f"verifier {name!r} is already registered")
    VERIFIERS[name] = fn


def get_verifier(name: str) -> Verifier:
    """Look up a verifier by name; unknown names raise ValueError listing the valid ones."""
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; valid names: {sorted(VERIFIERS)}") from None


def score_batch(
    name: str,
    responses: Sequence[str],
    ground_truths: Sequence[str],
    rows: Sequence[dict] | None = None,
    *,
    timeout_s: float = 5.0,
    workers: int = 2,
) -> list[float | None]:
    """Score responses[i] against ground_truths[i] with verifier `name`; never raises per item.

    "math" runs in the worker pool, each item bounded by about `timeout_s` seconds; a timed-out or
    crashing item scores None. Cheap verifiers run inline, where an exception also scores None.
    """
    verifier = get_verifier(name)
    if len(responses) != len(ground_truths) or (rows is not None and len(rows) != len(responses)):
        raise ValueError(
            f"score_batch needs equal lengths: {len(responses)} responses, {len(ground_truths)} ground truths, "
            f"{'no' if rows is None else len(rows)} rows"
        )
    row_list = list(rows) if rows is not None else [{} for _ in responses]
    if name in _POOLED:
        jobs = [(r, g, timeout_s) for r, g in zip(responses, ground_truths, strict=True)]
        return _run_pooled(_math_job, jobs, timeout_s=timeout_s, workers=workers)
    return [
        _score_inline(verifier, r, g, row)
        for r, g, row in zip(responses, ground_truths, row_list, strict=True)
    ]


def _score_inline(verifier: Verifier, response: str, ground_truth: str, row: dict) -> float | None:
    """Call a cheap verifier, turning a crash into None so one bad row cannot stop a batch."""
    try:
        return verifier(response, ground_truth, **row)
    except Exception:
        logger.warning(
            "verifier %s crashed; scoring the item as None",
            getattr(verifier, "__name__", verifier),
            exc_info=True,
        )
        return None


def _normalize_text(text: str) -> str:
    """Collapse whitespace runs and drop one trailing period."""
    return _WHITESPACE.sub(" ", _TRAILING_PERIOD.sub("", text.strip())).strip()


def _op_timeout(timeout_s: float) -> int:
    """math-verify's per-operation timeout (whole seconds, SIGALRM) for an item budget of timeout_s.

    An item is two parses plus a few comparisons; half the budget per operation lets one slow
    operation time out inside the worker (cheap) before the parent kills the pool (costly).
    """
    return max(1, math.floor(timeout_s / 2))


def _compare_parsed(gold: list, pred: list, op_timeout: int) -> float | None:
    """Compare every (gold, pred) candidate pair like math_verify.verify, but notice timeouts.

    verify() reports a timeout as a plain False; checking pair by pair with raise_on_error lets a
    comparison that timed out (with no other pair matching) score None instead of 0.0.
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timed_out = False
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=op_timeout, raise_on_error=True):
                    return 1.0
            except TimeoutException:
                timed_out = True
            except Exception:
                continue  # this pair is incomparable; others may still match
    return None if timed_out else 0.0


# --------------------------------------------------------------------------- worker pool


def _math_job(response: str, ground_truth: str, timeout_s: float) -> float | None:
    """Top-level (picklable) worker entry point for the "math" verifier."""
    try:
        return score_math(response, ground_truth, timeout_s=timeout_s)
    except BaseException:  # a worker must always answer; None marks the failure
        return None


def _init_worker() -> None:
    """Import math-verify up front so the first scored item does not pay for it; quiet its logs."""
    import math_verify  # noqa: F401

    # math-verify logs every timeout as a warning; the parent already reports them as None scores.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _warmup_job(delay_s: float) -> int:
    """Hold a worker briefly so that concurrent warm-up jobs land on distinct processes."""
    time.sleep(delay_s)
    return os.getpid()


_pool: cf.ProcessPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def shutdown_pool() -> None:
    """Stop the shared worker pool (if any); the next pooled call starts a fresh one."""
    global _pool, _pool_workers
    with _pool_lock:
        pool, _pool, _pool_workers = _pool, None, 0
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pool)


def _get_pool(workers: int) -> cf.ProcessPoolExecutor:
    """Return the shared pool with `workers` processes, creating (and warming) it if needed."""
    global _pool, _pool_workers
    if _pool is not None and _pool_workers == workers:
        return _pool
    if _pool is not None:
        _discard_pool(kill=False)
    # spawn, not fork: forking a parent that holds torch/CUDA state or threads is unsafe.
    pool = cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
    )
    _warm_up(pool, workers)
    _pool, _pool_workers = pool, workers
    return pool


def _warm_up(pool: cf.ProcessPoolExecutor, workers: int) -> None:
    """Start and initialise every worker now, so per-item deadlines never include process start-up.

    The executor spawns a process per submission while none is idle (spawn context), so the first
    round starts them all; rounds of briefly sleeping jobs repeat until each process has answered.
    """
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    seen: set[int] = set()
    while len(seen) < workers:
        futures = [pool.submit(_warmup_job, 0.1) for _ in range(workers)]
        done, not_done = cf.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        failure = next((f.exception() for f in done if f.exception() is not None), None)
        if not_done or failure is not None:
            _kill_pool(pool)
            reason = f"failed: {failure!r}" if failure else f"did not start within {_STARTUP_TIMEOUT_S:.0f} s"
            raise RuntimeError(
                f"verifier worker pool {reason} (spawned workers re-import __main__: is the entry point "
                "guarded by `if __name__ == '__main__':`?)"
            )
        seen.update(f.result() for f in done)


def _discard_pool(*, kill: bool) -> None:
    """Drop the shared pool; `kill` terminates its processes first (for stuck or broken workers)."""
    global _pool, _pool_workers
    pool, _pool, _pool_workers = _pool, None, 0
    if pool is None:
        return
    if kill:
        _kill_pool(pool)
    else:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Kill a pool's processes without waiting on stuck work.

    Python 3.11 has no public way to do this (terminate_workers() arrives in 3.14), so reach for
    the executor's process table; the executor then notices the dead workers and cleans up.
    """
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _run_pooled(
    fn: Callable[..., float | None], jobs: Sequence[tuple], *, timeout_s: float, workers: int
) -> list[float | None]:
    """Run fn(*job) for each job in the shared pool, each bounded by timeout_s (+ a small grace).

    A job past its deadline or raising scores None; see _PooledBatch for how stuck and crashing
    workers are handled.
    """
    with _pool_lock:  # one batch at a time: the deadline accounting assumes we own every worker
        return _PooledBatch(fn, jobs, timeout_s=timeout_s, workers=max(1, int(workers))).run()


class _PooledBatch:
    """The bookkeeping of one pooled batch.

    At most `workers` jobs are in flight, so a submitted job starts at once and its deadline can be
    measured from submission. An overdue job scores None; the pool is killed (the worker may be
    stuck beyond signals' reach) and the other in-flight jobs are resubmitted to a fresh pool.
    When a worker dies, the executor cannot say whose job killed it, so every in-flight job is
    retried once, alone, so that a job that crashes again takes down only itself and scores None.
    """

    def __init__(
        self, fn: Callable[..., float | None], jobs: Sequence[tuple], *, timeout_s: float, workers: int
    ):
        self.fn, self.jobs, self.timeout_s, self.workers = fn, jobs, timeout_s, workers
        self.results: list[float | None] = [None] * len(jobs)
        self.crashes = [0] * len(jobs)
        self.queue = list(range(len(jobs)))[::-1]  # pop() from the end keeps submission order
        self.in_flight: dict[cf.Future, tuple[int, float]] = {}  # future -> (job index, deadline)

    def run(self) -> list[float | None]:
        """Drive the batch to completion and return one result per job."""
        while self.queue or self.in_flight:
            self._submit_ready(_get_pool(self.workers))
            next_deadline = min(deadline for _, deadline in self.in_flight.values())
            done, _ = cf.wait(
                self.in_flight,
                timeout=max(0.0, next_deadline - time.monotonic()),
                return_when=cf.FIRST_COMPLETED,
            )
            if self._collect(done):
                self._restart_after_crash()
            else:
                self._expire_overdue()
        return self.results

    def _submit_ready(self, pool: cf.ProcessPoolExecutor) -> None:
        """Fill free worker slots; a job being retried after a crash runs on its own."""
        while self.queue and len(self.in_flight) < self.workers:
            index = self.queue[-1]
            isolate = self.crashes[index] > 0 or any(self.crashes[i] > 0 for i, _ in self.in_flight.values())
            if isolate and self.in_flight:
                return
            try:
                future = pool.submit(self.fn, *self.jobs[index])
            except cf.process.BrokenProcessPool:
                # A worker died while the pool sat idle (e.g. killed from outside): start afresh.
                _discard_pool(kill=True)
                pool = _get_pool(self.workers)
                continue
            self.queue.pop()
            self.in_flight[future] = (index, time.monotonic() + self.timeout_s + _KILL_GRACE_S)

    def _collect(self, done: set[cf.Future]) -> bool:
        """Record finished jobs; return True if the pool broke (a worker process died)."""
        broken = False
        for future in done:
            index, deadline = self.in_flight.pop(future)
            try:
                self.results[index] = future.result()
            except cf.process.BrokenProcessPool:
                broken = True
                self.in_flight[future] = (index, deadline)  # _restart_after_crash decides its fate
            except Exception:
                logger.warning("verifier job %d raised; scoring it None", index, exc_info=True)
        return broken

    def _restart_after_crash(self) -> None:
        """A worker died: replace the pool and requeue in-flight jobs that may still be retried."""
        logger.warning("a verifier worker process died; restarting the pool")
        _discard_pool(kill=True)
        for index, _ in self.in_flight.values():
            self.crashes[index] += 1
            if self.crashes[index] < _MAX_CRASHES:
                self.queue.append(index)
        self.in_flight.clear()

    def _expire_overdue(self) -> None:
        """Score overdue jobs None; if any, kill the (possibly stuck) pool and requeue the rest."""
        now = time.monotonic()
        overdue = [f for f, (_, deadline) in self.in_flight.items() if deadline <= now and not f.done()]
        if not overdue:
            return
        logger.warning(
            "%d verifier job(s) exceeded %.1f s; restarting the pool", len(overdue), self.timeout_s
        )
        for future in overdue:
            del self.in_flight[future]  # its result stays None
        _discard_pool(kill=True)
        self.queue.extend(index for index, _ in self.in_flight.values())
        self.in_flight.clear()
