"""Operator settings: defaults, RLOOP_OPERATOR_* parsing, and errors that name the variable."""

from __future__ import annotations

import pydantic
import pytest

from rloop_operator.settings import ENV_PREFIX, OperatorSettings, load_settings


def test_defaults() -> None:
    s = load_settings({})
    assert s == OperatorSettings()
    assert (s.image, s.metrics_host, s.metrics_port) == ("rloop/trainer:0.1.0", "0.0.0.0", 8080)
    assert (s.workers, s.resync_seconds, s.stuck_seconds) == (8, 300.0, 120.0)


def test_every_field_has_a_variable_and_values_are_typed() -> None:
    env = {
        "RLOOP_OPERATOR_IMAGE": "registry.example/trainer:2",
        "RLOOP_OPERATOR_METRICS_HOST": "127.0.0.1",
        "RLOOP_OPERATOR_METRICS_PORT": "0",
        "RLOOP_OPERATOR_WORKERS": "3",
        "RLOOP_OPERATOR_RESYNC_SECONDS": "2.5",
        "RLOOP_OPERATOR_STUCK_SECONDS": "30",
        "RLOOP_OPERATOR_LEADER_ELECTION": "false",
        "RLOOP_OPERATOR_LEASE_NAME": "team-a-rloop",
        "RLOOP_OPERATOR_LEASE_NAMESPACE": "rloop-system",
        "RLOOP_OPERATOR_LEASE_DURATION_SECONDS": "3",
        "RLOOP_OPERATOR_RENEW_DEADLINE_SECONDS": "2",
        "RLOOP_OPERATOR_RETRY_PERIOD_SECONDS": "0.5",
    }
    assert {ENV_PREFIX + f.upper() for f in OperatorSettings.model_fields} == set(env)
    s = load_settings(env)
    assert s.model_dump() == {
        "image": "registry.example/trainer:2",
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "workers": 3,
        "resync_seconds": 2.5,
        "stuck_seconds": 30.0,
        "leader_election": False,
        "lease_name": "team-a-rloop",
        "lease_namespace": "rloop-system",
        "lease_duration_seconds": 3,
        "renew_deadline_seconds": 2.0,
        "retry_period_seconds": 0.5,
    }
    assert isinstance(s.metrics_port, int) and isinstance(s.stuck_seconds, float)


def test_other_variables_are_ignored() -> None:
    env = {"RLOOP_OPERATOR_WORKERS": "2", "rloop_operator_workers": "5", "WORKERS": "6", "RLOOP_X": "y"}
    assert load_settings(env) == OperatorSettings(workers=2)


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLOOP_OPERATOR_WORKERS", "5")
    monkeypatch.setenv("RLOOP_OPERATOR_IMAGE", "env/img:1")
    s = load_settings()
    assert (s.workers, s.image) == (5, "env/img:1")


@pytest.mark.parametrize(
    "name, value",
    [
        ("WORKERS", "0"),
        ("WORKERS", "65"),
        ("WORKERS", "many"),
        ("METRICS_PORT", "http"),
        ("METRICS_PORT", "65536"),
        ("METRICS_PORT", "-1"),
        ("RESYNC_SECONDS", "0"),
        ("RESYNC_SECONDS", "-1"),
        ("RESYNC_SECONDS", ""),
        ("STUCK_SECONDS", "nan"),
        ("IMAGE", ""),
        ("LEADER_ELECTION", "maybe"),
        ("LEASE_NAME", "Not_A_Name"),
        ("LEASE_NAMESPACE", "Bad.Namespace"),
        ("LEASE_DURATION_SECONDS", "0"),
        ("RENEW_DEADLINE_SECONDS", "0"),
    ],
)
def test_a_bad_value_raises_value_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError) as info:
        load_settings({ENV_PREFIX + name: value})
    message = str(info.value)
    assert message.startswith("invalid operator settings: ")
    assert f"RLOOP_OPERATOR_{name}={value!r}: " in message
    assert not isinstance(info.value, pydantic.ValidationError)  # a plain error for the start-up log
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_leader_election_is_on_by_default_with_client_go_timings() -> None:
    s = load_settings({})
    assert s.leader_election is True and (s.lease_name, s.lease_namespace) == ("rloop-operator", "")
    assert (s.lease_duration_seconds, s.renew_deadline_seconds, s.retry_period_seconds) == (15, 10.0, 2.0)


@pytest.mark.parametrize(
    "retry, renew, lease",
    [("2", "10", "10"), ("2", "12", "10"), ("10", "10", "15"), ("3", "2", "15")],
)
def test_leader_timings_must_nest(retry: str, renew: str, lease: str) -> None:
    """retry period < renew deadline < lease duration, or a leader could act after a standby took over."""
    env = {
        "RLOOP_OPERATOR_RETRY_PERIOD_SECONDS": retry,
        "RLOOP_OPERATOR_RENEW_DEADLINE_SECONDS": renew,
        "RLOOP_OPERATOR_LEASE_DURATION_SECONDS": lease,
    }
    with pytest.raises(ValueError, match="RETRY_PERIOD_SECONDS < RLOOP_OPERATOR_RENEW_DEADLINE_SECONDS <"):
        load_settings(env)


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(ValueError) as info:
        load_settings({"RLOOP_OPERATOR_WORKERS": "0", "RLOOP_OPERATOR_METRICS_PORT": "x"})
    assert "RLOOP_OPERATOR_WORKERS='0'" in str(info.value)
    assert "RLOOP_OPERATOR_METRICS_PORT='x'" in str(info.value)


def test_settings_are_frozen_and_closed() -> None:
    s = OperatorSettings()
    with pytest.raises(pydantic.ValidationError):
        s.workers = 2  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="extra"):
        OperatorSettings(threads=2)  # type: ignore[call-arg]
