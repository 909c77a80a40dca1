"""Stage step metrics (rloop.telemetry): off without a port, served and updated with one."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from rloop.telemetry import StageTelemetry
from tests.s3harness import free_ports


def samples(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_disabled_without_port(monkeypatch):
    monkeypatch.delenv("RLOOP_METRICS_PORT", raising=False)
    t = StageTelemetry.from_env("run", "rl")
    assert not t.enabled
    t.observe_step({"step": 1, "reward": 0.5})  # a no-op, not an error


def test_bad_port_value_disables(monkeypatch):
    monkeypatch.setenv("RLOOP_METRICS_PORT", "nine-thousand")
    assert not StageTelemetry.from_env("run", "rl").enabled


def test_serves_latest_step(monkeypatch):
    port = free_ports(1)[0]
    monkeypatch.setenv("RLOOP_METRICS_PORT", str(port))
    t = StageTelemetry.from_env("demo", "rl")
    assert t.enabled
    t.observe_step({"step": 0, "reward": 0.25, "pass_rate": 0.5, "tokens_per_s": 100.0, "time_rollout_s": 0.4})
    t.observe_step({"step": 1, "reward": 0.75, "pass_rate": float("nan"), "rollout_tokens_per_s": 900.0})
    got = samples(port)
    lab = (("run", "demo"), ("stage", "rl"))
    assert got[("rloop_train_step", lab)] == 1
    assert got[("rloop_train_reward", lab)] == 0.75
    assert got[("rloop_train_pass_rate", lab)] == 0.5  # NaN is not exported over the last finite value
    assert got[("rloop_rollout_tokens_per_second", lab)] == 900.0
    assert got[("rloop_train_steps_total", lab)] == 2
    assert got[("rloop_train_phase_seconds", (("phase", "rollout"), *lab))] == 0.4
