"""Experiment tracking: a run's metrics copied to MLflow, TensorBoard and Weights & Biases (`spec.tracking`).

One `StageTracker` per stage attempt, opened by `rloop.stages.run_stage` on rank 0. Stages call
`log_step(metrics)` for each RL step and commit through `StageContext.commit`, which hands the summary
to `before_commit`; `run_stage` closes the tracker afterwards. What goes where:

- MLflow: one parent run per RLoopRun (tags `rloop.run=<namespace>/<name>`, `rloop.store=<store URI>`;
  the flattened spec as params) and one nested run per stage id (`mlflow.parentRunId`,
  `rloop.stage=iter-000/rl`, `rloop.kind`, `rloop.iteration`). A new attempt deletes the stage's earlier
  nested runs first, as its store writer wipes the earlier attempt's files, so no step is logged twice.
- TensorBoard: event files written in the attempt's temp dir and put into the stage's output
  (`<stage>/tensorboard/`) just before the commit: a retried attempt replaces them with the rest.
- W&B: one run per stage, group `<namespace>/<name>`, job_type = stage kind, a deterministic id with
  resume="allow"; offline runs are put into the stage output (`<stage>/wandb/`) for `wandb sync`.

Names are the same everywhere: step metrics under their metrics.jsonl keys (`reward`, `entropy`, ...) at
the global step `iteration * loop.rl.steps + step`, summaries as `summary/<key>` at the global step that
ends the stage's iteration (0 for the base stages). The clients are imported only when configured, and a
tracker that fails is switched off for the rest of the attempt with a warning: tracking never fails a
stage that trained fine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rloop.plan import Stage, all_stages, plan
from rloop.redact import redact_uris
from rloop.spec import MlflowTrackingSpec, RLoopRun, WandbTrackingSpec

TAG_RUN, TAG_STORE, TAG_STAGE, TAG_KIND, TAG_ITERATION, TAG_ROLE = (
    "rloop.run", "rloop.store", "rloop.stage", "rloop.kind", "rloop.iteration", "rloop.role")
TAG_PARENT = "mlflow.parentRunId"
SUMMARY_PREFIX = "summary/"
MLFLOW_PARAM_VALUE_MAX = 6000  # the MLflow server's limit on a param value
MLFLOW_BATCH_MAX = 100  # params per log_batch call
INSTALL_HINT = "pip install 'rloop[tracking]'"


# ------------------------------------------------------------------------------------- pure helpers
def global_step(steps_per_iteration: int, iteration: int | None, step: int) -> int:
    """Monotonic over the run, so the curves of several iterations line up on one axis."""
    return (iteration or 0) * steps_per_iteration + step


def summary_step(steps_per_iteration: int, iteration: int | None) -> int:
    """Where a stage's summary sits on that axis: the RL steps done when its iteration ends (0 for base)."""
    return 0 if iteration is None else (iteration + 1) * steps_per_iteration


