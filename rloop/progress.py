"""Progress of a long stage loop: a bar on a terminal, one plain line at a time in logs.

On a terminal (stderr is a TTY) it is a tqdm bar, as users of HF and TRL know it. In a pod log or a
file, a bar's carriage returns and escape codes are noise, so it prints one line instead, at most every
`RLOOP_PROGRESS_SECONDS` (default 30) after the first step, and once at the end, e.g.

    iter 0 rl: 12/60 steps (20%) reward=0.500 ent=1.20 | 1m02s elapsed, ~4m08s left

`RLOOP_PROGRESS` forces a style: `bar`, `lines` or `off`. Either way the latest line also goes to the
stage's attempt record (rloop.attempts), which `rloop status` shows for a running stage.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

from rloop import attempts

ENV_STYLE = "RLOOP_PROGRESS"
ENV_SECONDS = "RLOOP_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def duration(seconds: float | None) -> str:
    """kubectl-style short durations: 45s, 3m07s, 2h05m, 3d4h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def progress_line(desc: str, done: int, total: int, unit: str, figures: dict[str, str], elapsed: float) -> str:
    """One line of progress, plain text only. Pure."""
    pct = f" ({100 * done // total}%)" if total else ""
    shown = " ".join(f"{k}={v}" for k, v in figures.items())
    left = ""
    if 0 < done < total:
        left = f", ~{duration(elapsed / done * (total - done))} left"
    units = unit if total == 1 else unit + "s"
    return f"{desc}: {done}/{total} {units}{pct}{' ' + shown if shown else ''} | {duration(elapsed)} elapsed{left}"


def _style(stream: TextIO) -> str:
    style = os.environ.get(ENV_STYLE, "").strip().lower()
    if style in ("bar", "lines", "off"):
        return style
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_SECONDS, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


class Progress:
    """`update(n, **figures)` after each unit of work; `close()` (or a `with` block) at the end.
    Disabled (e.g. on ranks other than 0), it does nothing."""

    def __init__(self, total: int, desc: str, unit: str = "step", *, enabled: bool = True,
                 stream: TextIO | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.style = _style(self.stream) if enabled else "off"
        self.every = _interval()
        self.done = 0
        self.figures: dict[str, str] = {}
        self._t0 = time.monotonic()
        self._last_line = -math.inf  # the first update prints at once: the stage is under way
        self._closed = False
        self._bar = None
        if self.style == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream)

    def update(self, n: int = 1, **figures: float | str) -> None:
        if self.style == "off":
            return
        self.done += n
        self.figures.update({k: _fmt(v) for k, v in figures.items()})
        if self._bar is not None:
            self._bar.update(n)
            if figures:
                self._bar.set_postfix(self.figures, refresh=False)
        now = time.monotonic()
        if now - self._last_line >= self.every and self.done < self.total:
            self._last_line = now
            self._emit(now)

    def close(self) -> None:
        if self._closed or self.style == "off":
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        self._emit(time.monotonic())

    def line(self, now: float | None = None) -> str:
        return progress_line(self.desc, self.done, self.total, self.unit, self.figures,
                             (now or time.monotonic()) - self._t0)

    def _emit(self, now: float) -> None:
        text = self.line(now)
        if self.style == "lines":
            print(text, file=self.stream, flush=True)
        record = attempts.current()
        if record is not None:
            record.progress(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(v: float | str) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
