"""The Grafana dashboard built as code (rloop.dashboard): the committed JSON is what the module builds,
every metric it queries is one the operator or the stage pods expose, and the panels users asked for
(stage timeline, retries and evictions, expert set and RFT loss per iteration, a row of phases) exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rloop import dashboard, metric_names
from rloop.telemetry import STEP_GAUGES, StageTelemetry
from rloop_operator.metrics import OperatorMetrics, RunState
from tests.s3harness import free_ports

PROMQL_WORDS = {"sum", "max", "by", "rate", "increase", "histogram_quantile"}


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dashboard.build()


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, rows' panels included."""
    return [(p["title"], t["expr"]) for p in dashboard.all_panels(board) for t in p.get("targets") or []]


def metrics_in(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions, aggregation
    keywords, label names (inside {...} or by (...)) or ranges."""
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\bby\s*\([^)]*\)", " ", bare)
    found = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare))
    return found - PROMQL_WORDS


def exposed_names() -> set[str]:
    """Sample names the real operator and stage registries expose with every figure set."""
    m = OperatorMetrics()
    full = RunState(
        frozenset({"Progressing"}), iteration=1, stage="iter-001/rl", stages_committed=3, stages_total=9,
        train_reward=0.5, eval_avg_at_n=0.25, eval_pass_at_k=0.75, last_activity=1.7e9,
        expert_trajectories={0: 12}, rft_loss_before={0: 1.5}, rft_loss={0: 0.5},
    )
    m.set_run(("ns", "a"), full)
    m.stage_created("ns", "a", "rl", attempt=1)
    m.stage_duration.labels("ns", "rl", "Succeeded").observe(3)
    m.reconcile_duration.observe(0.01)
    m.reconcile_errors.inc()
    m.leader.set(1)
    telemetry = StageTelemetry("a", "rl", free_ports(1)[0])
    telemetry.observe_step({key: 1.0 for key, _ in STEP_GAUGES.values()}
                           | {f"time_{p}_s": 0.1 for p in metric_names.PHASES})
    text = m.render().decode() + generate_latest(telemetry.registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def defined_names() -> set[str]:
    """The names rloop.metric_names defines, histograms as their three series."""
    values = {v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)}
    return (values - set(metric_names.HISTOGRAMS)) | {
        h + suffix for h in metric_names.HISTOGRAMS for suffix in metric_names.HISTOGRAM_SUFFIXES
    }


# ------------------------------------------------------------------------------------------ drift
def test_committed_dashboard_is_what_the_module_builds() -> None:
    committed = dashboard.DASHBOARD_PATH.read_text(encoding="utf-8")
    assert committed == dashboard.render(), (
        "charts/rloop/files/dashboard.json is out of date with rloop/dashboard.py; run `make dashboard`"
    )


def test_cli_checks_and_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "dashboard.json"
    monkeypatch.setattr(dashboard, "DASHBOARD_PATH", target)
    stale = json.loads(dashboard.render())
    stale["title"] = "Hand-edited"
    target.write_text(json.dumps(stale, indent=2, sort_keys=True) + "\n")
    assert dashboard.main([]) == 1
    err = capsys.readouterr().err
    assert '-  "title": "Hand-edited",' in err and '+  "title": "RLoop",' in err and "--write" in err

    assert dashboard.main(["--write"]) == 0
    written = target.read_text()
    assert written == dashboard.render() and written.endswith("}\n")
    assert dashboard.main([]) == 0
    assert "up to date" in capsys.readouterr().err


def test_output_is_deterministic_and_sorted() -> None:
    text = dashboard.render()
    assert text == dashboard.render()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


# ------------------------------------------------------------------------------------------ names
def test_every_queried_metric_is_one_the_code_exposes(board: dict[str, Any]) -> None:
    exposed = exposed_names()
    # A variable's `label_values(selector, label)`: the selector is PromQL, the label is not a metric.
    exprs = queries(board) + [
        (f"${v['name']}", re.fullmatch(r"label_values\((.*), *\w+\)", v["query"]).group(1))
        for v in board["templating"]["list"] if v["type"] == "query"
    ]
    for title, expr in exprs:
        used = metrics_in(expr)
        assert used, f"{title}: no metric found in {expr}"
        assert used <= exposed, f"{title}: {sorted(used - exposed)} not exposed by the operator or stages"
        assert used <= defined_names(), f"{title}: {sorted(used - defined_names())} not in rloop.metric_names"


def test_every_defined_name_is_exposed_and_every_exposed_rloop_name_is_defined() -> None:
    exposed, defined = exposed_names(), defined_names()
    assert defined <= exposed, f"defined in rloop.metric_names but never registered: {sorted(defined - exposed)}"
    ours = {n for n in exposed if n.startswith("rloop_") and not n.endswith("_created")}
    assert ours <= defined, f"registered with a name rloop.metric_names lacks: {sorted(ours - defined)}"


def test_the_name_extractor_sees_through_promql() -> None:
    expr = 'histogram_quantile(0.95, sum by (le) (rate(a_bucket{job=~"x"}[5m]))) / b{phase="sync"} - c'
    assert metrics_in(expr) == {"a_bucket", "b", "c"}


# ------------------------------------------------------------------------------------------ layout
def test_identity_variables_and_kept_panels(board: dict[str, Any]) -> None:
    assert (board["uid"], board["title"], board["tags"]) == ("rloop-overview", "RLoop", ["rloop"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "run", "job"]
    assert variables["job"]["hide"] == 2 and variables["run"]["allValue"] == ".*"
    titles = [p["title"] for p in dashboard.all_panels(board)]
    kept = [
        "Runs by condition", "Stage progress", "Iteration", "Current stage", "Stage duration (mean)",
        "Stage attempts and failures (1h)", "Train reward per step", "Held-out avg@n and pass@k", "Tokens/s",
        "RL step phases", "Reconcile latency", "Operator work queue and errors", "Operator memory",
    ]
    assert set(kept) <= set(titles) and len(titles) == len(set(titles))


def test_ids_targets_and_grid_are_well_formed(board: dict[str, Any]) -> None:
    everything = board["panels"] + [q for p in board["panels"] for q in p.get("panels") or []]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for p in dashboard.all_panels(board):
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in p["targets"])


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    return next(p for p in dashboard.all_panels(board) if p["title"] == title)


def test_new_panels_query_the_new_metrics(board: dict[str, Any]) -> None:
    timeline = _panel(board, "Stage timeline")
    assert timeline["type"] == "state-timeline"
    assert metrics_in(timeline["targets"][0]["expr"]) == {metric_names.RUN_STAGE_INFO}
    used = {
        title: set().union(*(metrics_in(t["expr"]) for t in _panel(board, title)["targets"]))
        for title in ("Stage retries and evictions (1h)", "Expert set size per iteration", "RFT loss per iteration")
    }
    assert used == {
        "Stage retries and evictions (1h)": {metric_names.STAGE_RETRIES, metric_names.STAGE_DISRUPTIONS},
        "Expert set size per iteration": {metric_names.RUN_EXPERT_TRAJECTORIES},
        "RFT loss per iteration": {metric_names.RUN_RFT_LOSS_BEFORE, metric_names.RUN_RFT_LOSS},
    }


def test_a_collapsed_row_holds_one_panel_per_rl_step_phase(board: dict[str, Any]) -> None:
    rows = [p for p in board["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == [title for title, _, _ in dashboard.ROWS]
    phases = next(r for r in rows if r["collapsed"])
    exprs = [t["expr"] for p in phases["panels"] for t in p["targets"]]
    assert exprs == [
        f'{metric_names.TRAIN_PHASE_SECONDS}{{namespace=~"$namespace", run=~"$run", phase="{phase}"}}'
        for phase in metric_names.PHASES
    ]
    assert sum(p["gridPos"]["w"] for p in phases["panels"]) == 24
    assert all(not r.get("panels") for r in rows if not r["collapsed"])  # open rows: panels follow them
