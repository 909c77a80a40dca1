"""`benchmarks/gpu_step.py --smoke` runs end to end without a GPU (tiny model, CPU, float32): both variants
of both phases report finite positive figures, and plain torch and DeepSpeed ZeRO-2 (one process, gloo)
end the same steps from the same weights on the same data with the same response NLL.

Tolerance: 1e-5 on the NLL (float32; the two optimizers only differ in how they flatten and sum the
gradients; seen: 0)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"
NLL_ATOL = 1e-5
FIGURES = ("s_per_step", "tokens_per_s", "peak_gib", "nll")


def _result(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout[-3000:]
    return dict(item.split("=", 1) for item in lines[0].removeprefix("RESULT ").split())


def test_gpu_step_smoke_runs_on_cpu_and_zero2_matches_torch():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env |= {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # the smoke is the CPU path, GPU or not
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = _result(proc.stdout)
    assert "failed" not in result
    assert (result["device"], result["dtype"], result["tokens_per_step"]) == ("cpu", "float32", "512")
    for phase in ("rl", "rft"):
        for variant in ("torch", "zero2"):
            for figure in FIGURES:
                value = float(result[f"{phase}_{variant}_{figure}"])
                assert math.isfinite(value) and value > 0, f"{phase}_{variant}_{figure}={value}"
            assert result[f"{phase}_{variant}_mfu"] == "n/a"  # no MFU without a GPU
            assert math.isfinite(float(result[f"{phase}_{variant}_loss"]))
        torch_nll, zero2_nll = float(result[f"{phase}_torch_nll"]), float(result[f"{phase}_zero2_nll"])
        assert abs(torch_nll - zero2_nll) <= NLL_ATOL, f"{phase}: torch {torch_nll} vs zero2 {zero2_nll}"
        assert float(result[f"{phase}_nll_abs_diff"]) <= NLL_ATOL
        assert float(result[f"{phase}_zero2_vs_torch"]) > 0
    # the table shows both variants' losses and NLLs
    table = [line for line in proc.stdout.splitlines() if line.startswith("| rl") or line.startswith("| rft")]
    assert len(table) == 4 and all("n/a" in line for line in table)
