"""End to end through the real CLI: `rloop run` runs every stage as a subprocess on a small config
derived from examples/tiny.yaml, resumes after SIGKILL/Ctrl-C without redoing committed stages,
re-runs a stage whose committed output was corrupted, rejects bad input with exit 2, and works
against a real S3 API (SeaweedFS, see tests/s3harness.py).

Every local run shares one store root, so the tiny base model is built once (`<store>/_cache/`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from rloop.plan import Stage, all_stages, plan
from rloop.spec import parse_run
from rloop.store import MANIFEST, RunStore
from tests.helpers import base_env, small_doc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 180  # one small run takes well under a minute on 2 cores
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ helpers
def write_doc(doc: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def rloop(*args: str, env: dict[str, str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rloop", *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def stage_ids(doc: dict) -> list[str]:
    return [s.id for s in all_stages(parse_run(doc).spec)]


def manifests(run_dir: Path) -> dict[str, str]:
    """stage id -> the raw text of its commit manifest."""
    return {str(p.parent.relative_to(run_dir)): p.read_text() for p in run_dir.rglob(MANIFEST)}


def started(proc: subprocess.CompletedProcess) -> list[str]:
    """Stage ids the runner started, in order, from its `[ i/N] <stage>` lines; every stage must have
    exited 0 (a committed stage that then crashed would show as `exited N; retrying`)."""
    assert " exited " not in proc.stderr and "(attempt " not in proc.stderr, explain(proc)
    return re.findall(r"^\[\s*\d+/\d+\] (\S+)$", proc.stderr, flags=re.M)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll `cond()` until truthy (returned) or fail; stops early when `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"runner exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def stage_child(runner: subprocess.Popen, kind: str) -> psutil.Process | None:
    """The runner's `rloop stage <kind>` child, once it has exec'd."""
    try:
        children = psutil.Process(runner.pid).children()
    except psutil.NoSuchProcess:
        return None
    for c in children:
        try:
            cmd = c.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if "stage" in cmd and kind in cmd:
            return c
    return None


def gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # reparented and not reaped yet: dead all the same
    except psutil.NoSuchProcess:
        return True


def start_run(cfg: Path, store: Path, env: dict[str, str], logs: Path, **kw) -> subprocess.Popen:
    """`rloop run` in the background; output to files (a full pipe would block it). SIGINT as in a
    terminal: a test run started in the background by a non-interactive shell inherits SIGINT ignored,
    and so would `rloop run` (Python installs no KeyboardInterrupt handler then)."""
    out, err = open(logs.with_suffix(".out"), "w"), open(logs.with_suffix(".err"), "w")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "rloop", "run", str(cfg), "--store", str(store)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            **kw,
        )
    finally:
        out.close()
        err.close()


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, path
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("local-run")


@pytest.fixture(scope="module")
def store_root(work) -> Path:
    return work / "store"


@pytest.fixture(scope="module")
def env(work) -> dict[str, str]:
    return base_env(work / "cache")


@pytest.fixture(scope="module")
def full_runs(work, store_root, env):
    """The small config run to completion in mode rloop (A) and mode rl (B)."""
    out = {}
    for key, name, mode in (("A", "small", "rloop"), ("B", "small-rl", "rl")):
        doc = small_doc(name, mode=mode)
        cfg = write_doc(doc, work / f"{name}.yaml")
        t0 = time.monotonic()
        proc = rloop("run", cfg, "--store", store_root, env=env)
        assert proc.returncode == 0, explain(proc)
        out[key] = {
            "doc": doc,
            "cfg": cfg,
            "proc": proc,
            "dir": store_root / "default" / name,
            "seconds": time.monotonic() - t0,
        }
    return out


# ------------------------------------------------------------------------------------------ 1. full runs
def test_full_rloop_run_commits_every_stage(full_runs, store_root):
    a = full_runs["A"]
    ids = stage_ids(a["doc"])
    assert len(ids) == 10  # init, base eval, 2 x (rl, verify, rft, eval)
    store = RunStore(str(store_root), "default", "small")
    assert store.committed(ids) == set(ids)
    for sid in ids:
        store.validate(sid, deep=True)
    assert plan(parse_run(a["doc"]).spec, store.committed(ids)).finished

    metrics = json.loads((a["dir"] / "iter-001/eval/heldout/metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["num_prompts"] == 16
    assert 0.0 <= metrics["avg_at_n"] <= 1.0
    assert set(metrics["pass_at_k"]) == {"1", "2", "4"}
    assert all(0.0 <= v <= 1.0 for v in metrics["pass_at_k"].values())
    pk = metrics["pass_at_k"]
    assert pk["1"] <= pk["2"] <= pk["4"]

    for k in range(2):
        rows = [
            json.loads(line)
            for line in (a["dir"] / f"iter-{k:03d}/rl/metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert all(0.0 <= r["reward"] <= 1.0 for r in rows)

    report = a["dir"] / "report"
    assert "# RLoop report: small" in (report / "report.md").read_text()
    assert_png(report / "train_reward.png")
    assert_png(report / "eval.png")

    out = a["proc"].stdout
    assert "Run small (rloop) finished" in out and "10 stages run now" in out, explain(a["proc"])
    assert started(a["proc"]) == ids
    assert "| policy |" in out and "heldout pass@4" in out
    for row in ("| P_0 (base) |", "| iter 0 |", "| iter 1 |"):
        assert row in out, out
    assert f"report: {store.uri}/report/report.md" in out
    assert f"report (HTML): {store.uri}/report/report.html" in out and (report / "report.html").is_file()
    # stderr is a pipe, not a terminal: plain progress lines (the first update and the end), no bar
    err = a["proc"].stderr
    for line in ("iter 0 rl: 1/4 steps (25%) reward=", "iter 1 rl: 4/4 steps (100%) reward=",
                 "iter 0 rft: 4/4 steps (100%) nll=", "eval iter-001 heldout: 16/16 prompts (100%)"):
        assert line in err, explain(a["proc"])
    assert "\r" not in err and "\x1b[" not in err


def test_rl_mode_runs_only_rl_and_eval(full_runs, store_root):
    b = full_runs["B"]
    ids = stage_ids(b["doc"])
    assert ids == [
        "base/init",
        "base/eval/heldout",
        "iter-000/rl",
        "iter-000/eval/heldout",
        "iter-001/rl",
        "iter-001/eval/heldout",
    ]
    store = RunStore(str(store_root), "default", "small-rl")
    assert store.committed() == set(ids)
    for sid in ids:
        store.validate(sid, deep=True)
    assert not list(b["dir"].glob("iter-*/verify")) and not list(b["dir"].glob("iter-*/rft"))
    # mode rl evaluates the RL end policy; the base policy came from the shared cache
    assert (
        json.loads((b["dir"] / "iter-001/eval/heldout/metrics.json").read_text())["policy"]
        == "iter-001/rl/final"
    )
    assert json.loads((b["dir"] / "base/init/_COMMIT.json").read_text())["summary"]["cache"] == "hit"
    assert "Run small-rl (rl) finished" in b["proc"].stdout and "n/a (rl)" in b["proc"].stdout


def test_checkpoint_pool_samples_every_saved_checkpoint(full_runs, work, store_root, env):
    """loop.pool.source: checkpoints: the rollout stage samples the train prompts from every checkpoint the
    rl stage saved (one engine, each checkpoint's weights pushed into it), and the pool is those samples."""
    import pyarrow.parquet as pq

    doc = small_doc("from-checkpoints", iterations=1, eval_base=False)
    doc["spec"]["loop"]["pool"] = {"source": "checkpoints", "checkpointEvery": 2, "samplesPerPrompt": 2}
    proc = rloop("run", write_doc(doc, work / "from-checkpoints.yaml"), "--store", store_root, env=env)
    assert proc.returncode == 0, explain(proc)
    ids = stage_ids(doc)
    assert "iter-000/rollout" in ids
    store = RunStore(str(store_root), "default", "from-checkpoints")
    assert store.committed(ids) == set(ids)
    run_dir = store_root / "default" / "from-checkpoints"
    rows = pq.read_table(run_dir / "iter-000/rollout/samples.parquet").to_pylist()
    by_checkpoint: dict[str, int] = {}
    for row in rows:
        by_checkpoint[row["checkpoint"]] = by_checkpoint.get(row["checkpoint"], 0) + 1
    # rl steps 0..3, a checkpoint after every 2nd: two checkpoints, 32 train prompts x 2 samples from each
    assert len(by_checkpoint) == 2 and set(by_checkpoint.values()) == {32 * 2}, by_checkpoint
    assert {row["step"] for row in rows} == {int(c.removeprefix("step-")) for c in by_checkpoint}
    summary = json.loads((run_dir / "iter-000/rollout/_COMMIT.json").read_text())["summary"]
    assert summary["checkpoints"] == 2 and summary["samples"] == len(rows)


def test_report_compares_two_runs(full_runs, env):
    a, b = full_runs["A"], full_runs["B"]
    md = a["dir"] / "report" / "report.md"
    md.unlink()
    proc = rloop("report", a["dir"], b["dir"], env=env)
    assert proc.returncode == 0, explain(proc)
    md_line, html_line = proc.stdout.strip().splitlines()[-2:]
    assert md_line.endswith("report/report.md") and html_line.endswith("report/report.html"), proc.stdout
    text = md.read_text()
    assert "# RLoop report: small, small-rl" in text
    assert "## small (mode `rloop`" in text and "## small-rl (mode `rl`" in text
    assert "| vanilla RL (small-rl), end | 8 |" in text  # the RLoop table's baseline row, at its RL budget
    # `rloop run` of the finished RLoop run (make demo after make demo-rl) finds the baseline beside it itself
    again = rloop("run", a["cfg"], "--store", a["dir"].parent.parent, "--no-report", env=env)
    assert again.returncode == 0 and "0 stages run now" in again.stdout, explain(again)
    assert "| vanilla RL (small-rl), end | 8 |" in again.stdout, again.stdout
    assert_png(a["dir"] / "report" / "figure1.png")
    assert_png(a["dir"] / "report" / "train_reward.png")
    assert_png(a["dir"] / "report" / "eval.png")


def test_evals_during_rl_adaptive_horizon_and_accumulated_experts(full_runs, work, store_root, env):
    """loop.eval.everySteps writes the held-out curve during RL (test sets and the validation set), the
    adaptive horizon ends an iteration by the rule on the validation pass@k it recorded, the in-distribution
    split evaluates like any set, and an accumulated expert set holds the previous iteration's."""
    from rloop.evaluate import horizon_reached

    doc = small_doc("science", iterations=2, eval_base=False)
    s = doc["spec"]
    s["data"]["eval"].append({"name": "indist", "samplesPerPrompt": 4,
                              "synthetic": {"task": "subset-sum", "split": "indist", "size": 8, "seed": 0}})
    s["data"]["validation"] = {"name": "val", "samplesPerPrompt": 4,
                               "synthetic": {"task": "subset-sum", "split": "validation", "size": 8}}
    s["loop"]["eval"]["everySteps"] = 2
    s["loop"]["rl"]["adaptiveHorizon"] = {"patience": 1, "k": 4}
    s["loop"]["filter"] |= {"accumulate": True, "fromStep": 1}
    proc = rloop("run", write_doc(doc, work / "science.yaml"), "--store", store_root, env=env)
    assert proc.returncode == 0, explain(proc)
    run_dir = store_root / "default" / "science"
    budget = 0
    for k in range(2):
        summary = json.loads((run_dir / f"iter-{k:03d}/rl/_COMMIT.json").read_text())["summary"]
        steps = [json.loads(x)["step"] for x in (run_dir / f"iter-{k:03d}/rl/metrics.jsonl").read_text().splitlines()]
        evals = [json.loads(x) for x in (run_dir / f"iter-{k:03d}/rl/evals.jsonl").read_text().splitlines()]
        assert summary["steps"] == len(steps) and summary["steps_budget"] == 4
        assert summary["stopped_early"] is (len(steps) < 4)
        assert sorted({(e["set"], e["role"]) for e in evals}) == [("heldout", "test"), ("indist", "test"),
                                                                   ("val", "validation")]
        assert [e["step"] for e in evals if e["set"] == "heldout"] == list(range(0, len(steps) + 1, 2))
        watched = [e["pass_at_4_watched"] for e in evals if e["role"] == "validation"]
        # it stopped exactly where the rule first said so, and ran on while it did not
        firsts = [i for i in range(1, len(watched) + 1) if horizon_reached(watched[:i], 1)]
        assert (firsts[0] if firsts else None) == (len(watched) if summary["stopped_early"] else None)
        budget += len(steps)
    assert json.loads((run_dir / "iter-001/eval/indist/metrics.json").read_text())["num_prompts"] == 8
    first = json.loads((run_dir / "iter-000/verify/stats.json").read_text())
    second = json.loads((run_dir / "iter-001/verify/stats.json").read_text())
    assert second["earlier_expert_trajectories"] == first["expert_trajectories"]
    assert second["expert_trajectories"] >= first["expert_trajectories"]
    assert f"| iter 1 | {budget} |" in proc.stdout, proc.stdout  # RL steps as they ran
    assert_png(run_dir / "report" / "figure1.png")


# ------------------------------------------------------------------------------------------ 5. status
def test_status_prints_done_total_next(full_runs, env):
    proc = rloop("status", full_runs["A"]["dir"], "--json", env=env)
    assert proc.returncode == 0, explain(proc)
    st = json.loads(proc.stdout)
    assert (st["done"], st["total"], st["next"], st["finished"], st["mode"]) == (10, 10, [], True, "rloop")
    assert set(st["stages"].values()) == {"committed"}
    # every stage process recorded its attempt: one each, with a wall time
    assert {a["attempts"] for a in st["attempts"].values()} == {1}
    assert all(a["seconds"] > 0 for a in st["attempts"].values())
    # the table: one row per stage with state, attempts, duration and its headline figures
    table = rloop("status", full_runs["A"]["dir"], env=env).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines()[table.splitlines().index(
        next(line for line in table.splitlines() if line.startswith("STAGE"))) + 1:]}
    assert set(rows) == set(st["stages"]) and all(r[1:3] == ["Succeeded", "1"] for r in rows.values())
    assert rows["iter-000/verify"][4].startswith("experts=") and rows["iter-001/rft"][4].startswith("nll=")
    assert "State:   Succeeded, 10/10 stages committed" in table
    # by manifest file, with the store from the manifest's storage.uri / --store
    proc = rloop("status", full_runs["B"]["cfg"], "--store", full_runs["B"]["dir"].parent.parent, "--json", env=env)
    assert proc.returncode == 0, explain(proc)
    assert json.loads(proc.stdout)["total"] == 6
    # `rloop runs` lists both, with their state and the latest held-out pass@k
    runs = rloop("runs", "--store", full_runs["A"]["dir"].parent.parent, env=env)
    assert runs.returncode == 0, explain(runs)
    listed = {line.split()[1]: line for line in runs.stdout.splitlines()[1:]}
    a_name = full_runs["A"]["dir"].name
    assert "Succeeded" in listed[a_name] and "10/10" in listed[a_name] and "(pass@" in listed[a_name]


