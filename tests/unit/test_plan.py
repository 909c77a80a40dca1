"""The planner: the exact DAG walk per mode, variants, resume from any prefix, policy paths."""

from __future__ import annotations

from typing import Any

import pytest

from rloop.plan import Stage, all_stages, dependencies, plan, policy_in, policy_out, rft_init_policy
from rloop.spec import RLoopRunSpec, parse_run
from tests.helpers import deep_merge


def make_spec(patch: dict[str, Any] | None = None, *, sets: tuple[str, ...] = ("heldout",)) -> RLoopRunSpec:
    spec = {
        "mode": "rloop",
        "model": {"base": "builtin:tiny"},
        "data": {
            "train": {"synthetic": {}},
            "eval": [{"name": s, "synthetic": {"split": "heldout"}} for s in sets],
        },
        "loop": {"iterations": 2},
    }
    doc = {
        "apiVersion": "rloop.dev/v1alpha1",
        "kind": "RLoopRun",
        "metadata": {"name": "t"},
        "spec": deep_merge(spec, patch or {}),
    }
    return parse_run(doc).spec


def walk(spec: RLoopRunSpec) -> list[list[str]]:
    """Run everything ready, round after round, from an empty store; the ready sets in order."""
    committed: set[str] = set()
    rounds: list[list[str]] = []
    while True:
        p = plan(spec, committed)
        if p.finished:
            assert p.ready == ()
            assert p.done == p.total == len(committed)
            return rounds
        ids = [s.id for s in p.ready]
        assert ids, f"stuck with {sorted(committed)}"
        assert len(rounds) < 100
        rounds.append(ids)
        committed |= set(ids)


def execution_orders(spec: RLoopRunSpec) -> list[list[str]]:
    """Two full orders: serial (always the first ready stage) and the listed all_stages order."""
    committed: list[str] = []
    while not (p := plan(spec, set(committed))).finished:
        committed.append(p.ready[0].id)
    return [committed, [s.id for s in all_stages(spec)]]


# ---------------------------------------------------------------------------------------- walks
def test_rloop_mode_walk() -> None:
    assert walk(make_spec()) == [
        ["base/init"],
        ["base/eval/heldout", "iter-000/rl"],
        ["iter-000/verify"],
        ["iter-000/rft"],
        ["iter-000/eval/heldout", "iter-001/rl"],
        ["iter-001/verify"],
        ["iter-001/rft"],
        ["iter-001/eval/heldout"],
    ]


def test_rl_mode_walk() -> None:
    assert walk(make_spec({"mode": "rl"})) == [
        ["base/init"],
        ["base/eval/heldout", "iter-000/rl"],
        ["iter-000/eval/heldout", "iter-001/rl"],
        ["iter-001/eval/heldout"],
    ]


def test_pool_from_checkpoints_adds_rollout() -> None:
    assert walk(make_spec({"loop": {"pool": {"source": "checkpoints"}}})) == [
        ["base/init"],
        ["base/eval/heldout", "iter-000/rl"],
        ["iter-000/rollout"],
        ["iter-000/verify"],
        ["iter-000/rft"],
        ["iter-000/eval/heldout", "iter-001/rl"],
        ["iter-001/rollout"],
        ["iter-001/verify"],
        ["iter-001/rft"],
        ["iter-001/eval/heldout"],
    ]


def test_rl_mode_ignores_pool_source() -> None:
    spec = make_spec({"mode": "rl", "loop": {"pool": {"source": "checkpoints"}}})
    assert not any(s.kind in ("rollout", "verify", "rft") for s in all_stages(spec))


def test_rft_from_base_depends_on_init() -> None:
    spec = make_spec({"loop": {"rft": {"initPolicy": "base"}}})
    assert dependencies(spec, Stage("rft", 1)) == [Stage("verify", 1), Stage("init")]
    default = make_spec()
    assert dependencies(default, Stage("rft", 1)) == [Stage("verify", 1), Stage("rft", 0)]
    assert dependencies(default, Stage("rft", 0)) == [Stage("verify", 0), Stage("init")]
    # rl still continues from the previous RFT policy, so the walk itself is unchanged
    assert walk(spec) == walk(default)


def test_eval_base_off() -> None:
    spec = make_spec({"loop": {"eval": {"evalBase": False}}})
    assert "base/eval/heldout" not in {s.id for s in all_stages(spec)}
    assert dependencies(spec, Stage("eval", 0, "heldout")) == [Stage("rft", 0)]
    assert dependencies(spec, Stage("eval", 1, "heldout")) == [Stage("rft", 1), Stage("eval", 0, "heldout")]
    assert walk(spec) == [
        ["base/init"],
        ["iter-000/rl"],
        ["iter-000/verify"],
        ["iter-000/rft"],
        ["iter-000/eval/heldout", "iter-001/rl"],
        ["iter-001/verify"],
        ["iter-001/rft"],
        ["iter-001/eval/heldout"],
    ]


def test_eval_waits_for_previous_eval_of_the_same_set() -> None:
    spec = make_spec(sets=("a", "b"))
    assert dependencies(spec, Stage("eval", 0, "a")) == [Stage("rft", 0), Stage("eval", None, "a")]
    assert dependencies(spec, Stage("eval", 1, "b")) == [Stage("rft", 1), Stage("eval", 0, "b")]
    assert dependencies(spec, Stage("eval", None, "b")) == [Stage("init")]
    committed = {"base/init", "iter-000/rl", "iter-000/verify", "iter-000/rft", "base/eval/a"}
    ready = [s.id for s in plan(spec, committed).ready]
    assert ready == ["base/eval/b", "iter-000/eval/a", "iter-001/rl"]


