"""rloop.status: `rloop status` / `rloop runs` from commit manifests and attempt records."""

from __future__ import annotations

import json
import subprocess
import sys

from rloop import attempts
from rloop.cli import main
from rloop.spec import parse_run
from rloop.status import columns, find_runs, headline, run_status, runs_table, status_table
from rloop.store import RunStore
from tests.helpers import small_doc


def make_run(root, name="st", **kw) -> RunStore:
    store = RunStore(str(root), "default", name)
    store.write_spec(parse_run(small_doc(name, iterations=1, **kw)).to_wire())
    return store


def commit(store: RunStore, stage_id: str, summary: dict) -> None:
    with store.stage_writer(stage_id) as w:
        w.put_bytes("x.txt", b"x")
        w.commit(summary)


def attempt(store, stage_id, started, *, ended=None, code=None, outcome=None, pid=None, progress=None):
    rec = attempts.AttemptRecord(store, stage_id, started)
    if pid is not None:
        rec.attempt.pid = pid
    rec.attempt.progress = progress
    if ended is not None:
        rec.attempt.ended, rec.attempt.exit_code, rec.attempt.outcome = ended, code, outcome
    rec._write()


def test_states_attempts_durations_and_metrics(tmp_path):
    store = make_run(tmp_path)
    commit(store, "base/init", {"warmup_last_loss": 1.5, "cache": "miss"})
    attempt(store, "base/init", 1000.0, ended=1012.0, code=0, outcome="committed")
    commit(store, "base/eval/heldout", {"n": 4, "avg_at_n": 0.25, "pass_at_k": {"1": 0.25, "4": 0.5}})
    # no attempt record (committed by an older rloop): still Succeeded, attempts and duration unknown
    attempt(store, "iter-000/rl", 1020.0, ended=1030.0, code=1, outcome="failed")
    attempt(store, "iter-000/rl", 1031.0, progress="iter 0 rl: 3/4 steps (75%) reward=0.500 | 9s elapsed")
    st = run_status(store)
    rows = {r.stage: r for r in st.stages}
    assert (rows["base/init"].state, rows["base/init"].attempts, rows["base/init"].seconds) == ("Succeeded", 1, 12.0)
    assert rows["base/init"].metrics == "warmup_loss=1.500 cache=miss"
    assert (rows["base/eval/heldout"].state, rows["base/eval/heldout"].attempts) == ("Succeeded", 0)
    assert rows["iter-000/rl"].state == "Running" and rows["iter-000/rl"].attempts == 2
    assert rows["iter-000/rl"].metrics == "3/4 steps (75%) reward=0.500 | 9s elapsed"
    assert rows["iter-000/verify"].state == "Waiting"
    assert st.state == "Running" and (st.done, st.total) == (2, 6)
    assert st.eval_headline == ("heldout", 4, "base", 0.5)

    table = status_table(st)
    assert "State:   Running, 2/6 stages committed, running: iter-000/rl\n" in table
    assert "Held-out: pass@4 0.500 on heldout (base)" in table
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("STAGE"))
    assert lines[header].split() == ["STAGE", "STATE", "ATTEMPTS", "DURATION", "METRICS"]
    init = lines[header + 1]
    assert init.split()[:4] == ["base/init", "Succeeded", "1", "12s"]
    # columns line up: every row's STATE starts where the header's does
    col = lines[header].index("STATE")
    assert all(line[col - 3:col] == "   " and line[col] != " " for line in lines[header + 1:])


