"""tests/promharness.py against Debian's real Prometheus: scraping a local /metrics, PromQL, rules, promtool.

Skipped, with the reason, when Prometheus is not installed (`make prometheus`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tests.promharness import (
    SKIP_REASON,
    Prometheus,
    PrometheusError,
    find_prometheus,
    promtool_check_rules,
    require_prometheus,
)
from tests.s3harness import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

JOB = "demo"
RULES = {
    "groups": [
        {
            "name": "demo",
            "rules": [
                {"record": "job:my_gauge:sum", "expr": "sum by (job) (my_gauge)"},
                {
                    "alert": "MyGaugeHigh",
                    "expr": "my_gauge > 40",
                    "labels": {"severity": "warning"},
                    "annotations": {"summary": "my_gauge is {{ $value }}"},
                },
            ],
        }
    ]
}


class Exporter:
    """A /metrics endpoint on 127.0.0.1 with its own registry: one gauge, one counter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauge = Gauge("my_gauge", "A gauge for the harness test.", registry=self.registry)
        self.counter = Counter("my_counter", "A counter for the harness test.", registry=self.registry)
        self.port = free_ports(1)[0]
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    exp = Exporter()
    exp.gauge.set(42)
    try:
        yield exp
    finally:
        exp.stop()


@pytest.fixture(scope="module")
def prom(exporter: Exporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    require_prometheus()
    tmp = tmp_path_factory.mktemp("prom")
    rules = tmp / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES, sort_keys=False))
    t0 = time.monotonic()
    # workdir under pytest's tmp: config, TSDB and prometheus.log outlive the server for a post-mortem.
    with Prometheus.start({JOB: [exporter.address]}, rule_files=[rules], workdir=tmp / "server") as server:
        print(f"\nPrometheus ready at {server.url} in {time.monotonic() - t0:.2f}s (log {server.log_path})")
        yield server


def value(samples: list[dict]) -> float:
    assert len(samples) == 1, samples
    return float(samples[0]["value"][1])


def test_target_up_and_gauge(prom: Prometheus, exporter: Exporter) -> None:
    (target,) = prom.wait_for_targets_up(timeout=15)
    assert target["labels"] == {"job": JOB, "instance": exporter.address}
    assert target["scrapeUrl"] == f"http://{exporter.address}/metrics"
    assert value(prom.wait_for_data(f'up{{job="{JOB}"}}', timeout=15)) == 1
    samples = prom.wait_for_data("my_gauge", timeout=15)
    assert samples[0]["metric"] == {"__name__": "my_gauge", "job": JOB, "instance": exporter.address}
    assert value(samples) == 42


def test_counter_rate(prom: Prometheus, exporter: Exporter) -> None:
    # rate() needs two samples in its window, and sees an increase only between two scrapes: have 0
    # scraped twice first, then increment.
    assert value(prom.wait_for_data("rate(my_counter_total[10s]) == 0", timeout=15)) == 0
    exporter.counter.inc(10)
    assert value(prom.wait_for_data("my_counter_total == 10", timeout=15)) == 10
    rate = value(prom.wait_for_data("rate(my_counter_total[10s]) > 0", timeout=15))
    # One step of 10 seen by ≥ 2 samples at 1 s: per-second rate over the 10 s window, extrapolated a
    # little at the edges, so well within (0, 10].
    assert 0 < rate <= 10
    assert value(prom.query("increase(my_counter_total[10s])")) > 0


def test_bad_expression_raises_prometheus_message(prom: Prometheus) -> None:
    with pytest.raises(PrometheusError, match="bad_data.*parse error") as err:
        prom.query("sum by (job (my_gauge)")
    print(err.value)
    with pytest.raises(PrometheusError, match="parse error"):
        prom.wait_for_data("rate(my_counter_total)", timeout=15)  # raises at once, not after the timeout


def test_rules_loaded_and_evaluated(prom: Prometheus) -> None:
    loaded = {r["name"]: r for r in prom.rules()}
    assert set(loaded) == {"job:my_gauge:sum", "MyGaugeHigh"}
    assert loaded["job:my_gauge:sum"]["type"] == "recording"
    assert loaded["MyGaugeHigh"]["type"] == "alerting"
    assert value(prom.wait_for_data("job:my_gauge:sum", timeout=15)) == 42
    firing = prom.wait_for_data('ALERTS{alertname="MyGaugeHigh"}', timeout=15)
    assert firing[0]["metric"]["alertstate"] == "firing"  # no `for:`, so it fires at its first evaluation
    assert all(r["health"] == "ok" for r in prom.rules())


def test_down_target_is_reported_not_waited_on_forever(tmp_path: Path) -> None:
    require_prometheus()
    nothing = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    with Prometheus.start({"nothing": [nothing]}, workdir=tmp_path / "server") as server:
        assert value(server.wait_for_data('up{job="nothing"}', timeout=15)) == 0
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="connection refused"):
            server.wait_for_targets_up(timeout=1)
        assert time.monotonic() - t0 < 5
    assert (tmp_path / "server" / "prometheus.log").read_text()  # the caller's workdir is kept


def test_promtool_accepts_valid_rules_and_rejects_invalid(tmp_path: Path) -> None:
    require_prometheus()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(RULES, sort_keys=False))
    check = promtool_check_rules(good)
    assert check.returncode == 0 and "SUCCESS: 2 rules found" in check.stdout, check.stdout + check.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum by (job (x)"}]}]})
    )
    check = promtool_check_rules(bad)
    assert check.returncode != 0 and "parse error" in check.stdout + check.stderr, check


def test_missing_prometheus_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLOOP_PROMETHEUS", str(tmp_path / "no-such-prometheus"))
    assert find_prometheus() is None
    with pytest.raises(pytest.skip.Exception, match="make prometheus") as skipped:
        require_prometheus()
    assert str(skipped.value.msg) == SKIP_REASON
