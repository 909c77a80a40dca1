"""`rloop run` with `loop.rollout.engine: vllm` on SmolLM2 (.venv-vllm): examples/gsm8k-smollm2-cpu.yaml
with the engine switched to vllm and sizes cut as in tests/real_weights/test_example_gsm8k.py completes an
RLoop iteration: base eval, rl (two steps, weights pushed into the engine after each), verify, rft, eval,
all committed, with vLLM's figures in the rl stage's step metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.real_weights.conftest import ROOT, cpu_example_run_file
from tests.vllm.conftest import vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.real_weights, pytest.mark.slow, pytest.mark.timeout(900)]

WITH_VLLM = {
    "loop": {
        "rollout": {"engine": "vllm", "vllm": {"maxModelLen": 512}},
        "rl": {"steps": 2, "maxResponseTokens": 32},
        "eval": {"maxResponseTokens": 32},
    },
}


def test_rloop_run_with_the_vllm_engine_completes_an_iteration(smollm2_dir, tmp_path):
    run_file = cpu_example_run_file(smollm2_dir, tmp_path, WITH_VLLM)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    proc = subprocess.run([str(vllm_python()), "-m", "rloop", "run", str(run_file), "--store", str(store)],
                          cwd=ROOT, capture_output=True, text=True, timeout=840, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = store / "default" / "gsm8k-smollm2-cpu"
    for stage in ("base/init", "base/eval/gsm8k", "iter-000/rl", "iter-000/verify", "iter-000/rft",
                  "iter-000/eval/gsm8k"):
        assert (run_dir / stage / "_COMMIT.json").is_file(), stage

    steps = [json.loads(line) for line in (run_dir / "iter-000/rl/metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1]
    shown = ("rollout_tokens_per_s", "time_rollout_s", "time_sync_s", "rollout_logprob_abs_diff",
             "engine_kv_cache_gib", "memory_used_rollout_gib", "memory_used_update_gib")
    print("\nvLLM rl steps: " + json.dumps([{k: s[k] for k in shown} for s in steps]), file=sys.stderr)
    for s in steps:
        assert s["engine_kv_cache_gib"] == pytest.approx(1.0, abs=0.01)  # only the vllm engine reports it
        assert s["time_sync_s"] > 0 and s["rollout_tokens_per_s"] > 0
        # vLLM sampled, the trainer scored the same tokens at the same temperature (fp32 both)
        assert s["rollout_logprob_abs_diff"] < 1e-3, s
        assert s["memory_used_rollout_gib"] > 0.3 and math.isfinite(s["memory_used_update_gib"])
    pool = json.loads((run_dir / "iter-000/verify/_COMMIT.json").read_text())["summary"]
    assert pool["pool_trajectories"] == 2 * 2 * 4, pool  # every vLLM sample of both steps reached the pool
    metrics = json.loads((run_dir / "iter-000/eval/gsm8k/metrics.json").read_text())
    assert metrics["num_prompts"] == 4 and 0.0 <= metrics["avg_at_n"] <= 1.0
