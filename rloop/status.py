"""What `rloop status` and `rloop runs` show, read from the store: commit manifests (what is done) and
attempt records (rloop.attempts: tries, durations, live progress). Builders return plain data; the
`*_table` functions lay it out as kubectl does (upper-case headers, columns padded by spaces, `-` for
nothing, no colours or control characters, so the output reads the same in a terminal, a pipe or a log).
"""

from __future__ import annotations

import fcntl
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rloop.attempts import Attempt, read_attempts
from rloop.plan import Stage, all_stages, plan
from rloop.progress import duration
from rloop.spec import parse_run
from rloop.store import RunStore


@dataclass
class StageRow:
    stage: str
    state: str
    """Succeeded, Running, Failed (last attempt failed), Lost (its process vanished), Ready, Waiting."""
    attempts: int
    seconds: float | None
    """The committing attempt's wall time; for a running or failed stage, its latest attempt's."""
    metrics: str
    """A few headline figures of the committed summary, or a running attempt's progress line."""
    last_exit: int | None = None


@dataclass
class RunStatus:
    uri: str
    name: str
    namespace: str
    mode: str
    state: str
    """Succeeded, Running, Failed (a stage rejected its input), Error (a stage's last attempt failed;
    the executor may retry), Pending (nothing is running now)."""
    done: int
    total: int
    next: list[str]
    stages: list[StageRow]
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    started: float | None = None
    eval_headline: tuple[str, int, str, float] | None = None
    """(eval set, k, policy label, pass@k) of the latest evaluation of the spec's first eval set."""


def run_status(store: RunStore) -> RunStatus:
    run = parse_run(store.read_spec())
    spec = run.spec
    stages = all_stages(spec)
    summaries = {sid: m.summary for sid, m in store.committed_manifests([s.id for s in stages]).items()}
    committed = set(summaries)
    attempts = read_attempts(store)
    p = plan(spec, committed)
    ready = {s.id for s in p.ready}
    rows = [_stage_row(s, committed, ready, summaries.get(s.id, {}), attempts.get(s.id, [])) for s in stages]
    starts = [a.started for tries in attempts.values() for a in tries]
    first_set = spec.data.eval[0].name if spec.data.eval else None
    return RunStatus(
        uri=store.uri, name=run.metadata.name, namespace=run.metadata.namespace, mode=spec.mode,
        state=_run_state(p.finished, rows, _runner_active(store)), done=p.done, total=p.total,
        next=[s.id for s in p.ready], stages=rows, summaries=summaries, attempts=attempts,
        started=min(starts) if starts else None,
        eval_headline=_eval_headline(summaries, first_set),
    )


def _stage_row(stage: Stage, committed: set[str], ready: set[str], summary: dict[str, Any],
               tries: list[Attempt]) -> StageRow:
    latest = tries[-1] if tries else None
    last_exit = latest.exit_code if latest else None
    if stage.id in committed:
        winner = next((a for a in reversed(tries) if a.outcome == "committed"), None)
        return StageRow(stage.id, "Succeeded", len(tries), winner.seconds if winner else None,
                        headline(stage.kind, summary), last_exit)
    if latest is not None and not latest.finished:
        state = "Lost" if latest.process_gone() else "Running"
        return StageRow(stage.id, state, len(tries), latest.seconds, _progress_tail(latest.progress), last_exit)
    if latest is not None and latest.outcome != "committed":
        return StageRow(stage.id, "Failed", len(tries), latest.seconds,
                        f"{latest.outcome} (exit {latest.exit_code})", last_exit)
    return StageRow(stage.id, "Ready" if stage.id in ready else "Waiting", len(tries), None, "", last_exit)


def _run_state(finished: bool, rows: list[StageRow], runner_active: bool) -> str:
    if finished:
        return "Succeeded"
    if runner_active or any(r.state == "Running" for r in rows):
        return "Running"
    failed = [r for r in rows if r.state == "Failed"]
    if any(r.metrics.startswith("invalid input") for r in failed):
        return "Failed"
    return "Error" if failed else "Pending"


def _runner_active(store: RunStore) -> bool:
    """A local `rloop run` holds the run directory's lock (rloop.runner) while it works."""
    if not store.is_local:
        return False
    lock = Path(store.base) / ".lock"
    if not lock.exists():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _progress_tail(line: str | None) -> str:
    """A progress line without its description (the row already names the stage)."""
    if not line:
        return "starting"
    return line.split(": ", 1)[-1]


