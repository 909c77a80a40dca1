"""`benchmarks/rloop_vs_rl.py --smoke` runs the science benchmark's whole path on a few RL steps: both runs
through `rloop run`, the per-seed, mean and paired tables, the Figure-1 PNG, the docs section between
its markers, and the RESULT line (the numbers themselves mean nothing at this size)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import base_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_prints_tables_figure_docs_and_result(tmp_path):
    docs = tmp_path / "science.md"
    docs.write_text("# Science\n\nhand-written intro\n\n<!-- rloop_vs_rl:begin -->\nold\n<!-- rloop_vs_rl:end -->\n"
                    "\nhand-written outro\n")
    proc = subprocess.run([sys.executable, "benchmarks/rloop_vs_rl.py", "--smoke", "--store", str(tmp_path / "store"),
                           "--docs", str(docs)], cwd=ROOT, env=base_env(tmp_path / "cache"), capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for title in ("## Per seed", "## Mean ± sd over seeds [0]"):
        assert title in out
    for row in ("| 0 | base P_0 |", "| 0 | vanilla RL |", "| 0 | RLoop |", "| 0 | RLoop − vanilla |",
                "| RLoop − vanilla (paired) |"):
        assert row in out, out
    assert "heldout pass@4" in out and "coverage" in out and "RL steps" in out
    result = out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in result.removeprefix("RESULT ").split())
    assert result.startswith("RESULT ") and fields["seeds"] == "1" and fields["k"] == "4"
    assert fields["goal_met"] in ("true", "false")
    for key in ("avg_gain", "passk_gain", "rloop_passk", "base_passk"):
        assert re.fullmatch(r"-?\d+\.\d{4}", fields[key]), result
    figure = tmp_path / "rloop_vs_rl_smoke.png"
    assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 10_000
    text = docs.read_text()
    assert "hand-written intro" in text and "hand-written outro" in text and "\nold\n" not in text
    assert "`python benchmarks/rloop_vs_rl.py --smoke`" in text and "| 0 | RLoop |" in text and "](rloop_vs_rl_smoke.png)" in text
    # a second run resumes every committed run instead of redoing it
    again = subprocess.run([sys.executable, "benchmarks/rloop_vs_rl.py", "--smoke", "--store", str(tmp_path / "store")],
                           cwd=ROOT, env=base_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == result