def test_a_vanished_process_is_lost_and_a_failed_attempt_is_an_error_or_a_failure(tmp_path):
    store = make_run(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    attempt(store, "base/init", 1000.0, pid=int(dead.stdout))
    st = run_status(store)
    assert st.stages[0].state == "Lost" and st.state == "Pending"

    attempt(store, "base/init", 1001.0, ended=1002.0, code=1, outcome="failed")
    st = run_status(store)
    assert (st.stages[0].state, st.stages[0].metrics, st.state) == ("Failed", "failed (exit 1)", "Error")
    attempt(store, "base/init", 1003.0, ended=1004.0, code=2, outcome="invalid input")
    assert run_status(store).state == "Failed"


def test_a_finished_run_and_its_json(tmp_path, capsys):
    store = make_run(tmp_path, "done")
    summaries = {
        "base/init": {}, "base/eval/heldout": {"n": 4, "avg_at_n": 0.1, "pass_at_k": {"4": 0.3}},
        "iter-000/rl": {"train_reward_last10pct": 0.5, "pass_rate_last10pct": 0.5, "steps": 4},
        "iter-000/verify": {"expert_trajectories": 7, "union_coverage": 0.25},
        "iter-000/rft": {"nll_before": 1.25, "nll_after": 1.0, "steps": 4},
        "iter-000/eval/heldout": {"n": 4, "avg_at_n": 0.2, "pass_at_k": {"1": 0.2, "4": 0.4}},
    }
    for sid, summary in summaries.items():
        commit(store, sid, summary)
    st = run_status(store)
    assert st.state == "Succeeded" and st.eval_headline == ("heldout", 4, "iter 0", 0.4)
    metrics = {r.stage: r.metrics for r in st.stages}
    assert metrics["iter-000/verify"] == "experts=7 coverage=0.250"
    assert metrics["iter-000/rft"] == "nll=1.250->1.000 steps=4"
    assert metrics["iter-000/rl"] == "reward=0.500 pass_rate=0.500 steps=4"
    assert main(["status", store.base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["done"], out["total"], out["finished"], out["next"], out["state"]) == (6, 6, True, [], "Succeeded")
    assert set(out["stages"].values()) == {"committed"}


def test_runs_lists_every_run_of_a_store(tmp_path, capsys):
    done = make_run(tmp_path, "a")
    commit(done, "base/eval/heldout", {"n": 4, "avg_at_n": 0.1, "pass_at_k": {"1": 0.1, "4": 0.375}})
    attempt(done, "base/eval/heldout", 100.0, ended=110.0, code=0, outcome="committed")
    make_run(tmp_path, "b", mode="rl")
    other = RunStore(str(tmp_path), "team", "c")
    other.write_spec(parse_run(small_doc("c", iterations=1)).to_wire())
    (tmp_path / "_cache" / "tiny-abc").mkdir(parents=True)  # the base-model cache is not a run
    broken = RunStore(str(tmp_path), "default", "z")
    broken.write_text("spec.json", "{not json")
    assert [s.base.rsplit("/", 2)[-2:] for s in find_runs(str(tmp_path))] == [
        ["default", "a"], ["default", "b"], ["default", "z"], ["team", "c"]]
    assert [s.uri.rsplit("/", 1)[-1] for s in find_runs(str(tmp_path), "team")] == ["c"]

    assert main(["runs", "--store", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "MODE", "STATE", "STAGES", "HELD-OUT", "PASS@K", "AGE"]
    row = dict(zip(["ns", "name"], lines[1].split()[:2], strict=True))
    assert row == {"ns": "default", "name": "a"}
    assert "0.375 (pass@4 heldout, base)" in lines[1] and "1/6" in lines[1]
    assert lines[2].split()[:5] == ["default", "b", "rl", "Pending", "0/4"]
    assert lines[3].split()[:4] == ["default", "z", "?", "Invalid"]
    assert "default/z: unreadable spec.json" in captured.err
    assert main(["runs", "--store", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["heldout"] == {"set": "heldout", "k": 4, "policy": "base", "pass_at_k": 0.375}
    assert main(["runs", "--store", str(tmp_path / "empty")]) == 0
    assert "No runs in" in capsys.readouterr().err


def test_headline_and_columns_are_pure():
    assert headline("eval", {"n": 8, "avg_at_n": 0.5, "pass_at_k": {"1": 0.5, "16": 0.9, "8": 0.8}}) == \
        "avg@8=0.500 pass@16=0.900"
    assert headline("rl", {"steps": 20, "stopped_early": True}) == "reward=- pass_rate=- steps=20 stopped_early"
    assert columns(["A", "LONG"], [["xyz", "1"], ["q", ""]]) == "A     LONG\nxyz   1\nq"
    assert runs_table([]) .splitlines()[0].startswith("NAMESPACE")
