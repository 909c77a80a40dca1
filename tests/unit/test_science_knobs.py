"""The pieces the science benchmark needs (issue: RLoop vs vanilla RL in miniature): the in-distribution and
validation splits of subset-sum, their spec checks, the adaptive RL horizon's rule, the pool window and
the accumulated expert set, and the report's RL-step accounting and vanilla-RL row."""

from __future__ import annotations

from typing import Any

import pytest

from rloop.data.synthetic import _bucket_of, _sorted_key, make_split
from rloop.evaluate import horizon_reached
from rloop.plan import Stage, dependencies
from rloop.report import collect, find_baseline, iteration_table, rl_budget
from rloop.spec import FilterSpec, SpecError, parse_run
from rloop.stages.verify import accumulate, select_experts
from rloop.store import RunStore
from tests.helpers import deep_merge
from tests.report_fixtures import finished_run

BASE_SPEC: dict[str, Any] = {
    "model": {"base": "builtin:tiny"},
    "data": {
        "train": {"synthetic": {"size": 32, "seed": 5}},
        "eval": [{"name": "heldout", "synthetic": {"split": "heldout", "size": 16}}],
    },
}


def doc(patch: dict[str, Any] | None = None, name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "metadata": {"name": name},
            "spec": deep_merge(BASE_SPEC, patch or {})}


