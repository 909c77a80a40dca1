"""The operator metrics behind the dashboard's newer panels, through real reconcile passes: expert-set
size and RFT loss per iteration (from the verify and rft summaries), retries, and evictions."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from rloop_operator.jobs import view_job
from rloop_operator.metrics import OperatorMetrics, RunState
from rloop_operator.reconcile import iteration_figures
from tests.unit.operator.test_controller import KEY, NAME, NOW, NS, FakeApi, controller, run_object
from tests.unit.operator.test_controller import sample as sample_of

SUMMARIES: dict[str, dict[str, Any]] = {
    "rl": {"train_reward_last10pct": 0.5},
    "verify": {"expert_trajectories": 12},
    "rft": {"expert_trajectories": 12, "nll_before": 1.75, "nll_after": 0.5},
    "eval": {"avg_at_n": 0.25, "pass_at_k": {"1": 0.25}},
}


def kind_of(job: dict[str, Any]) -> str:
    return job["metadata"]["labels"]["rloop.dev/stage"].split(".")[1]


def open_jobs(api: FakeApi) -> list[str]:
    return [n for n, j in api.jobs.items() if "status" not in j]


def run_to_the_end(api: FakeApi, c: Any, per_kind: dict[str, dict[str, Any]]) -> None:
    """Finish every Job the controller creates with its kind's summary until none is left."""
    c.reconcile(KEY)
    for _ in range(20):
        jobs = open_jobs(api)
        if not jobs:
            return
        for name in jobs:
            api.finish(name, ok=True, message=json.dumps(per_kind.get(kind_of(api.jobs[name]), {})))
        c.reconcile(KEY)
    raise AssertionError(f"the run did not finish: {sorted(api.jobs)}")


def test_verify_and_rft_summaries_become_per_iteration_gauges() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    run_to_the_end(api, c, SUMMARIES)
    assert {kind_of(j) for j in api.jobs.values()} >= {"verify", "rft"}
    labels = {"namespace": NS, "run": NAME, "iteration": "0"}
    assert sample_of(metrics, "rloop_run_expert_trajectories", **labels) == 12
    assert sample_of(metrics, "rloop_run_rft_loss_before", **labels) == 1.75
    assert sample_of(metrics, "rloop_run_rft_loss", **labels) == 0.5

    # Jobs deleted (TTL, by hand): the figures stay as last seen; deleting the run drops them.
    api.jobs.clear()
    c.reconcile(KEY)
    assert sample_of(metrics, "rloop_run_expert_trajectories", **labels) == 12
    c.forget(KEY)
    assert sample_of(metrics, "rloop_run_expert_trajectories", run=NAME) is None
    assert sample_of(metrics, "rloop_run_rft_loss", run=NAME) is None


def test_a_summary_without_the_figures_sets_no_series() -> None:
    api = FakeApi(run_object())
    c, metrics = controller(api)
    run_to_the_end(api, c, {"verify": {"expert_trajectories": "many"}, "rft": {"nll_after": float("nan")}})
    assert sample_of(metrics, "rloop_run_expert_trajectories", run=NAME) is None
    assert sample_of(metrics, "rloop_run_rft_loss", run=NAME) is None


def evict(api: FakeApi, name: str) -> None:
    api.finish(name, ok=False, message="")
    failed = api.jobs[name]["status"]["conditions"][0]
    failed |= {
        "reason": "PodFailurePolicy",
        "message": f"Pod {NS}/{name}-x has condition DisruptionTarget matching FailJob rule at index 0",
    }


def test_retries_and_evictions_are_counted_per_run_and_stage_kind() -> None:
    api = FakeApi(run_object(backoff=1))
    clock = [NOW]
    c, metrics = controller(api, clock)
    c.reconcile(KEY)
    init = open_jobs(api)[0]
    counters = ("rloop_stage_retries_total", "rloop_stage_disruptions_total", "rloop_stage_failures_total")
    # The first attempt starts every counter of its run and stage at 0 (so increase() sees the first one).
    assert [sample_of(metrics, n, namespace=NS, run=NAME, stage="init") for n in counters] == [0, 0, 0]

    evict(api, init)
    c.reconcile(KEY)
    assert view_job(api.jobs[init]).failure == "disrupted"
    restarted = open_jobs(api)
    assert restarted == [init.replace("-a0", "-a1")]
    assert sample_of(metrics, "rloop_stage_disruptions_total", namespace=NS, run=NAME, stage="init") == 1
    assert sample_of(metrics, "rloop_stage_retries_total", namespace=NS, run=NAME, stage="init") == 1

    api.finish(restarted[0], ok=False, message="Traceback ...\nValueError: boom")
    clock[0] = NOW + timedelta(minutes=5)  # past the fake Job's end time and the 1 s backoff
    c.reconcile(KEY)
    assert len(open_jobs(api)) == 1
    assert sample_of(metrics, "rloop_stage_retries_total", namespace=NS, run=NAME, stage="init") == 2
    assert sample_of(metrics, "rloop_stage_disruptions_total", namespace=NS, run=NAME, stage="init") == 1
    assert sample_of(metrics, "rloop_stage_attempts_total", namespace=NS, run=NAME, stage="init") == 3

    c.reconcile(KEY)  # nothing new: nothing counted twice
    assert sample_of(metrics, "rloop_stage_retries_total", namespace=NS, run=NAME, stage="init") == 2
    c.forget(KEY)
    assert all(sample_of(metrics, n, run=NAME) is None for n in counters)


def test_the_latest_attempt_of_an_iteration_wins() -> None:
    def job(attempt: int, kind: str, summary: dict[str, Any]) -> Any:
        api = FakeApi(run_object())
        name = f"{NAME}-i1-{kind}-a{attempt}"
        api.jobs[name] = {"metadata": {"name": name, "labels": {
            "rloop.dev/run": NAME, "rloop.dev/stage": f"iter-001.{kind}", "rloop.dev/attempt": str(attempt)}}}
        api.finish(name, ok=True)
        return view_job(api.jobs[name], json.dumps(summary))

    views = [job(1, "verify", {"expert_trajectories": 9}), job(0, "verify", {"expert_trajectories": 3}),
             job(0, "rft", {"nll_before": 2.0})]
    assert iteration_figures(views) == {"expert_trajectories": {1: 9.0}, "rft_loss_before": {1: 2.0}}


def test_per_iteration_gauges_render_with_an_iteration_label() -> None:
    m = OperatorMetrics()
    m.set_run(("ns", "a"), RunState(expert_trajectories={0: 4, 1: 7}, rft_loss={1: 0.25}))
    m.set_run(("ns", "b"), RunState())
    text = m.render().decode()
    assert 'rloop_run_expert_trajectories{iteration="0",namespace="ns",run="a"} 4.0' in text
    assert 'rloop_run_expert_trajectories{iteration="1",namespace="ns",run="a"} 7.0' in text
    assert 'rloop_run_rft_loss{iteration="1",namespace="ns",run="a"} 0.25' in text
    assert 'run="b"' not in text.split("# HELP rloop_run_expert_trajectories")[1].split("# HELP")[0]