def _num(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _largest_k(pass_at_k: Any) -> tuple[int, float] | None:
    if not isinstance(pass_at_k, dict):
        return None
    ks = []
    for k, v in pass_at_k.items():
        try:
            ks.append((int(k), float(v)))
        except (TypeError, ValueError):
            continue
    return max(ks) if ks else None


def headline(kind: str, summary: dict[str, Any]) -> str:
    """The few figures of a committed stage's summary worth a glance. Pure."""
    parts: list[str] = []
    if kind == "init":
        if "warmup_last_loss" in summary:
            parts.append(f"warmup_loss={_num(summary['warmup_last_loss'])}")
        if "cache" in summary:
            parts.append(f"cache={summary['cache']}")
    elif kind == "rl":
        parts += [f"reward={_num(summary.get('train_reward_last10pct'))}",
                  f"pass_rate={_num(summary.get('pass_rate_last10pct'))}", f"steps={_num(summary.get('steps'))}"]
        if summary.get("stopped_early"):
            parts.append("stopped_early")
    elif kind == "rollout":
        parts.append(f"samples={_num(summary.get('samples'))}")
    elif kind == "verify":
        parts.append(f"experts={_num(summary.get('expert_trajectories'))}")
        if "union_coverage" in summary:
            parts.append(f"coverage={_num(summary['union_coverage'])}")
    elif kind == "rft":
        if "nll_before" in summary:
            parts.append(f"nll={_num(summary.get('nll_before'))}->{_num(summary.get('nll_after'))}")
        parts.append(f"steps={_num(summary.get('steps'))}")
    elif kind == "eval":
        parts.append(f"avg@{summary.get('n', 'n')}={_num(summary.get('avg_at_n'))}")
        best = _largest_k(summary.get("pass_at_k"))
        if best:
            parts.append(f"pass@{best[0]}={best[1]:.3f}")
    return " ".join(parts)


def _eval_headline(summaries: dict[str, dict[str, Any]], eval_set: str | None) -> tuple[str, int, str, float] | None:
    if eval_set is None:
        return None
    found = []
    for sid, summary in summaries.items():
        stage = Stage.from_id(sid)
        best = _largest_k(summary.get("pass_at_k"))
        if stage.kind == "eval" and stage.eval_set == eval_set and best:
            order = -1 if stage.iteration is None else stage.iteration
            label = "base" if stage.iteration is None else f"iter {stage.iteration}"
            found.append((order, label, best))
    if not found:
        return None
    _, label, (k, value) = max(found)
    return eval_set, k, label, value


# ------------------------------------------------------------------------------------------ tables
def columns(header: list[str], rows: list[list[str]]) -> str:
    """kubectl's layout: every column as wide as its widest cell, three spaces apart; the last unpadded."""
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table)


def status_table(st: RunStatus) -> str:
    running = {r.stage for r in st.stages if r.state == "Running"}
    upcoming = [s for s in st.next if s not in running]
    lines = [
        f"Run:     {st.namespace}/{st.name} ({st.mode})   {st.uri}",
        f"State:   {st.state}, {st.done}/{st.total} stages committed"
        + (f", running: {', '.join(sorted(running))}" if running else "")
        + (f", next: {', '.join(upcoming)}" if upcoming else ""),
    ]
    if st.eval_headline:
        name, k, label, value = st.eval_headline
        lines.append(f"Held-out: pass@{k} {value:.3f} on {name} ({label})")
    lines.append("")
    rows = [[r.stage, r.state, str(r.attempts) if r.attempts else "-", duration(r.seconds), r.metrics or "-"]
            for r in st.stages]
    lines.append(columns(["STAGE", "STATE", "ATTEMPTS", "DURATION", "METRICS"], rows))
    return "\n".join(lines)


def status_json(st: RunStatus) -> dict[str, Any]:
    """The machine-readable form (`rloop status --json`): the original keys, plus attempts per stage."""
    return {
        "run": st.uri, "mode": st.mode, "done": st.done, "total": st.total, "finished": st.state == "Succeeded",
        "next": st.next,
        "stages": {r.stage: ("committed" if r.state == "Succeeded" else "pending") for r in st.stages},
        "state": st.state,
        "attempts": {r.stage: {"attempts": r.attempts, "state": r.state, "seconds": r.seconds, "metrics": r.metrics}
                     for r in st.stages},
    }


# ------------------------------------------------------------------------------------------ runs
def find_runs(root_uri: str, namespace: str | None = None) -> list[RunStore]:
    """Every run directory (one with a spec.json) under a store root, optionally in one namespace."""
    probe = RunStore(root_uri, "_", "_")
    root = probe.base.rsplit("/", 2)[0]
    pattern = f"{root}/{namespace or '*'}/*/spec.json"
    try:
        found = probe.call(probe.fs.glob, pattern)
    except FileNotFoundError:
        return []
    out = []
    for path in sorted(found):
        ns, name = path.rsplit("/", 3)[-3:-1]
        if not ns.startswith("_"):  # _cache holds the tiny base models, not runs
            out.append(RunStore(root_uri, ns, name))
    return out


def runs_table(statuses: list[RunStatus], now: float | None = None) -> str:
    now = now or time.time()
    rows = []
    for st in statuses:
        pass_k = "-"
        if st.eval_headline:
            name, k, label, value = st.eval_headline
            pass_k = f"{value:.3f} (pass@{k} {name}, {label})"
        rows.append([st.namespace, st.name, st.mode, st.state, f"{st.done}/{st.total}", pass_k,
                     duration(now - st.started) if st.started else "-"])
    return columns(["NAMESPACE", "NAME", "MODE", "STATE", "STAGES", "HELD-OUT PASS@K", "AGE"], rows)
