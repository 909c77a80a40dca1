"""rloop.launch: when `rloop stage` starts workers, and the exit code it reports for them (pure)."""

from __future__ import annotations

import pytest

from rloop.contracts import EXIT_CORRUPT_INPUT, EXIT_INVALID_INPUT, EXIT_STORE_UNAVAILABLE
from rloop.launch import LaunchError, LaunchPlan, exit_code_of, launch_plan


def test_one_process_and_other_kinds_run_in_place():
    assert launch_plan("rl", {}) is None
    assert launch_plan("rl", {"NNODES": "1", "NPROC_PER_NODE": "1"}) is None
    assert launch_plan("eval", {"NPROC_PER_NODE": "4"}) is None  # vLLM spans GPUs itself
    assert launch_plan("rl", {"NPROC_PER_NODE": "4", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}) is None


def test_one_node_of_several_gpus_gets_a_free_local_port():
    plan = launch_plan("rft", {"NPROC_PER_NODE": "4"})
    assert plan is not None and (plan.nnodes, plan.node_rank, plan.nproc_per_node) == (1, 0, 4)
    assert plan.master_addr == "127.0.0.1" and plan.master_port > 0 and plan.world_size == 4
    given = launch_plan("rft", {"NPROC_PER_NODE": "2", "MASTER_PORT": "29511"})
    assert given is not None and given.master_port == 29511


def test_node_rank_falls_back_to_the_job_completion_index():
    env = {"NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_ADDR": "j-0.svc", "JOB_COMPLETION_INDEX": "1"}
    assert launch_plan("rl", env) == LaunchPlan(2, 1, 8, "j-0.svc", 29500)
    assert launch_plan("rl", env | {"NODE_RANK": "0"}) == LaunchPlan(2, 0, 8, "j-0.svc", 29500)


@pytest.mark.parametrize(("env", "names"), [
    ({"NNODES": "2", "NPROC_PER_NODE": "1"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"}, "NODE_RANK=2"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two'"),
    ({"NNODES": "0"}, "NNODES=0"),
])
def test_malformed_env_names_the_variable(env, names):
    with pytest.raises(LaunchError, match=names):
        launch_plan("rl", env)


@pytest.mark.parametrize(("codes", "expected"), [
    ({0: 1, 1: 1}, 1),
    ({0: 1, 1: EXIT_INVALID_INPUT}, EXIT_INVALID_INPUT),  # retrying cannot fix a bad input
    ({1: EXIT_STORE_UNAVAILABLE, 0: EXIT_CORRUPT_INPUT}, EXIT_CORRUPT_INPUT),
    ({1: EXIT_STORE_UNAVAILABLE}, EXIT_STORE_UNAVAILABLE),
    ({0: -9}, 137),  # killed by SIGKILL, as a shell reports it
    ({0: 0, 1: -15}, 143),
])
def test_the_stage_exit_code_of_failed_workers(codes, expected):
    assert exit_code_of(codes) == expected
