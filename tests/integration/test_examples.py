"""Every shipped example parses and validates through the CLI; the demo pair is what the README runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rloop.manifests import load_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"tiny.yaml", "tiny-rl.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_validates(path):
    run = load_run(path)
    assert run.kind == "RLoopRun" and run.metadata.name
    proc = subprocess.run(
        [sys.executable, "-m", "rloop", "validate", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f'"name": "{run.metadata.name}"' in proc.stdout


def test_demo_pair_differs_only_in_mode_and_name():
    rloop, rl = load_run(ROOT / "examples/tiny.yaml"), load_run(ROOT / "examples/tiny-rl.yaml")
    assert rloop.spec.mode == "rloop" and rloop.spec.loop.iterations == 3
    assert rl.spec.mode == "rl" and rl.spec.loop.iterations == 3
    assert rloop.spec.model.base == "builtin:tiny"
    assert rl.spec.loop.rl == rloop.spec.loop.rl
    # the same evaluation; only the vanilla run also evaluates during RL (the curve of the Figure-1 plot)
    assert rl.spec.loop.eval.model_copy(update={"every_steps": 0}) == rloop.spec.loop.eval
    assert rl.spec.loop.eval.every_steps > 0
    assert rl.spec.data == rloop.spec.data
    assert rl.spec.model == rloop.spec.model
    assert rl.metadata.name != rloop.metadata.name
    # pass@k up to the held-out samplesPerPrompt (the README table reports pass@16)
    assert max(rloop.spec.loop.eval.k_list) == rloop.spec.data.eval[0].samples_per_prompt