# ------------------------------------------------------------------------------------------ 2. resume
def test_sigkill_mid_stage_then_resume_redoes_nothing(work, store_root, env):
    doc = small_doc("resume", mode="rl", iterations=1)
    cfg = write_doc(doc, work / "resume.yaml")
    run_dir = store_root / "default" / "resume"
    runner = start_run(cfg, store_root, env, work / "resume-1")
    try:
        child = wait_for(lambda: stage_child(runner, "rl"), 120, "the iter-000/rl stage to start", runner)
        # the stage has recorded its attempt (rloop.attempts) before it loads anything
        wait_for(lambda: list((run_dir / "_attempts" / "iter-000" / "rl").glob("*.json")), 60,
                 "the iter-000/rl attempt record", runner)
        before = manifests(run_dir)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        # PR_SET_PDEATHSIG: the stage does not outlive the runner
        wait_for(lambda: gone(child), 20, f"stage child {child.pid} to die after the runner was killed")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert set(before) == {"base/init", "base/eval/heldout"}
    assert not (run_dir / "iter-000/rl" / MANIFEST).exists()

    st = json.loads(rloop("status", run_dir, "--json", env=env).stdout)
    assert (st["done"], st["total"], st["next"], st["finished"]) == (2, 4, ["iter-000/rl"], False)
    # the killed stage's attempt record has no end and its process is gone
    assert st["attempts"]["iter-000/rl"]["state"] == "Lost" and st["state"] == "Pending"

    proc = rloop("run", cfg, "--store", store_root, "--no-report", env=env)
    assert proc.returncode == 0, explain(proc)
    assert started(proc) == ["iter-000/rl", "iter-000/eval/heldout"]
    assert "2 stages run now" in proc.stdout
    after = manifests(run_dir)
    assert set(after) == set(stage_ids(doc))
    for sid, text in before.items():
        assert after[sid] == text, f"{sid} was redone"
    store = RunStore(str(store_root), "default", "resume")
    for sid in after:
        store.validate(sid, deep=True)