def flatten(value: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """A nested dict as one level of `a.b.c` keys; lists stay values."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        out |= flatten(item, name, sep) if isinstance(item, Mapping) else {name: item}
    return out


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat dict (what a tracker can plot)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and math.isfinite(v)}


def split_summary(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(numbers, short texts) of a stage summary, keys prefixed `summary/`, nested keys joined by '/'."""
    flat = {SUMMARY_PREFIX + k: v for k, v in flatten(summary, sep="/").items()}
    texts = {k: str(v)[:500] for k, v in flat.items() if isinstance(v, str)}
    return numbers(flat), texts


def spec_params(run: RLoopRun) -> dict[str, str]:
    """The resolved spec, flattened, as tracker params (lists as JSON)."""
    flat = flatten(run.spec.to_wire())
    return {k: (json.dumps(v) if isinstance(v, list | dict) else str(v))[:MLFLOW_PARAM_VALUE_MAX]
            for k, v in sorted(flat.items())}


def run_key(run: RLoopRun) -> str:
    return f"{run.metadata.namespace}/{run.metadata.name}"


def wandb_run_id(run: RLoopRun, store_uri: str, stage: Stage) -> str:
    """Deterministic per (store, run, stage), so a retried stage resumes its W&B run instead of adding one.
    W&B ids allow letters, digits, '-' and '_'; the hash keeps two stores' runs of one name apart."""
    digest = hashlib.sha256(f"{store_uri}|{run_key(run)}".encode()).hexdigest()[:8]
    readable = re.sub(r"[^a-z0-9_-]+", "-", f"{run.metadata.name}-{stage.id}".lower()).strip("-")
    if len(readable) > 52:
        readable = readable[:43] + "-" + hashlib.sha256(readable.encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def _warn(stage: Stage, tracker: str, what: str, err: BaseException | str) -> None:
    text = redact_uris(str(err)).strip().splitlines()
    reason = (text[-1] if text else type(err).__name__)[:500]
    print(f"rloop stage {stage.id}: tracking.{tracker}: {what} failed ({reason}); {tracker} is off for the "
          "rest of this stage, which goes on", file=sys.stderr)


# ------------------------------------------------------------------------------------------ sinks
class _Sink:
    """One tracker for one stage attempt. Any exception it raises switches it off (see StageTracker)."""

    name = ""

    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_summary(self, step: int, values: dict[str, float], texts: dict[str, str]) -> None: ...

    def finish(self, ok: bool) -> None: ...

    def files(self) -> Path | None:
        """A local directory to put into the stage's output (after finish), or None."""
        return None

    def run_finished(self) -> None:
        """The whole RLoopRun has finished (every stage committed)."""


class MlflowSink(_Sink):
    name = "mlflow"

    def __init__(self, cfg: MlflowTrackingSpec, run: RLoopRun, store_uri: str, stage: Stage):
        # An unreachable server must cost one short wait, not MLflow's default minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.run, self.store_uri, self.stage = run, store_uri, stage
        self.experiment_id = self._experiment(cfg.experiment)
        self.parent_id = self._parent()
        self._drop_earlier_attempts()
        self.run_id = self.client.create_run(self.experiment_id, run_name=stage.id, tags=self._stage_tags()).info.run_id

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another stage created it in the meantime
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _parents(self) -> list:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_RUN}` = '{run_key(self.run)}' and tags.`{TAG_ROLE}` = 'run'",
            order_by=["attributes.start_time ASC"])
        return [r for r in runs if r.data.tags.get(TAG_STORE) == self.store_uri]

    def _parent(self) -> str:
        """The RLoopRun's parent run, created by the first stage. Two stages starting at once may both
        create one: both then keep the oldest and the other is deleted."""
        parents = self._parents()
        if not parents:
            mine = self.client.create_run(self.experiment_id, run_name=self.run.metadata.name, tags={
                TAG_RUN: run_key(self.run), TAG_STORE: self.store_uri, TAG_ROLE: "run",
                "rloop.mode": self.run.spec.mode}).info.run_id
            parents = self._parents()
            if parents and parents[0].info.run_id != mine:
                self.client.delete_run(mine)
        parent = parents[0]
        if not parent.data.params:  # params are immutable in MLflow: logged once, by whoever created it
            params = spec_params(self.run)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), MLFLOW_BATCH_MAX):
                self.client.log_batch(parent.info.run_id, params=items[i:i + MLFLOW_BATCH_MAX])
        if parent.info.status != "RUNNING":  # e.g. loop.iterations was raised after the run had finished
            self.client.update_run(parent.info.run_id, status="RUNNING")
        return parent.info.run_id

    def _drop_earlier_attempts(self) -> None:
        """Nested runs of this stage from earlier attempts (crashed, or committed and then invalidated): the
        store wiped their output, so their steps go too; this attempt logs every step again."""
        earlier = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_id}' and tags.`{TAG_STAGE}` = '{self.stage.id}'")
        for r in earlier:
            self.client.delete_run(r.info.run_id)

    def _stage_tags(self) -> dict[str, str]:
        tags = {TAG_PARENT: self.parent_id, TAG_RUN: run_key(self.run), TAG_STORE: self.store_uri,
                TAG_ROLE: "stage", TAG_STAGE: self.stage.id, TAG_KIND: self.stage.kind}
        if self.stage.iteration is not None:
            tags[TAG_ITERATION] = str(self.stage.iteration)
        if self.stage.eval_set:
            tags["rloop.evalSet"] = self.stage.eval_set
        return tags

    def _metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):  # the server takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics(step, metrics)

    def log_summary(self, step: int, values: dict[str, float], texts: dict[str, str]) -> None:
        self._metrics(step, values)
        from mlflow.entities import RunTag

        if texts:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in texts.items()])

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def run_finished(self) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED")


class TensorBoardSink(_Sink):
    name = "tensorboard"

    def __init__(self, tmp: Path):
        # tensorboard's own writer (not torch.utils.tensorboard): the verifier image has no torch.
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self.dir = tmp / "tensorboard"
        self.writer = EventFileWriter(str(self.dir))

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        value = [self._summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        self.writer.add_event(self._event(wall_time=time.time(), step=step, summary=self._summary(value=value)))

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._scalars(step, metrics)

    def log_summary(self, step: int, values: dict[str, float], texts: dict[str, str]) -> None:
        self._scalars(step, values)

    def finish(self, ok: bool) -> None:
        self.writer.close()

    def files(self) -> Path | None:
        return self.dir


class WandbSink(_Sink):
    name = "wandb"

    def __init__(self, cfg: WandbTrackingSpec, run: RLoopRun, store_uri: str, stage: Stage, tmp: Path):
        import wandb

        self.offline = cfg.mode == "offline"
        self.dir = tmp / "wandb-dir"
        self.dir.mkdir()
        tags = [stage.kind] + ([f"iter-{stage.iteration:03d}"] if stage.iteration is not None else [])
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(self.dir),
            id=wandb_run_id(run, store_uri, stage), resume="allow", name=stage.id,
            group=run_key(run), job_type=stage.kind, tags=tags, config=run.spec.to_wire(),
            settings=wandb.Settings(console="off", silent=True, save_code=False, x_disable_stats=True,
                                    x_save_requirements=False, disable_git=True),
        )
        # A resumed run (a retried stage, online) already has the first steps: W&B drops steps below
        # its current one, so they are skipped here rather than warned about one by one.
        self.first_step = int(getattr(self.run, "starting_step", 0) or 0)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(metrics, step=step)

    def log_summary(self, step: int, values: dict[str, float], texts: dict[str, str]) -> None:
        self.run.summary.update({**values, **texts})

    def finish(self, ok: bool) -> None:
        import wandb

        self.run.finish(exit_code=0 if ok else 1)
        # finish() returns before W&B's service process has written the run's records out (offline, the
        # .wandb file can still be empty); teardown waits for that process to flush and exit.
        wandb.teardown()

    def files(self) -> Path | None:
        """Offline: the run's records (`run-<id>.wandb`, what `wandb sync` uploads) and files/, under
        `wandb/<offline-run-dir>/`. Not logs/ (W&B's service may still append to them after finish)."""
        if not self.offline:
            return None
        out = self.dir.parent / "wandb-out"
        for run_dir in (self.dir / "wandb").glob("offline-run-*"):
            for p in [*run_dir.glob("*.wandb"), *run_dir.glob("files/**/*")]:
                if p.is_file():
                    target = out / run_dir.name / p.relative_to(run_dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, target)
        return out if out.exists() else None


# ---------------------------------------------------------------------------------------- tracker
class StageTracker:
    """The configured trackers of one stage attempt; with none configured every call is a no-op."""

    def __init__(self, run: RLoopRun | None = None, stage: Stage | None = None, store_uri: str = "",
                 sinks: list[_Sink] | None = None, tmp: Path | None = None):
        self.run, self.stage, self.store_uri = run, stage, store_uri
        self.sinks = sinks or []
        self._tmp = tmp
        self._finished = False
        self._steps = run.spec.loop.rl.steps if run is not None else 0

    @classmethod
    def open(cls, run: RLoopRun, stage: Stage, store_uri: str) -> StageTracker:
        """Start every configured tracker for this attempt; one that cannot start is left out (warned)."""
        cfg = run.spec.tracking
        if cfg.mlflow is None and cfg.wandb is None and (cfg.tensorboard is None or not cfg.tensorboard.enabled):
            return cls(run, stage, store_uri)
        tmp = Path(tempfile.mkdtemp(prefix="rloop-tracking-"))
        starters = []
        if cfg.mlflow is not None:
            starters.append(("mlflow", lambda: MlflowSink(cfg.mlflow, run, store_uri, stage)))
        if cfg.tensorboard is not None and cfg.tensorboard.enabled:
            starters.append(("tensorboard", lambda: TensorBoardSink(tmp)))
        if cfg.wandb is not None:
            starters.append(("wandb", lambda: WandbSink(cfg.wandb, run, store_uri, stage, tmp)))
        sinks = []
        for name, start in starters:
            try:
                sinks.append(start())
            except ImportError as err:
                _warn(stage, name, "start", f"{err}; install the clients with {INSTALL_HINT}")
            except Exception as err:
                _warn(stage, name, "start", err)
        return cls(run, stage, store_uri, sinks, tmp)

    def _each(self, what: str, call) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as err:
                _warn(self.stage, sink.name, what, err)
                self.sinks.remove(sink)
                with contextlib.suppress(Exception):  # end its run as failed, if it still can
                    sink.finish(ok=False)

    def log_step(self, metrics: Mapping[str, Any]) -> None:
        """One RL step's metrics dict (the row written to metrics.jsonl; its `step` is within the iteration)."""
        if not self.sinks:
            return
        step = global_step(self._steps, self.stage.iteration, int(metrics.get("step", 0)))
        values = numbers(metrics)
        self._each("logging step metrics", lambda s: s.log_step(step, values))

    def before_commit(self, writer, summary: Mapping[str, Any]) -> None:
        """Log the summary, end each tracker run, and put their files into the stage output (`writer`),
        so they are in the commit manifest."""
        if not self.sinks:
            return
        values, texts = split_summary(summary)
        step = summary_step(self._steps, self.stage.iteration)
        self._each("logging the summary", lambda s: s.log_summary(step, values, texts))
        self._each("finishing", lambda s: s.finish(ok=True))
        self._finished = True
        for sink in self.sinks:
            local = sink.files()
            if local is not None and local.exists():
                writer.put_dir(sink.name, local)  # store errors here are the commit's own: not swallowed

    def after_commit(self, store) -> None:
        """Once the stage that completes the plan has committed, the RLoopRun's tracker run is finished too."""
        if not any(type(s).run_finished is not _Sink.run_finished for s in self.sinks):
            return
        ids = [s.id for s in all_stages(self.run.spec)]
        try:
            done = plan(self.run.spec, store.committed(ids)).finished
        except Exception:  # the store is the stage's business; the next stage will look again
            return
        if done:
            self._each("finishing the run", lambda s: s.run_finished())

    def close(self) -> None:
        """End the attempt: trackers not finished by a commit end as failed; temp files go."""
        if not self._finished:
            self._each("closing", lambda s: s.finish(ok=False))
            self._finished = True
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


NO_TRACKING = StageTracker()
"""The tracker of a stage that tracks nothing (the default of StageContext)."""
