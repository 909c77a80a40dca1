"""The Helm chart's Grafana dashboard ("RLoop"), built as code with Grafana's own Python SDK
(grafana-foundation-sdk) from the metric names in `rloop.metric_names`, so no panel can query a name
the operator or the stage pods do not expose.

    python -m rloop.dashboard            # exit 1, with a diff, when the committed file is stale
    python -m rloop.dashboard --write    # write charts/rloop/files/dashboard.json (committed; drift-tested)

Rows: Runs (conditions, progress, iteration, current stage, stage timeline), Stages (durations,
attempts and failures, retries and evictions), Training (reward, held-out avg@n/pass@k, tokens/s, RL
step phases, expert-set size and RFT loss per iteration), RL step phases (collapsed: one panel per
phase) and Operator (reconcile latency, work queue and errors, memory).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rloop import metric_names as names

try:
    from grafana_foundation_sdk.builders import bargauge, prometheus, stat, statetimeline, table, timeseries
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard as builders
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as models
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat
except ImportError as err:  # a build tool, not a runtime dependency of the operator or the stages
    raise ImportError(
        f"rloop.dashboard needs grafana-foundation-sdk ({err}); install it with: pip install -e '.[dashboard]'"
    ) from err

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "charts" / "rloop" / "files" / "dashboard.json"
UID = "rloop-overview"
TITLE = "RLoop"
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Grafana template variables the queries filter by.
IN_NAMESPACE = 'namespace=~"$namespace"'
IN_RUN = 'run=~"$run"'
IN_JOB = 'job=~"$job"'
RATE_INTERVAL = "$__rate_interval"


def series(metric: str, *matchers: str) -> str:
    """`metric{m1, m2}`: a selector (the bare name without matchers)."""
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def of_runs(metric: str, *extra: str) -> str:
    """The metric for the runs the dashboard's $namespace and $run select."""
    return series(metric, IN_NAMESPACE, IN_RUN, *extra)


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str
    instant: bool = False
    table: bool = False


# ------------------------------------------------------------------------------------------ panels
def _with_queries(panel: Any, queries: Iterable[Query]) -> Any:
    for i, q in enumerate(queries):
        target = prometheus.Dataquery().ref_id(chr(ord("A") + i)).datasource(DATASOURCE).expr(q.expr).legend_format(q.legend)
        if q.instant:
            target = target.instant()
        if q.table:
            target = target.format(PromQueryFormat.TABLE)
        panel = panel.with_target(target)
    return panel


def _panel(
    kind: Any, title: str, description: str, queries: Iterable[Query], *, unit: str = "none", width: int = 8,
    height: int = 8,
) -> Any:
    """A panel of builder class `kind` over the Prometheus data source, sized `width` of 24 columns."""
    panel = kind().title(title).description(description).datasource(DATASOURCE).unit(unit).span(width)
    return _with_queries(panel.height(height), queries)


def _graph(title: str, description: str, queries: Iterable[Query], **size: Any) -> Any:
    return _panel(timeseries.Panel, title, description, queries, **size).legend(
        common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM).show_legend(True)
    )


def _bars(title: str, description: str, queries: Iterable[Query], **size: Any) -> Any:
    """One bar per series, at its latest value (per-iteration figures)."""
    return _panel(bargauge.Panel, title, description, queries, **size).orientation(
        common.VizOrientation.HORIZONTAL
    ).display_mode(common.BarGaugeDisplayMode.BASIC).reduce_options(
        common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
    )


def run_panels() -> list[Any]:
    return [
        _panel(stat.Panel, "Runs by condition", "RLoopRuns whose condition is True.",
               [Query(f"sum by (condition) ({series(names.RUNS, IN_NAMESPACE)})", "{{condition}}")],
               width=12, height=5),
        _panel(bargauge.Panel, "Stage progress", "Committed stages over all stages of the plan, per run.",
               [Query(f"{of_runs(names.RUN_STAGES_COMMITTED)} / {of_runs(names.RUN_STAGES)}",
                      "{{namespace}}/{{run}}")],
               unit="percentunit", width=12, height=5),
        _stage_timeline(),
        _graph("Iteration", "Iteration of each run's current (or last) stage.",
               [Query(of_runs(names.RUN_ITERATION), "{{run}}")], width=12),
        _panel(table.Panel, "Current stage", "The stage each run is at (Finished when done).",
               [Query(of_runs(names.RUN_STAGE_INFO), "{{run}}: {{stage}}", instant=True, table=True)], width=12),
    ]


