"""Every run `benchmarks/rloop_vs_rl.py` would start is a valid RLoopRun, without running any: the seeded
pair differs only where it should, and each ablation changes its knob (a full run takes ~30 minutes, so a
spec error found by it would cost that much)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rloop.spec import parse_run

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("rloop_vs_rl", ROOT / "benchmarks" / "rloop_vs_rl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
TINY = bench.load_yaml(ROOT / "examples" / "tiny.yaml")


def test_seeds_move_every_seed_and_keep_the_demo_at_seed_0():
    assert parse_run(bench.seeded(TINY, 0)).spec == parse_run(TINY).spec  # seed 0 is `make demo`
    spec = parse_run(bench.seeded(TINY, 2)).spec
    assert spec.model.tiny.seed == spec.loop.rl.seed == spec.data.train.synthetic.seed == 2
    assert {s.synthetic.seed for s in spec.data.eval} == {2} and spec.loop.eval.seed == 1236


@pytest.mark.parametrize("name", sorted(bench.ABLATIONS))
def test_each_ablation_is_a_valid_run_that_changes_its_knob(name):
    _, changes = bench.ABLATIONS[name]
    doc = bench.named(bench.ablated(bench.seeded(TINY, 0), changes), f"full-{name}-s0")
    run = parse_run(doc)  # raises SpecError naming the field otherwise
    assert run.spec != parse_run(TINY).spec
    for dotted in changes:
        before = bench.get_path(TINY["spec"], dotted) if _has(TINY, dotted) else None
        assert bench.get_path(doc["spec"], dotted) != before, dotted


def test_ablation_arithmetic():
    doc = bench.ablated(TINY, {"loop.rft.lr": "x3", "loop.rft.maxSteps": "x2", "loop.filter.fromStep": "half"})
    assert doc["spec"]["loop"]["rft"]["lr"] == pytest.approx(3 * TINY["spec"]["loop"]["rft"]["lr"])
    assert doc["spec"]["loop"]["rft"]["maxSteps"] == 2 * TINY["spec"]["loop"]["rft"]["maxSteps"]
    assert doc["spec"]["loop"]["filter"]["fromStep"] == TINY["spec"]["loop"]["rl"]["steps"] // 2


def _has(doc: dict, dotted: str) -> bool:
    try:
        bench.get_path(doc["spec"], dotted)
    except KeyError:
        return False
    return True