def test_ctrl_c_exits_130_then_resume(work, store_root, env):
    doc = small_doc("interrupt", mode="rl", iterations=1, eval_base=False)
    cfg = write_doc(doc, work / "interrupt.yaml")
    run_dir = store_root / "default" / "interrupt"
    logs = work / "interrupt-1"
    runner = start_run(cfg, store_root, env, logs, start_new_session=True)
    try:
        child = wait_for(lambda: stage_child(runner, "rl"), 120, "the iter-000/rl stage to start", runner)
        os.killpg(runner.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        rc = runner.wait(timeout=60)
        wait_for(lambda: gone(child), 20, "the interrupted stage to exit")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    err = logs.with_suffix(".err").read_text()
    assert rc == 130, err[-4000:]
    assert "interrupted; committed stages are kept, run the same command to resume" in err
    before = manifests(run_dir)
    assert set(before) == {"base/init"}

    proc = rloop("run", cfg, "--store", store_root, "--no-report", env=env)
    assert proc.returncode == 0, explain(proc)
    assert started(proc) == ["iter-000/rl", "iter-000/eval/heldout"]
    assert "2 stages run now" in proc.stdout
    after = manifests(run_dir)
    assert set(after) == set(stage_ids(doc)) and after["base/init"] == before["base/init"]


# ------------------------------------------------------------------------------------------ 3. corrupt
def test_corrupt_policy_is_invalidated_and_rerun(full_runs, work, store_root, env):
    src = full_runs["A"]
    run_dir = store_root / "default" / "small-corrupt"
    shutil.copytree(src["dir"], run_dir)
    doc = copy.deepcopy(src["doc"])
    doc["metadata"]["name"] = "small-corrupt"
    cfg = write_doc(doc, work / "small-corrupt.yaml")
    before = manifests(run_dir)

    weights = run_dir / "iter-000/rft/policy/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    uri = str(run_dir)
    # A committed stage exits 0 without reading anything: the corrupt policy is found by a consumer that
    # still has to run, so take the eval's commit away as if it had never finished.
    proc = rloop("stage", "eval", "--run", uri, "--iteration", "0", "--set", "heldout", env=env)
    assert proc.returncode == 0 and "already committed" in proc.stderr, explain(proc)
    (run_dir / "iter-000/eval/heldout" / MANIFEST).unlink()
    proc = rloop("stage", "eval", "--run", uri, "--iteration", "0", "--set", "heldout", env=env)
    assert proc.returncode == 75, explain(proc)
    assert "corrupt input" in proc.stderr and "model.safetensors" in proc.stderr
    rft = run_dir / "iter-000/rft"
    assert (rft / f"{MANIFEST}.corrupt").exists() and not (rft / MANIFEST).exists()

    spec = parse_run(doc).spec
    store = RunStore(str(store_root), "default", "small-corrupt")
    committed = store.committed(stage_ids(doc))
    assert "iter-000/rft" not in committed
    assert Stage("rft", 0) in plan(spec, committed).ready

    proc = rloop("run", cfg, "--store", store_root, "--no-report", env=env)
    assert proc.returncode == 0, explain(proc)
    rerun = ["iter-000/rft", "iter-000/eval/heldout"]
    assert started(proc) == rerun and "2 stages run now" in proc.stdout
    after = manifests(run_dir)
    assert set(after) == set(before)
    old, new = json.loads(before["iter-000/rft"]), json.loads(after["iter-000/rft"])
    assert new["created"] > old["created"]
    assert {k: v for k, v in after.items() if k not in rerun} == {k: v for k, v in before.items() if k not in rerun}
    for sid in after:
        store.validate(sid, deep=True)


# ------------------------------------------------------------------------------------------ 4. bad input
def test_unknown_field_is_rejected_with_its_path(work, store_root, env):
    doc = small_doc("typo")
    doc["spec"]["loop"]["rl"]["promptsPerStepp"] = 4
    cfg = write_doc(doc, work / "typo.yaml")
    proc = rloop("run", cfg, "--store", store_root, env=env, timeout=60)
    assert proc.returncode == 2, explain(proc)
    assert "spec.loop.rl.promptsPerStepp: unknown field" in proc.stderr
    assert not (store_root / "default" / "typo").exists()
    proc = rloop("validate", cfg, env=env, timeout=60)
    assert proc.returncode == 2 and "promptsPerStepp" in proc.stderr


def test_stage_without_iteration_exits_2(full_runs, env):
    proc = rloop("stage", "rl", "--run", full_runs["A"]["dir"], env=env, timeout=60)
    assert proc.returncode == 2, explain(proc)
    assert "needs --iteration" in proc.stderr
    proc = rloop("stage", "eval", "--run", full_runs["A"]["dir"], "--iteration", "0", env=env, timeout=60)
    assert proc.returncode == 2 and "needs --set" in proc.stderr


def test_train_file_without_answer_field_exits_2(full_runs, work, store_root, env):
    bad = work / "bad-train.jsonl"
    bad.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(4))
    )
    doc = small_doc("badfile", iterations=1)
    s = doc["spec"]
    s["model"] = {"base": str(full_runs["A"]["dir"] / "base/init/policy")}  # a saved tiny policy
    s["verifier"] = {"name": "exact"}
    s["data"] = {"train": {"path": str(bad)}, "eval": []}
    cfg = write_doc(doc, work / "badfile.yaml")

    # the runner commits init, then the rl stage rejects the data: no retries, the run fails
    proc = rloop("run", cfg, "--store", store_root, "--no-report", env=env)
    assert proc.returncode != 0, explain(proc)
    assert "stage iter-000/rl rejected its input" in proc.stderr, explain(proc)
    assert "(attempt 2)" not in proc.stderr
    run_dir = store_root / "default" / "badfile"
    assert (run_dir / "base/init" / MANIFEST).exists()

    proc = rloop("stage", "rl", "--run", run_dir, "--iteration", "0", env=env)
    assert proc.returncode == 2, explain(proc)
    assert "data.train" in proc.stderr and "'answer'" in proc.stderr and "answerKey" in proc.stderr
    assert not (run_dir / "iter-000/rl" / MANIFEST).exists()


