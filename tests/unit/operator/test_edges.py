"""Small edge pieces: settings from the environment, pod termination messages, the Job owner of an
event, the /metrics and /healthz server."""

from __future__ import annotations

import aiohttp
import pytest

from rloop.plan import Stage
from rloop_operator.handlers import owner_run
from rloop_operator.jobs import JobView, needs_message, termination_messages
from rloop_operator.metrics import OperatorMetrics, RunState, start_server
from rloop_operator.settings import OperatorSettings, load_settings


# --------------------------------------------------------------------------------------- settings
def test_settings_defaults_and_environment() -> None:
    assert load_settings({}) == OperatorSettings()
    s = load_settings({"RLOOP_OPERATOR_WORKERS": "3", "RLOOP_OPERATOR_IMAGE": "reg/t:1", "UNRELATED": "x"})
    assert (s.workers, s.image, s.metrics_port) == (3, "reg/t:1", 8080)


@pytest.mark.parametrize(
    "env, named",
    [
        ({"RLOOP_OPERATOR_WORKERS": "0"}, "RLOOP_OPERATOR_WORKERS"),
        ({"RLOOP_OPERATOR_METRICS_PORT": "http"}, "RLOOP_OPERATOR_METRICS_PORT"),
        ({"RLOOP_OPERATOR_RESYNC_SECONDS": "-1"}, "RLOOP_OPERATOR_RESYNC_SECONDS"),
    ],
)
def test_bad_setting_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        load_settings(env)


# ---------------------------------------------------------------------------- messages and owners
def pod(
    job: str,
    message: str,
    started: str,
    container: str = "stage",
    label: str = "batch.kubernetes.io/job-name",
):
    return {
        "metadata": {"labels": {label: job}},
        "status": {
            "containerStatuses": [
                {"name": container, "state": {"terminated": {"message": message, "startedAt": started}}}
            ]
        },
    }


def test_termination_messages_take_the_latest_pod_of_each_job() -> None:
    pods = [
        pod("a", "first", "2026-01-01T00:00:00Z"),
        pod("a", "second", "2026-01-01T00:05:00Z"),  # a disruption replaced the first pod
        pod("b", "old-label", "2026-01-01T00:00:00Z", label="job-name"),
        pod("c", "sidecar", "2026-01-01T00:00:00Z", container="istio-proxy"),
        {
            "metadata": {"labels": {"job-name": "d"}},
            "status": {"containerStatuses": [{"name": "stage", "state": {"running": {}}}]},
        },
    ]
    assert termination_messages(pods, "stage") == {"a": "second", "b": "old-label"}


def view(kind: str, state: str) -> JobView:
    return JobView(
        "j",
        Stage(kind, 0 if kind != "init" else None),
        0,
        state,
        False,
        False,  # type: ignore[arg-type]
        None,
        None,
        None,
        None,
        None,
        None,
    )


def test_messages_matter_for_rl_eval_and_failures_only() -> None:
    assert needs_message(view("rl", "Succeeded")) and needs_message(view("verify", "Failed"))
    assert not needs_message(view("init", "Succeeded")) and not needs_message(view("rl", "Running"))


def test_owner_run_of_a_job_event() -> None:
    job = {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x"},
                {"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "name": "demo", "controller": True},
            ]
        }
    }
    assert owner_run(job) == "demo"
    assert owner_run({"metadata": {}}) is None


# --------------------------------------------------------------------------------- metrics server
@pytest.mark.asyncio
async def test_metrics_and_health_endpoints() -> None:
    metrics = OperatorMetrics()
    metrics.set_run(("ns", "a"), RunState(conditions=frozenset({"Ready", "Succeeded"}), train_reward=0.5))
    metrics.set_run(("ns", "b"), RunState(conditions=frozenset({"Progressing"})))
    health = {"ok": True}
    runner, port = await start_server(
        metrics, lambda: (health["ok"], "ok" if health["ok"] else "workers stopped"), "127.0.0.1", 0
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            assert 'rloop_runs{condition="Succeeded",namespace="ns"} 1.0' in text
            assert 'rloop_runs{condition="Progressing",namespace="ns"} 1.0' in text
            assert 'rloop_run_train_reward{namespace="ns",run="a"} 0.5' in text
            assert 'run="b"' in text and 'rloop_run_train_reward{namespace="ns",run="b"}' not in text
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200 and (await resp.text()).strip() == "ok"
            health["ok"] = False
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 503 and "workers stopped" in await resp.text()
        metrics.stage_attempts.labels("ns", "a", "rl").inc()
        metrics.forget_run(("ns", "a"))
        text = metrics.render().decode()
        assert 'run="a"' not in text and 'run="b"' in text
    finally:
        await runner.cleanup()
