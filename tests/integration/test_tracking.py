"""Experiment tracking end to end (rloop.tracking): a small local run reports to a real `mlflow server`
on 127.0.0.1 (from .venv-mlflow, `make mlflow-venv`), to TensorBoard event files in the store and to an
offline Weights & Biases run; everything is read back with each tracker's own client or reader and
compared with the run's metrics.jsonl and commit summaries. A stage killed mid-RL and retried leaves
each step in MLflow once; a tracker that is down never fails a stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from rloop.plan import Stage, all_stages
from rloop.spec import parse_run
from rloop.store import MANIFEST, RunStore
from rloop.tracking import StageTracker
from tests.helpers import base_env, small_doc
from tests.s3harness import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
MLFLOW = ROOT / ".venv-mlflow" / "bin" / "mlflow"
SERVER_START_TIMEOUT_S = 120  # ~12 s on a loaded 2-core machine
RUN_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------ mlflow server
def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _healthy(uri: str, proc: subprocess.Popen, log: Path) -> bool:
    import urllib.request

    if proc.poll() is not None:
        pytest.fail(f"mlflow server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifact store), killed after the module."""
    if not MLFLOW.exists():
        if os.environ.get("RLOOP_REQUIRE_MLFLOW") == "1":
            pytest.fail(f"{MLFLOW} is missing; `make mlflow-venv` builds it (make test does)")
        pytest.skip(f"{MLFLOW} is missing: run `make mlflow-venv`")
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_ports(1)[0]
    uri = f"http://127.0.0.1:{port}"
    log = d / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts")],
            cwd=d, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        wait_for(lambda: _healthy(uri, proc, log), SERVER_START_TIMEOUT_S, "mlflow server /health")
        print(f"\nmlflow server ready at {uri} in {time.monotonic() - t0:.1f}s")
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def client(mlflow_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tracking")


@pytest.fixture(scope="module")
def env(work) -> dict[str, str]:
    """Stage subprocess env: quiet, offline, W&B's own config and cache inside the test's directory."""
    e = base_env(work / "cache")
    e = {k: v for k, v in e.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    e.update(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(work / "wandb-config"),
             WANDB_CACHE_DIR=str(work / "wandb-cache"), WANDB_DATA_DIR=str(work / "wandb-data"),
             WANDB_SILENT="true")
    return e


def tracked_doc(name: str, mlflow_uri: str, *, experiment: str, **kw) -> dict:
    doc = small_doc(name, **kw)
    doc["spec"]["tracking"] = {
        "mlflow": {"uri": mlflow_uri, "experiment": experiment},
        "tensorboard": {},
        "wandb": {"project": "rloop-test", "mode": "offline"},
    }
    return doc


def rloop_run(doc: dict, work: Path, env: dict[str, str]) -> subprocess.Popen:
    cfg = work / f"{doc['metadata']['name']}.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    err = open(work / f"{doc['metadata']['name']}.err", "w")  # noqa: SIM115
    try:
        return subprocess.Popen([sys.executable, "-m", "rloop", "run", str(cfg), "--store", str(work / "store")],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        err.close()


def finish(proc: subprocess.Popen, work: Path, name: str) -> str:
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (work / f"{name}.err").read_text()
    assert rc == 0, f"rloop run exited {rc}\n{log[-6000:]}"
    return log


def steps_of(run_dir: Path, stage_id: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage_id / "metrics.jsonl").read_text().splitlines()]


def summary_of(run_dir: Path, stage_id: str) -> dict:
    return json.loads((run_dir / stage_id / MANIFEST).read_text())["summary"]


def numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float) and v == v}


