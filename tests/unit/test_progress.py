"""rloop.progress: a bar on a terminal, plain periodic lines in logs (no control characters), and the
latest line in the stage's attempt record."""

from __future__ import annotations

import io
import re

import pytest

from rloop import attempts
from rloop.progress import Progress, duration, progress_line
from rloop.store import RunStore

CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # anything but "\n"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (0.4, "0s"), (59, "59s"), (61, "1m01s"),
                                               (3725, "1h02m"), (90061, "1d1h")])
def test_duration_is_kubectl_style(seconds, text):
    assert duration(seconds) == text


def test_progress_line_has_counts_figures_and_time_left():
    line = progress_line("iter 0 rl", 12, 60, "step", {"reward": "0.500"}, elapsed=62.0)
    assert line == "iter 0 rl: 12/60 steps (20%) reward=0.500 | 1m02s elapsed, ~4m08s left"
    assert progress_line("x", 1, 1, "step", {}, 3.0) == "x: 1/1 step (100%) | 3s elapsed"


def test_log_lines_are_periodic_plain_and_end_with_a_final_line(monkeypatch):
    monkeypatch.delenv("RLOOP_PROGRESS", raising=False)
    monkeypatch.setenv("RLOOP_PROGRESS_SECONDS", "0")  # every update is due
    out = io.StringIO()  # not a TTY: a pod log
    with Progress(3, "iter 1 rft", stream=out) as bar:
        for loss in (2.0, 1.5, 1.25):
            bar.update(1, nll=loss)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("iter 1 rft: 1/3 steps (33%) nll=2.000 |")
    assert lines[-1].startswith("iter 1 rft: 3/3 steps (100%) nll=1.250 |")
    assert len(lines) == 3  # 1/3, 2/3 while running (not the last update twice), then the final line
    assert not CONTROL.search(out.getvalue())


def test_log_lines_wait_for_the_interval(monkeypatch):
    monkeypatch.delenv("RLOOP_PROGRESS", raising=False)
    monkeypatch.setenv("RLOOP_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    with Progress(50, "eval", unit="prompt", stream=out) as bar:
        for _ in range(50):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update (the stage is under way), then only the final line
    assert lines[0].startswith("eval: 1/50 prompts (2%)") and lines[1].startswith("eval: 50/50 prompts (100%)")


def test_terminal_gets_a_bar_and_disabled_prints_nothing(monkeypatch):
    monkeypatch.delenv("RLOOP_PROGRESS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    tty = FakeTTY()
    with Progress(4, "warm-up", stream=tty) as bar:
        for _ in range(4):
            bar.update(1, loss=1.0)
    assert "\r" in tty.getvalue() and "warm-up" in tty.getvalue()  # tqdm redraws in place
    quiet = io.StringIO()
    with Progress(4, "rank 1", stream=quiet, enabled=False) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""
    monkeypatch.setenv("RLOOP_PROGRESS", "lines")  # forced: lines even on a terminal
    forced = FakeTTY()
    with Progress(1, "x", stream=forced) as bar:
        bar.update(1)
    assert forced.getvalue().startswith("x: 1/1 step") and "\r" not in forced.getvalue()


def test_the_attempt_record_gets_the_latest_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOOP_PROGRESS_SECONDS", "0")
    store = RunStore(str(tmp_path), "default", "r")
    record = attempts.begin(store, "iter-000/rl")
    try:
        with Progress(2, "iter 0 rl", stream=io.StringIO()) as bar:
            bar.update(1, reward=0.25)
            record._writer.join(timeout=10)  # progress is written off the training thread
        (seen,) = attempts.read_attempts(store)["iter-000/rl"]
        assert seen.progress.startswith("iter 0 rl: 1/2 steps (50%) reward=0.250") and not seen.finished
    finally:
        attempts.finish(0, "committed")
    (done,) = attempts.read_attempts(store)["iter-000/rl"]
    assert done.finished and done.exit_code == 0 and done.outcome == "committed"
    assert done.progress.startswith("iter 0 rl: 1/2 steps")  # what it showed last


def test_a_store_that_hangs_never_holds_up_the_loop(tmp_path, monkeypatch):
    """Progress writes run off the training thread: a write that blocks (a store whose client is still
    retrying) costs the loop nothing, and the next progress write is skipped while it is in flight."""
    import threading
    import time

    store = RunStore(str(tmp_path), "default", "r")
    record = attempts.AttemptRecord(store, "iter-000/rl")
    release = threading.Event()
    calls = []

    def blocking_write(path, data):
        calls.append(path)
        release.wait(timeout=10)

    monkeypatch.setattr(store, "_write", blocking_write)
    monkeypatch.setattr(attempts, "PROGRESS_WRITE_SECONDS", 0.0)
    t0 = time.monotonic()
    record.progress("a")
    record.progress("b")  # the first write is still blocked: not a second one
    assert time.monotonic() - t0 < 1.0
    assert len(calls) <= 1
    release.set()
    record._writer.join(timeout=10)
    assert len(calls) == 1 and not record._writer.is_alive()  # "b" was skipped, not queued