def _stage_timeline() -> Any:
    """One lane per run and stage, filled while that stage was the run's current one."""
    current = models.ValueMap({"1": models.ValueMappingResult(text="current", color="blue", index=0)})
    panel = _panel(
        statetimeline.Panel,
        "Stage timeline",
        "Per run, which stage was current when: one lane per stage, filled while the run was at it.",
        [Query(f"max by (run, stage) ({of_runs(names.RUN_STAGE_INFO)})", "{{run}} {{stage}}")],
        width=24, height=10,
    )
    return panel.mappings([current]).show_value(common.VisibilityMode.NEVER).merge_values(True)


def stage_panels() -> list[Any]:
    def by_kind(metric: str) -> str:
        return f"sum by (stage) ({series(metric, IN_NAMESPACE)})"

    return [
        _graph("Stage duration (mean)", "Mean wall time of finished stage Jobs, by stage kind.",
               [Query(f"{by_kind(names.STAGE_DURATION + '_sum')} / {by_kind(names.STAGE_DURATION + '_count')}",
                      "{{stage}}")],
               unit="s"),
        _graph("Stage attempts and failures (1h)",
               "Stage Jobs created and failed in the last hour: retries show up as failures followed by attempts.",
               [Query(_increase_1h(names.STAGE_ATTEMPTS), "attempts {{run}} {{stage}}"),
                Query(_increase_1h(names.STAGE_FAILURES), "failures {{run}} {{stage}}")]),
        _graph("Stage retries and evictions (1h)",
               "Attempts beyond each stage's first (retries after failures, restarts after evictions) and "
               "attempts evicted or preempted, in the last hour, per run and stage kind.",
               [Query(_increase_1h(names.STAGE_RETRIES), "retries {{run}} {{stage}}"),
                Query(_increase_1h(names.STAGE_DISRUPTIONS), "evictions {{run}} {{stage}}")]),
    ]


def _increase_1h(counter: str) -> str:
    return f"sum by (run, stage) (increase({of_runs(counter)}[1h]))"


def training_panels() -> list[Any]:
    return [
        _graph("Train reward per step",
               "Mean reward of each RL step (from stage pods) and each finished RL stage's tail mean (operator).",
               [Query(of_runs(names.TRAIN_REWARD), "{{run}} step reward"),
                Query(of_runs(names.RUN_TRAIN_REWARD), "{{run}} last 10% of RL stage")]),
        _graph("Held-out avg@n and pass@k",
               "Latest evaluation of each run, one point per finished eval stage (per iteration).",
               [Query(of_runs(names.RUN_EVAL_AVG_AT_N), "{{run}} avg@n"),
                Query(of_runs(names.RUN_EVAL_PASS_AT_K), "{{run}} pass@k")],
               unit="percentunit"),
        _graph("Tokens/s", "Generated tokens per second in the latest RL step.",
               [Query(of_runs(names.ROLLOUT_TOKENS_PER_SECOND), "{{run}} rollout"),
                Query(of_runs(names.TRAIN_TOKENS_PER_SECOND), "{{run}} whole RL step")]),
        _graph("RL step phases", f"Seconds the latest RL step spent in {', '.join(names.PHASES)}.",
               [Query(of_runs(names.TRAIN_PHASE_SECONDS), "{{run}} {{phase}}")],
               unit="s"),
        _bars("Expert set size per iteration",
              "Trajectories the verify stage kept as the expert set, per iteration (the RFT stage's data).",
              [Query(of_runs(names.RUN_EXPERT_TRAJECTORIES), "{{run}} iteration {{iteration}}", instant=True)]),
        _bars("RFT loss per iteration",
              "Mean token NLL (nats) of each iteration's expert set before and after the RFT stage.",
              [Query(of_runs(names.RUN_RFT_LOSS_BEFORE), "{{run}} iteration {{iteration}} before", instant=True),
               Query(of_runs(names.RUN_RFT_LOSS), "{{run}} iteration {{iteration}} after", instant=True)]),
    ]


