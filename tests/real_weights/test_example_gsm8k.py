"""examples/gsm8k-smollm2-cpu.yaml runs end to end through `rloop run` on the real SmolLM2 weights.

The example itself takes minutes (see its header); the test runs the same file with fewer tokens and
prompts, changing only sizes, so the path a newcomer takes (chat template, math verifier, RL, filter,
RFT, eval, report) is exercised in about a minute and a half."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.real_weights.conftest import ROOT, cpu_example_run_file

pytestmark = [pytest.mark.real_weights, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

SMALLER = {
    "loop": {"rl": {"steps": 1, "maxResponseTokens": 32}, "eval": {"maxResponseTokens": 32}},
}


def test_cpu_gsm8k_example_runs_on_real_weights(smollm2_dir, tmp_path):
    run_file = cpu_example_run_file(smollm2_dir, tmp_path, SMALLER)
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "rloop", "run", str(run_file), "--store", str(store)], cwd=ROOT,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished in" in proc.stdout
    run_dir = store / "default" / "gsm8k-smollm2-cpu"
    for stage in ("base/init", "base/eval/gsm8k", "iter-000/rl", "iter-000/verify", "iter-000/rft",
                  "iter-000/eval/gsm8k"):
        assert (run_dir / stage / "_COMMIT.json").is_file(), stage
    metrics = json.loads((run_dir / "iter-000/eval/gsm8k/metrics.json").read_text())
    assert metrics["num_prompts"] == 4 and 0.0 <= metrics["avg_at_n"] <= 1.0
    assert (run_dir / "report" / "report.md").is_file()