def test_changing_an_immutable_field_is_rejected(full_runs, work, store_root, env):
    doc = copy.deepcopy(full_runs["A"]["doc"])
    doc["spec"]["loop"]["rl"]["lr"] = 0.01
    cfg = write_doc(doc, work / "small-lr.yaml")
    spec_before = (full_runs["A"]["dir"] / "spec.json").read_text()
    proc = rloop("run", cfg, "--store", store_root, env=env, timeout=60)
    assert proc.returncode == 2, explain(proc)
    assert "spec.loop.rl.lr changed since run 'small' started" in proc.stderr
    assert (full_runs["A"]["dir"] / "spec.json").read_text() == spec_before


def test_more_iterations_runs_only_the_new_stages(full_runs, work, store_root, env):
    src = full_runs["B"]
    run_dir = store_root / "default" / "small-rl-more"
    shutil.copytree(src["dir"], run_dir)
    before = manifests(run_dir)
    doc = copy.deepcopy(src["doc"])
    doc["metadata"]["name"] = "small-rl-more"
    doc["spec"]["loop"]["iterations"] = 3
    cfg = write_doc(doc, work / "small-rl-more.yaml")
    proc = rloop("run", cfg, "--store", store_root, "--no-report", env=env)
    assert proc.returncode == 0, explain(proc)
    assert started(proc) == ["iter-002/rl", "iter-002/eval/heldout"]
    assert "2 stages run now" in proc.stdout and "| iter 2 |" in proc.stdout
    after = manifests(run_dir)
    assert set(after) - set(before) == {"iter-002/rl", "iter-002/eval/heldout"}
    assert all(after[k] == v for k, v in before.items())
    assert json.loads((run_dir / "spec.json").read_text())["spec"]["loop"]["iterations"] == 3


