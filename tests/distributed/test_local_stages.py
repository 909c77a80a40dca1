"""`rloop run` with NPROC_PER_NODE=2: the rl and rft stages each start two workers (rloop.launch, torch
elastic, gloo) under ZeRO-3, rank 0 commits what all of them produced, and the saved policies are plain
`save_pretrained` checkpoints. A worker's input error keeps its exit code through the launcher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rloop.contracts import EXIT_INVALID_INPUT, RUN_MANIFEST_FILE_ENV
from tests.helpers import base_env, small_doc

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def _rloop(*args: str, env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rloop", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _summary(run_dir: Path, stage_id: str) -> dict:
    return json.loads((run_dir / stage_id / "_COMMIT.json").read_text())["summary"]


def test_rloop_run_with_two_processes_per_training_stage(tmp_path):
    from transformers import AutoModelForCausalLM

    doc = small_doc("dist-local", iterations=1, eval_base=False)
    spec = doc["spec"]
    spec["model"]["tiny"].update(warmupSteps=200, warmupLr=0.002)
    spec["loop"]["rl"].update(steps=2, promptsPerStep=4, samplesPerPrompt=8, microBatchSize=5)
    spec["loop"]["rft"].update(maxSteps=3, batchSize=5, microBatchSize=2)
    spec["loop"]["distributed"] = {"zeroStage": 3, "timeoutSeconds": 120}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = base_env(tmp_path / "cache") | {"NPROC_PER_NODE": "2"}
    proc = _rloop("run", str(path), "--store", str(tmp_path / "store"), "--no-report", env=env)
    assert proc.returncode == 0, _explain(proc)
    assert proc.stderr.count("starts 2 worker(s), world size 2") == 2, _explain(proc)  # rl and rft

    run_dir = tmp_path / "store" / "default" / "dist-local"
    rl = _summary(run_dir, "iter-000/rl")
    assert rl["processes"] == 2
    assert rl["trajectories"] == 2 * 4 * 8  # every process's samples, pooled by rank 0
    rft = _summary(run_dir, "iter-000/rft")
    assert rft["processes"] == 2
    assert rft["expert_trajectories"] > 0 and rft["steps"] == 3  # (seeded: 6 experts from 13 correct)
    init = AutoModelForCausalLM.from_pretrained(run_dir / "base/init/policy")
    for stage in ("iter-000/rl/final", "iter-000/rft/policy"):
        policy = AutoModelForCausalLM.from_pretrained(run_dir / stage)  # plain from_pretrained, no DeepSpeed
        same = all(a.equal(b) for a, b in zip(policy.parameters(), init.parameters(), strict=True))
        assert not same, f"{stage} equals the initial policy"
    assert rft["nll_after"] < rft["nll_before"]


def test_a_workers_input_error_is_the_stage_exit_code(tmp_path):
    """Both workers are handed a run manifest file that does not exist (exit 2 each); the launcher exits
    2, which the Job's podFailurePolicy reads as "do not retry", not torchrun's 1."""
    env = base_env(tmp_path / "cache") | {"NPROC_PER_NODE": "2", RUN_MANIFEST_FILE_ENV: str(tmp_path / "missing.json")}
    proc = _rloop("stage", "rl", "--run", str(tmp_path / "nothing" / "default" / "none"), "--iteration", "0",
                  env=env, timeout=180)
    assert proc.returncode == EXIT_INVALID_INPUT, _explain(proc)
    assert "starts 2 worker(s)" in proc.stderr and "missing.json: cannot be read" in proc.stderr