def phase_panels() -> list[Any]:
    return [
        _graph(f"Phase: {phase}", f"Seconds the latest RL step of each run spent in {phase}.",
               [Query(of_runs(names.TRAIN_PHASE_SECONDS, f'phase="{phase}"'), "{{run}}")],
               unit="s", width=24 // len(names.PHASES) + (1 if i < 24 % len(names.PHASES) else 0), height=6)
        for i, phase in enumerate(names.PHASES)
    ]


def operator_panels() -> list[Any]:
    buckets = f"sum by (le) (rate({names.RECONCILE_DURATION}_bucket[{RATE_INTERVAL}]))"
    return [
        _graph("Reconcile latency", "Wall time of the operator's reconcile passes (API calls included).",
               [Query(f"histogram_quantile(0.5, {buckets})", "p50"),
                Query(f"histogram_quantile(0.95, {buckets})", "p95")],
               unit="s", width=12),
        _graph("Operator work queue and errors", "Runs waiting for a reconcile worker, and failing passes.",
               [Query(names.WORKQUEUE_DEPTH, "queued runs"),
                Query(f"sum(rate({names.RECONCILE_ERRORS}[{RATE_INTERVAL}]))", "errors/s")],
               width=12),
        _graph("Operator memory", "Resident memory of the operator process.",
               [Query(series(names.PROCESS_RESIDENT_MEMORY, IN_JOB), "{{pod}}")],
               unit="bytes", width=24),
    ]


ROWS: tuple[tuple[str, Any, bool], ...] = (
    ("Runs", run_panels, False),
    ("Stages", stage_panels, False),
    ("Training", training_panels, False),
    ("RL step phases, one panel each", phase_panels, True),
    ("Operator", operator_panels, False),
)
"""(title, panels, collapsed): a collapsed row holds its panels; an open one is followed by them."""


# ------------------------------------------------------------------------------------------ variables
def _query_variable(name: str, label: str, query: str) -> Any:
    return (
        builders.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
        .include_all(True).multi(True).all_value(".*").refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
    )


def variables() -> list[Any]:
    return [
        builders.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        _query_variable("namespace", "Namespace", f"label_values({names.RUNS}, namespace)"),
        _query_variable("run", "Run", f"label_values({series(names.RUN_CONDITION, IN_NAMESPACE)}, run)"),
        _query_variable("job", "Operator scrape job", f"label_values({names.WORKQUEUE_DEPTH}, job)")
        .hide(models.VariableHide.HIDE_VARIABLE),
    ]


# ------------------------------------------------------------------------------------------ dashboard
def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (plain dicts), panel ids numbered in order."""
    board = (
        builders.Dashboard(TITLE).uid(UID).tags(["rloop"]).timezone("browser").editable().refresh("30s")
        .time("now-6h", "now").version(1)
        .description("RLoop runs: conditions, stage timeline, progress and durations, retries and evictions, "
                     "train reward, held-out avg@n/pass@k, tokens/s, RL step phases, expert-set size and RFT "
                     "loss per iteration, operator health.")
        .variables(variables())
    )
    next_id = iter(range(1, 1000))
    for title, panels, collapsed in ROWS:
        row = builders.Row(title).id(next(next_id)).collapsed(collapsed)
        built = [p.id(next(next_id)) for p in panels()]
        if collapsed:
            for p in built:
                row = row.with_panel(p)
            board = board.with_row(row)
        else:
            board = board.with_row(row)
            for p in built:
                board = board.with_panel(p)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    """The committed file's text: sorted keys, 2-space indent, a trailing newline (stable diffs)."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, those inside collapsed rows included, in dashboard order."""
    out = []
    for panel in board.get("panels") or []:
        if panel.get("type") == "row":
            out += panel.get("panels") or []
        else:
            out.append(panel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rloop.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write charts/rloop/files/dashboard.json")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
        DASHBOARD_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DASHBOARD_PATH}", file=sys.stderr)
        return 0
    committed = DASHBOARD_PATH.read_text(encoding="utf-8") if DASHBOARD_PATH.exists() else ""
    if committed == text:
        print(f"{DASHBOARD_PATH} is up to date", file=sys.stderr)
        return 0
    diff = difflib.unified_diff(
        committed.splitlines(keepends=True), text.splitlines(keepends=True),
        fromfile=f"{DASHBOARD_PATH} (committed)", tofile="rloop.dashboard (built)",
    )
    sys.stderr.writelines(diff)
    print(f"{DASHBOARD_PATH} is stale; run `python -m rloop.dashboard --write` (or `make dashboard`)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