# ------------------------------------------------------------------------------------------ 6. S3
@pytest.fixture
def s3_env(seaweedfs, work) -> dict[str, str]:
    return {**base_env(work / "s3-cache"), **seaweedfs.env()}


def test_run_against_s3(seaweedfs, s3_env, work, monkeypatch):
    import s3fs

    prefix = f"runs-{uuid.uuid4().hex[:8]}"
    root = f"s3://{seaweedfs.bucket}/{prefix}"
    doc = small_doc("s3run", iterations=1)
    cfg = write_doc(doc, work / "s3run.yaml")
    proc = rloop("run", cfg, "--store", root, env=s3_env)
    assert proc.returncode == 0, explain(proc)
    assert "Run s3run (rloop) finished" in proc.stdout and "| iter 0 |" in proc.stdout
    assert f"report: {root}/default/s3run/report/report.md" in proc.stdout

    fs = s3fs.S3FileSystem(
        key=seaweedfs.access_key,
        secret=seaweedfs.secret_key,
        endpoint_url=seaweedfs.endpoint,
        client_kwargs={"region_name": "us-east-1"},
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    base = f"{seaweedfs.bucket}/{prefix}/default/s3run"
    found = {p.removeprefix(base + "/").rsplit("/", 1)[0] for p in fs.glob(f"{base}/**/{MANIFEST}")}
    assert found == set(stage_ids(doc))
    assert fs.exists(f"{base}/report/report.md") and fs.exists(f"{base}/spec.json")
    assert fs.cat(f"{base}/report/eval.png").startswith(PNG_MAGIC)
    assert fs.exists(f"{seaweedfs.bucket}/{prefix}/_cache")  # the tiny base model is cached in the store

    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    store = RunStore(root, "default", "s3run")
    for sid in found:
        store.validate(sid, deep=True)

    st = rloop("status", f"{root}/default/s3run", "--json", env=s3_env, timeout=60)
    assert st.returncode == 0, explain(st)
    assert json.loads(st.stdout)["finished"] is True
    assert json.loads(st.stdout)["attempts"]["iter-000/rl"]["attempts"] == 1  # recorded in the bucket too


def test_s3_wrong_credentials_fail_with_a_clear_message(seaweedfs, s3_env, work):
    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key + "x"}
    cfg = write_doc(small_doc("s3denied", iterations=1), work / "s3denied.yaml")
    proc = rloop("run", cfg, "--store", f"s3://{seaweedfs.bucket}/denied", env=env, timeout=90)
    assert proc.returncode != 0, explain(proc)
    assert "AWS_ACCESS_KEY_ID" in proc.stderr and "credentials" in proc.stderr, explain(proc)
    assert "Traceback" not in proc.stderr