# ------------------------------------------------------------------------------------ W&B offline reader
def wandb_records(path: Path) -> list:
    """Every record of an offline run's `.wandb` file: W&B's 7-byte header (":W&B", magic, version), then
    LevelDB log framing (32 KiB blocks; chunks of crc32, length, type) around protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, chunks, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            chunks.append(chunk)
        elif kind == 2:  # FIRST
            partial = chunk
        elif kind == 3:  # MIDDLE
            partial += chunk
        elif kind == 4:  # LAST
            chunks.append(partial + chunk)
    return [pb.Record.FromString(c) for c in chunks]


def wandb_history(path: Path) -> dict[int, dict]:
    out = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


# ------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def tracked(work, env, mlflow_uri):
    """One RLoop iteration (init, base eval, rl, verify, rft, eval) with all three trackers on."""
    doc = tracked_doc("tracked", mlflow_uri, experiment="rloop-tracked", iterations=1)
    t0 = time.monotonic()
    log = finish(rloop_run(doc, work, env), work, "tracked")
    seconds = time.monotonic() - t0
    print(f"\ntracked run (6 stages, 3 trackers): {seconds:.1f}s")
    assert "tracking." not in log, log[-4000:]  # no tracker warned
    return {"doc": doc, "dir": work / "store" / "default" / "tracked", "seconds": seconds}


def parent_and_stages(client, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`rloop.run` = 'default/{name}'")
    parents = [r for r in runs if r.data.tags["rloop.role"] == "run"]
    stages = {r.data.tags["rloop.stage"]: r for r in runs if r.data.tags["rloop.role"] == "stage"}
    return exp, parents, stages


def test_mlflow_gets_one_parent_run_with_the_spec_and_a_nested_run_per_stage(tracked, client):
    exp, parents, stages = parent_and_stages(client, "rloop-tracked", "tracked")
    kinds = {s.id: s.kind for s in all_stages(parse_run(tracked["doc"]).spec)}
    ids = list(kinds)
    assert len(ids) == 6
    (parent,) = parents
    assert parent.info.status == "FINISHED"  # the last stage's commit completed the plan
    assert parent.data.tags["rloop.store"].endswith("/default/tracked")
    params = parent.data.params
    assert params["loop.rl.steps"] == "4" and params["mode"] == "rloop" and params["loop.eval.kList"] == "[1, 2, 4]"
    assert params["tracking.mlflow.experiment"] == "rloop-tracked"
    assert sorted(stages) == sorted(ids)
    for sid, r in stages.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id, sid
        assert r.info.status == "FINISHED", sid
        assert r.data.tags["rloop.kind"] == kinds[sid], sid
    assert stages["iter-000/rl"].data.tags["rloop.iteration"] == "0"
    assert "rloop.iteration" not in stages["base/eval/heldout"].data.tags


def test_mlflow_has_every_rl_step_once_with_the_values_of_metrics_jsonl(tracked, client):
    _, _, stages = parent_and_stages(client, "rloop-tracked", "tracked")
    rows = steps_of(tracked["dir"], "iter-000/rl")
    assert len(rows) == 4
    run_id = stages["iter-000/rl"].info.run_id
    for key in ("reward", "entropy", "pass_rate", "tokens_per_s", "time_rollout_s"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1, 2, 3], key  # iteration 0: global step = step
        assert [m.value for m in history] == [float(r[key]) for r in rows], key
    logged = set(client.get_run(run_id).data.metrics)
    assert set(numeric(rows[0])) <= logged


def test_mlflow_has_each_stage_summary(tracked, client):
    _, _, stages = parent_and_stages(client, "rloop-tracked", "tracked")
    d = tracked["dir"]
    for sid, keys in {"iter-000/rl": ["steps", "train_reward_first"], "iter-000/verify": ["expert_trajectories"],
                      "iter-000/rft": ["steps", "expert_trajectories"], "iter-000/eval/heldout": ["avg_at_n"],
                      "base/eval/heldout": ["avg_at_n"]}.items():
        got = stages[sid].data.metrics
        want = summary_of(d, sid)
        for key in keys:
            assert got[f"summary/{key}"] == pytest.approx(float(want[key])), (sid, key)
    ev = stages["iter-000/eval/heldout"]
    metrics = json.loads((d / "iter-000/eval/heldout/metrics.json").read_text())
    for k, v in metrics["pass_at_k"].items():
        assert ev.data.metrics[f"summary/pass_at_k/{k}"] == pytest.approx(v)
    history = client.get_metric_history(ev.info.run_id, "summary/avg_at_n")
    assert [m.step for m in history] == [4]  # the global step at the end of iteration 0
    assert ev.data.tags["summary/policy"] == metrics["policy"]


def test_tensorboard_event_files_in_the_store_match_metrics_jsonl(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = tracked["dir"]
    rows = steps_of(d, "iter-000/rl")
    tb = d / "iter-000/rl/tensorboard"
    acc = EventAccumulator(str(tb))
    acc.Reload()
    for key in ("reward", "entropy", "pass_rate"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 1, 2, 3], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key  # float32
    summary = summary_of(d, "iter-000/rl")
    assert acc.Scalars("summary/steps")[0].value == summary["steps"]
    # The event files are part of the committed output (a retried attempt replaces them).
    listed = json.loads((d / "iter-000/rl" / MANIFEST).read_text())["files"]
    assert any(f["path"].startswith("tensorboard/events.out.tfevents.") for f in listed)
    RunStore(str(d.parents[1]), "default", "tracked").validate("iter-000/rl", deep=True)
    ev = EventAccumulator(str(d / "iter-000/eval/heldout/tensorboard"))
    ev.Reload()
    assert ev.Scalars("summary/avg_at_n")[0].value == pytest.approx(summary_of(d, "iter-000/eval/heldout")["avg_at_n"])


def test_wandb_offline_run_files_hold_the_step_metrics(tracked):
    d = tracked["dir"]
    rows = steps_of(d, "iter-000/rl")
    (records,) = list((d / "iter-000/rl/wandb").glob("offline-run-*/run-*.wandb"))
    history = wandb_history(records)
    assert sorted(history) == [0, 1, 2, 3]
    for r in rows:
        got = history[r["step"]]
        for key, value in numeric(r).items():
            assert got[key] == pytest.approx(value), key
    run = next(r.run for r in wandb_records(records) if r.WhichOneof("record_type") == "run")
    assert run.run_group == "default/tracked" and run.job_type == "rl" and run.display_name == "iter-000/rl"
    assert run.project == "rloop-test" and list(run.tags) == ["rl", "iter-000"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["loop"]["rl"]["steps"] == 4 and config["mode"] == "rloop"


# ------------------------------------------------------------------------------------------ resume
def stage_child(runner: psutil.Process, kind: str) -> psutil.Process | None:
    for c in runner.children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            cmd = c.cmdline()
            if "stage" in cmd and kind in cmd:
                return c
    return None


@pytest.mark.faults
def test_a_killed_and_retried_rl_stage_logs_each_step_once(work, env, mlflow_uri, client):
    """SIGKILL the rl stage after a few steps reached MLflow; the runner retries it from scratch; the
    retry deletes the dead attempt's nested run, so the surviving one has each step exactly once."""
    doc = tracked_doc("retried", mlflow_uri, experiment="rloop-retried", mode="rl", iterations=1, eval_base=False)
    doc["spec"]["loop"]["rl"]["steps"] = 40
    doc["spec"]["retry"] = {"limit": 2, "backoffSeconds": 0}
    runner = rloop_run(doc, work, env)
    try:
        def running_rl():
            exp = client.get_experiment_by_name("rloop-retried")
            if exp is None:
                return None
            runs = client.search_runs([exp.experiment_id], filter_string="tags.`rloop.stage` = 'iter-000/rl'")
            if runs and len(client.get_metric_history(runs[0].info.run_id, "reward")) >= 3:
                return runs[0]
            return None

        first = wait_for(running_rl, RUN_TIMEOUT_S, "3 rl steps in MLflow")
        child = stage_child(psutil.Process(runner.pid), "rl")
        assert child is not None
        child.kill()
        log = finish(runner, work, "retried")
    finally:
        if runner.poll() is None:
            runner.kill()
    assert "iter-000/rl exited" in log and "retrying" in log, log[-3000:]
    _, _, stages = parent_and_stages(client, "rloop-retried", "retried")
    rl = stages["iter-000/rl"]
    assert rl.info.run_id != first.info.run_id and rl.info.status == "FINISHED"
    assert client.get_run(first.info.run_id).info.lifecycle_stage == "deleted"
    rows = steps_of(work / "store" / "default" / "retried", "iter-000/rl")
    history = sorted(client.get_metric_history(rl.info.run_id, "reward"), key=lambda m: m.step)
    assert len(history) == len(rows) == 40
    assert [m.step for m in history] == list(range(40))
    assert [m.value for m in history] == [float(r["reward"]) for r in rows]


# ------------------------------------------------------------------------------------------ failures
def test_a_tracker_that_is_down_is_warned_about_and_the_others_go_on(tmp_path, capfd, monkeypatch):
    """Nothing listens at the MLflow URI: the tracker warns once and is off; TensorBoard still writes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_ports(1)[0]  # nothing listens there
    doc = small_doc("down")
    doc["spec"]["tracking"] = {"mlflow": {"uri": f"http://127.0.0.1:{port}"}, "tensorboard": {}}
    run = parse_run(doc)
    tracker = StageTracker.open(run, Stage("rl", 0), str(tmp_path / "store/default/down"))
    assert [s.name for s in tracker.sinks] == ["tensorboard"]
    err = capfd.readouterr().err
    assert "rloop stage iter-000/rl: tracking.mlflow: start failed" in err and "goes on" in err
    store = RunStore(str(tmp_path / "store"), "default", "down")
    with store.stage_writer("iter-000/rl") as w:
        tracker.log_step({"step": 0, "reward": 0.5})
        tracker.before_commit(w, {"steps": 1})
        w.commit({"steps": 1})
    tracker.close()
    assert store.validate("iter-000/rl", deep=True).files[0].path.startswith("tensorboard/")