def error(patch: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_run(doc(patch))
    return str(info.value)


INDIST = {"name": "indist", "synthetic": {"split": "indist", "size": 16, "seed": 5}}
VALIDATION = {"name": "val", "synthetic": {"split": "validation", "size": 8}, "samplesPerPrompt": 8}


# ------------------------------------------------------------------------------------------ splits
def test_indist_reuses_train_digit_lists_but_never_a_train_prompt():
    train = make_split("train", 32, seed=5)
    indist = make_split("indist", 48, seed=5, train_size=32)
    train_lists = {e.extra["digits"] for e in train}
    assert len(indist) == len({e.prompt for e in indist}) == 48
    assert {e.extra["digits"] for e in indist} <= train_lists
    assert not {e.prompt for e in indist} & {e.prompt for e in train}
    assert make_split("indist", 48, seed=5, train_size=32) == indist  # reproducible


def test_indist_needs_train_size_and_has_a_finite_size():
    with pytest.raises(ValueError, match="train_size"):
        make_split("indist", 4, seed=0)
    with pytest.raises(ValueError, match="has only .* distinct prompts"):
        make_split("indist", 10_000, seed=0, train_size=2)


def test_validation_split_is_its_own_bucket():
    split = {name: make_split(name, 64, seed=1) for name in ("train", "heldout", "validation")}
    multisets = {name: {_sorted_key(e.extra["digits"]) for e in ex} for name, ex in split.items()}
    assert not multisets["validation"] & (multisets["train"] | multisets["heldout"])
    assert {_bucket_of(m) for m in multisets["validation"]} == {3}


# ------------------------------------------------------------------------------------------ spec
def test_indist_train_size_is_filled_in_from_the_train_set():
    run = parse_run(doc({"data": {"eval": [INDIST]}}))
    assert run.spec.data.eval[0].synthetic.train_size == 32


def test_indist_with_another_seed_names_the_field():
    msg = error({"data": {"eval": [{**INDIST, "synthetic": {"split": "indist", "seed": 6}}]}})
    assert "spec.data.eval[0].synthetic.seed" in msg and "same seed" in msg


def test_indist_with_another_train_size_names_the_field():
    msg = error({"data": {"eval": [{**INDIST, "synthetic": {"split": "indist", "seed": 5, "trainSize": 64}}]}})
    assert "trainSize" in msg and "drop trainSize" in msg


def test_validation_set_may_not_be_a_test_set():
    msg = error({"data": {"validation": {**VALIDATION, "name": "heldout"}}})
    assert "spec.data.validation.name" in msg and "rename it" in msg


def test_adaptive_horizon_needs_validation_and_every_steps():
    msg = error({"loop": {"rl": {"adaptiveHorizon": {"patience": 2}}}})
    assert "spec.loop.rl.adaptiveHorizon" in msg and "data.validation" in msg and "everySteps" in msg
    msg = error({"data": {"validation": VALIDATION},
                 "loop": {"eval": {"kList": [1, 8]}, "rl": {"adaptiveHorizon": {"patience": 2}}}})
    assert "spec.loop.rl.adaptiveHorizon" in msg and "everySteps" in msg
    ok = parse_run(doc({"data": {"validation": VALIDATION},
                        "loop": {"eval": {"everySteps": 5, "kList": [1, 8]}, "rl": {"adaptiveHorizon": {"k": 8}}}}))
    assert ok.spec.loop.rl.adaptive_horizon.patience == 3  # the default


def test_adaptive_horizon_k_is_bounded_by_validation_samples():
    msg = error({"data": {"validation": VALIDATION},
                 "loop": {"eval": {"everySteps": 5, "kList": [1, 8]}, "rl": {"adaptiveHorizon": {"k": 16}}}})
    assert "adaptiveHorizon.k" in msg and "samplesPerPrompt is 8" in msg


def test_validation_samples_bound_the_k_list():
    msg = error({"data": {"validation": {**VALIDATION, "samplesPerPrompt": 4}}, "loop": {"eval": {"kList": [1, 8]}}})
    assert "data.validation.samplesPerPrompt" in msg


def test_pool_window_inside_the_iteration():
    msg = error({"loop": {"rl": {"steps": 10}, "filter": {"fromStep": 10}}})
    assert "spec.loop.filter.fromStep" in msg and "at most 9" in msg


def test_accumulate_makes_verify_wait_for_the_previous_expert_set():
    spec = parse_run(doc({"loop": {"filter": {"accumulate": True}}})).spec
    assert dependencies(spec, Stage("verify", 1)) == [Stage("rl", 1), Stage("verify", 0)]
    assert dependencies(spec, Stage("verify", 0)) == [Stage("rl", 0)]
    plain = parse_run(doc()).spec
    assert dependencies(plain, Stage("verify", 1)) == [Stage("rl", 1)]


# ------------------------------------------------------------------------------------------ horizon
@pytest.mark.parametrize(("history", "patience", "stop"), [
    ([0.5], 1, False),                     # nothing to compare yet
    ([0.5, 0.6], 1, False),                # improved
    ([0.5, 0.6, 0.6], 1, True),            # a tie is no improvement
    ([0.5, 0.6, 0.55, 0.58], 2, True),     # two evaluations below the best
    ([0.5, 0.6, 0.55, 0.61], 2, False),    # a new best inside the window
    ([0.7, 0.6, 0.65], 2, True),           # never better than the start
])
def test_horizon_reached(history, patience, stop):
    assert horizon_reached(history, patience) is stop


def test_horizon_rejects_zero_patience():
    with pytest.raises(ValueError):
        horizon_reached([1.0], 0)


# ------------------------------------------------------------------------------------------ experts
def _row(pid: str, response: str, step: int, correct: bool = True) -> dict:
    return {"prompt_id": pid, "prompt": pid, "response": response, "correct": correct, "finish_reason": "stop",
            "step": step}


def test_pool_window_keeps_only_later_steps():
    pool = [_row("a", "1", 0), _row("a", "2", 3), _row("b", "3", 1), _row("b", "4", 2, correct=False)]
    experts, stats = select_experts(pool, FilterSpec(from_step=2))
    assert sorted(r["response"] for r in experts) == ["2"]
    assert stats["pool_trajectories"] == 4 and stats["window_trajectories"] == 2
    assert stats["union_coverage"] == 1.0  # over the whole RL run: in the window b is unsolved (0.5)
    everything, _ = select_experts(pool, FilterSpec())
    assert sorted(r["response"] for r in everything) == ["1", "2", "3"]


def test_accumulate_adds_only_new_distinct_experts():
    earlier = [_row("a", "12", 0), _row("b", "3", 0)]
    new = [_row("a", "12 ", 5), _row("a", "21", 5)]
    assert [r["response"] for r in accumulate(earlier, new, dedup=True)] == ["12", "3", "21"]
    assert len(accumulate(earlier, new, dedup=False)) == 4


# ------------------------------------------------------------------------------------------ report
def _fake_run(root, name: str, mode: str, steps_run: list[int]) -> RunStore:
    """A run's committed manifests as the stages would leave them (no model needed); spec budget 6 steps."""
    return finished_run(root, name, mode, tuple(steps_run), rl_steps=6)


def test_report_counts_rl_steps_as_they_ran(tmp_path):
    data = collect(_fake_run(tmp_path, "short", "rloop", [6, 2, 6]))  # iteration 1 ended early
    assert data["iteration_end_step"] == {0: 6, 1: 8, 2: 14}
    assert rl_budget(data) == 14
    assert [r["global_step"] for r in data["rl_steps"]][5:9] == [6, 7, 8, 9]
    assert [(r["iteration"], r["global_step"]) for r in data["rl_evals"]] == [(0, 0), (0, 6), (1, 6), (1, 8),
                                                                               (2, 8), (2, 14)]


def test_rloop_table_gets_the_vanilla_row_of_a_run_beside_it(tmp_path):
    rloop_store = _fake_run(tmp_path, "tiny", "rloop", [6, 6])
    assert find_baseline(rloop_store) is None  # nothing beside it yet
    _fake_run(tmp_path, "other-budget", "rl", [6])  # another budget: not comparable
    vanilla_store = _fake_run(tmp_path, "tiny-rl", "rl", [6, 6])
    found = find_baseline(rloop_store)
    assert found is not None and found.uri == vanilla_store.uri
    assert find_baseline(vanilla_store) is None  # only an RLoop run looks for a baseline
    table = iteration_table(collect(rloop_store), collect(found))
    lines = table.splitlines()
    assert lines[0].startswith("| policy | RL steps |")
    assert lines[-1].startswith("| vanilla RL (tiny-rl), end | 12 |")
    assert "| 0.510 |" in lines[-1]  # its last iteration's heldout avg@16
    assert [line.split(" | ")[1] for line in lines[2:-1]] == ["0", "6", "12"]