def test_no_eval_sets() -> None:
    assert walk(make_spec({"mode": "rl"}, sets=())) == [["base/init"], ["iter-000/rl"], ["iter-001/rl"]]


# --------------------------------------------------------------------------------------- resume
SPECS = {
    "rloop": {},
    "rl": {"mode": "rl"},
    "checkpoints": {"loop": {"pool": {"source": "checkpoints"}}},
    "rft-base": {"loop": {"rft": {"initPolicy": "base"}}},
    "no-eval-base": {"loop": {"eval": {"evalBase": False}, "iterations": 3}},
}


@pytest.mark.parametrize("name", list(SPECS))
def test_resume_after_a_crash_at_any_stage(name: str) -> None:
    spec = make_spec(SPECS[name], sets=("a", "b"))
    stages = all_stages(spec)
    for order in execution_orders(spec):
        assert sorted(order) == sorted(s.id for s in stages)
        for n in range(len(order) + 1):
            committed = set(order[:n])
            p = plan(spec, committed)
            ready = {s.id for s in p.ready}
            assert not ready & committed, f"{name}: re-runs committed stages after {order[:n]}"
            assert p.done == n and p.total == len(stages)
            assert p.finished == (n == len(order))
            if n < len(order):
                assert ready, f"{name}: nothing ready after {order[:n]}"
                assert order[n] in ready, f"{name}: order broken at {order[n]}"
            for s in p.ready:
                missing = [d.id for d in dependencies(spec, s) if d.id not in committed]
                assert not missing, f"{name}: {s.id} ready before {missing}"


@pytest.mark.parametrize("name", list(SPECS))
def test_all_stages_is_a_valid_order(name: str) -> None:
    spec = make_spec(SPECS[name], sets=("a", "b"))
    seen: set[Stage] = set()
    for s in all_stages(spec):
        assert set(dependencies(spec, s)) <= seen, s.id
        seen.add(s)
    assert len(seen) == len(all_stages(spec))


def test_unknown_committed_ids_are_ignored() -> None:
    spec = make_spec()
    p = plan(spec, {"base/init", "iter-099/rl", "junk"})
    assert p.done == 1
    assert [s.id for s in p.ready] == ["base/eval/heldout", "iter-000/rl"]


def test_more_iterations_extend_a_finished_run() -> None:
    short, longer = make_spec(), make_spec({"loop": {"iterations": 3}})
    done = {s.id for s in all_stages(short)}
    assert plan(short, done).finished
    p = plan(longer, done)
    assert not p.finished and [s.id for s in p.ready] == ["iter-002/rl"]


# ---------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("name", list(SPECS))
def test_stage_ids_round_trip(name: str) -> None:
    for s in all_stages(make_spec(SPECS[name], sets=("a", "b"))):
        assert Stage.from_id(s.id) == s


def test_stage_ids_and_cli_args() -> None:
    assert Stage("init").id == "base/init"
    assert Stage("eval", None, "heldout").id == "base/eval/heldout"
    assert Stage("rl", 12).id == "iter-012/rl"
    assert Stage("eval", 3, "gsm8k").id == "iter-003/eval/gsm8k"
    assert Stage("init").cli_args() == []
    assert Stage("eval", None, "a").cli_args() == ["--set", "a"]
    assert Stage("eval", 3, "a").cli_args() == ["--iteration", "3", "--set", "a"]
    assert Stage("rft", 1).cli_args() == ["--iteration", "1"]


@pytest.mark.parametrize("bad", ["", "base", "iter-000/train", "a/b/c/d", "base/init/x/y"])
def test_bad_stage_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="not a stage id"):
        Stage.from_id(bad)


def test_finished_only_at_the_end() -> None:
    spec = make_spec()
    order = [s.id for s in all_stages(spec)]
    flags = [plan(spec, set(order[:n])).finished for n in range(len(order) + 1)]
    assert flags == [False] * len(order) + [True]


# -------------------------------------------------------------------------------------- policies
def test_policy_paths_rloop_mode() -> None:
    spec = make_spec()
    assert policy_in(spec, 0) == "base/init/policy"
    assert policy_out(spec, 0) == "iter-000/rft/policy"
    assert policy_in(spec, 1) == "iter-000/rft/policy"
    assert policy_out(spec, 1) == "iter-001/rft/policy"
    assert rft_init_policy(spec, 0) == "base/init/policy"
    assert rft_init_policy(spec, 1) == "iter-000/rft/policy"
    assert dependencies(spec, Stage("rl", 1)) == [Stage("rft", 0)]
    assert dependencies(spec, Stage("verify", 1)) == [Stage("rl", 1)]


def test_policy_paths_rft_from_base() -> None:
    spec = make_spec({"loop": {"rft": {"initPolicy": "base"}}})
    assert rft_init_policy(spec, 0) == rft_init_policy(spec, 1) == "base/init/policy"
    assert policy_in(spec, 1) == "iter-000/rft/policy"


def test_policy_paths_rl_mode() -> None:
    spec = make_spec({"mode": "rl"})
    assert policy_in(spec, 0) == "base/init/policy"
    assert policy_out(spec, 0) == "iter-000/rl/final"
    assert policy_in(spec, 1) == "iter-000/rl/final"
    assert policy_out(spec, 1) == "iter-001/rl/final"
    assert dependencies(spec, Stage("rl", 1)) == [Stage("rl", 0)]
    assert dependencies(spec, Stage("eval", 1, "heldout")) == [Stage("rl", 1), Stage("eval", 0, "heldout")]


def test_checkpoint_pool_dependencies() -> None:
    spec = make_spec({"loop": {"pool": {"source": "checkpoints"}}})
    assert dependencies(spec, Stage("rollout", 0)) == [Stage("rl", 0)]
    assert dependencies(spec, Stage("verify", 0)) == [Stage("rollout", 0)]
