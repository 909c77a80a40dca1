"""The operator's metrics (rendered text parsed back with prometheus_client's own parser) and the
/metrics + /healthz server on a free local port."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from rloop_operator.conditions import CONDITION_TYPES
from rloop_operator.metrics import OperatorMetrics, RunState, start_server

PER_RUN_GAUGES = {
    "rloop_run_iteration": ("iteration", 2),
    "rloop_run_stages_committed": ("stages_committed", 5),
    "rloop_run_stages": ("stages_total", 9),
    "rloop_run_train_reward": ("train_reward", 0.5),
    "rloop_run_eval_avg_at_n": ("eval_avg_at_n", 0.25),
    "rloop_run_eval_pass_at_k": ("eval_pass_at_k", 0.75),
    "rloop_run_last_activity_timestamp_seconds": ("last_activity", 1.7e9),
}


def samples(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) → value."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def named(found, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


def three_runs() -> OperatorMetrics:
    m = OperatorMetrics()
    full = {attr: v for attr, v in PER_RUN_GAUGES.values()}
    m.set_run(("ns", "a"), RunState(frozenset({"Ready", "Succeeded"}), stage="Finished", **full))
    m.set_run(("ns", "b"), RunState(frozenset({"Progressing"})))
    m.set_run(("other", "c"), RunState(frozenset({"Progressing", "Suspended"}), stage="iter-000/rl"))
    return m


def test_runs_are_counted_by_namespace_and_condition() -> None:
    found = samples(three_runs().render())
    runs = named(found, "rloop_runs")
    assert len(runs) == 2 * len(CONDITION_TYPES)  # every condition, zeros included, per namespace
    expected = {
        "ns": {"Ready": 1, "Progressing": 1, "Succeeded": 1, "Failed": 0, "Suspended": 0},
        "other": {"Ready": 0, "Progressing": 1, "Succeeded": 0, "Failed": 0, "Suspended": 1},
    }
    for ns, counts in expected.items():
        for condition, n in counts.items():
            assert value(found, "rloop_runs", namespace=ns, condition=condition) == n


def test_per_run_gauges_are_present_only_when_set() -> None:
    found = samples(three_runs().render())
    for name, (_, v) in PER_RUN_GAUGES.items():
        assert named(found, name) == {frozenset({("namespace", "ns"), ("run", "a")}): v}, name
    assert value(found, "rloop_run_stage_info", namespace="ns", run="a", stage="Finished") == 1
    assert value(found, "rloop_run_stage_info", namespace="other", run="c", stage="iter-000/rl") == 1
    assert len(named(found, "rloop_run_stage_info")) == 2  # run b has no stage
    for run, ns, true in [("a", "ns", {"Ready", "Succeeded"}), ("b", "ns", {"Progressing"})]:
        for c in CONDITION_TYPES:
            assert value(found, "rloop_run_condition", namespace=ns, run=run, condition=c) == (c in true)


def test_counters_histograms_and_queue_depth() -> None:
    m = three_runs()
    m.stage_attempts.labels("ns", "a", "rl").inc(2)
    m.stage_failures.labels("ns", "a", "rl").inc()
    m.stage_duration.labels("ns", "rl", "Succeeded").observe(42)
    m.queue_depth = lambda: 3.0
    found = samples(m.render())
    assert value(found, "rloop_stage_attempts_total", namespace="ns", run="a", stage="rl") == 2
    assert value(found, "rloop_stage_failures_total", namespace="ns", run="a", stage="rl") == 1
    hist = {"namespace": "ns", "stage": "rl", "outcome": "Succeeded"}
    assert value(found, "rloop_stage_duration_seconds_count", **hist) == 1
    assert value(found, "rloop_stage_duration_seconds_bucket", **hist, le="30.0") == 0
    assert value(found, "rloop_stage_duration_seconds_bucket", **hist, le="60.0") == 1
    assert value(found, "rloop_workqueue_depth") == 3
    assert value(found, "process_resident_memory_bytes") > 0


def test_forget_run_drops_the_runs_series_and_counter_children_only() -> None:
    m = three_runs()
    for run in ("a", "b"):
        m.stage_attempts.labels("ns", run, "init").inc()
        m.stage_failures.labels("ns", run, "eval").inc()
    m.stage_duration.labels("ns", "init", "Failed").observe(1)
    m.forget_run(("ns", "a"))
    m.forget_run(("ns", "never-seen"))  # harmless
    found = samples(m.render())
    assert not [k for k in found if ("run", "a") in k[1]]
    assert value(found, "rloop_stage_attempts_total", namespace="ns", run="b", stage="init") == 1
    assert value(found, "rloop_stage_failures_total", namespace="ns", run="b", stage="eval") == 1
    assert value(found, "rloop_run_condition", namespace="ns", run="b", condition="Progressing") == 1
    assert value(found, "rloop_runs", namespace="ns", condition="Succeeded") == 0  # a no longer counts
    assert (
        value(found, "rloop_stage_duration_seconds_count", namespace="ns", stage="init", outcome="Failed")
        == 1
    )
    assert set(m.snapshot()) == {("ns", "b"), ("other", "c")}


@pytest.mark.asyncio
async def test_metrics_and_health_endpoints() -> None:
    metrics = three_runs()
    health = [(True, "ok")]
    runner, port = await start_server(metrics, lambda: health[0], "127.0.0.1", 0)
    try:
        assert port > 0
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
                found = samples(await resp.text())
            assert value(found, "rloop_runs", namespace="ns", condition="Succeeded") == 1
            assert value(found, "rloop_run_train_reward", namespace="ns", run="a") == 0.5

            async with session.get(f"{base}/healthz") as resp:
                assert (resp.status, await resp.text()) == (200, "ok\n")
            health[0] = (False, "reconcile workers stopped")
            async with session.get(f"{base}/healthz") as resp:
                assert (resp.status, await resp.text()) == (503, "reconcile workers stopped\n")

            async with session.get(f"{base}/other") as resp:
                assert resp.status == 404
            async with session.post(f"{base}/metrics") as resp:
                assert resp.status == 405
    finally:
        await runner.cleanup()
