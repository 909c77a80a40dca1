"""Every PromQL expression of the chart's Grafana dashboard and alert rules, executed by a real
Prometheus (Debian's package) that scrapes the real operator (`kopf run -m rloop_operator`, against the
API emulator) and a real stage metrics endpoint (`rloop.telemetry`), must return data.

Runs are chosen so that every alert and panel has something to say: `good` succeeds (stage Jobs are
a shell command writing a stage summary as the termination message: reward, expert set, RFT loss,
eval), `bad` has an invalid spec, `flaky` fails every attempt (retries), `stuck` never finishes and
its first pod is evicted once (a disruption), and `apierr` lives in a namespace where the API answers
500 to Job creations (reconcile errors). The operator is stopped last, for RLoopOperatorDown.
`promtool check rules` checks the rendered PrometheusRule first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python import chart as helm

from rloop.dashboard import all_panels
from rloop.metric_names import PHASES
from rloop.telemetry import StageTelemetry
from tests.helpers import small_doc
from tests.k8s.apiserver import JOBS, RLOOPRUNS, start
from tests.k8s.kubelet import Kubelet
from tests.k8s.operator import OperatorProcess, wait_for
from tests.promharness import Prometheus, ScrapeTarget, promtool_check_rules, require_prometheus
from tests.s3harness import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rloop"
RELEASE_NS = "rloop-system"
OPERATOR_JOB = "rloop-operator"  # the chart's Service name for release "rloop": the ServiceMonitor's job
NS, FAULTY = "obs", "obs-faulty"
GRAFANA_VARS = {"$namespace": ".*", "$run": ".*", "$job": ".*", "$__rate_interval": "30s"}
EXPERTS, NLL_BEFORE, NLL_AFTER = 12, 1.75, 0.5


def fake_stage(argv: list[str], container: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """The stage a Job would run, reduced to its contract: exit code + summary (termination message)."""
    labels = job["metadata"]["labels"]
    run, stage = labels["rloop.dev/run"], labels["rloop.dev/stage"]
    if run == "flaky":
        return ["sh", "-c", "echo 'stage crashed' >&2; exit 1"]
    if run == "stuck":
        return ["sleep", "120"]
    summary: dict[str, Any] = {"stage": stage.replace(".", "/")}
    if stage.endswith(".rl"):
        summary["train_reward_last10pct"] = 0.625
    if stage.endswith(".verify"):
        summary["expert_trajectories"] = EXPERTS
    if stage.endswith(".rft"):
        summary |= {"expert_trajectories": EXPERTS, "nll_before": NLL_BEFORE, "nll_after": NLL_AFTER}
    if ".eval." in stage:
        summary |= {"avg_at_n": 0.4, "pass_at_k": {"1": 0.4, "4": 0.8}}
    return ["sh", "-c", 'printf %s "$1" > "$RLOOP_TERMINATION_LOG"', "sh", json.dumps(summary)]


def run_doc(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    doc = small_doc(name, iterations=1, eval_base=False)
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["storage"] = {"uri": "s3://unused/prefix"}
    doc["spec"].update(spec)
    return doc


def rendered_rules(tmp: Path) -> tuple[Path, list[dict[str, Any]]]:
    values = {
        "prometheusRule": {"enabled": True, "stuckSeconds": 2, "retryThreshold": 1, "operatorDownFor": "10s"},
        "grafanaDashboard": {"enabled": True},
    }
    out = helm.Chart.load(CHART).render(values, name="rloop", namespace=RELEASE_NS)
    rule = yaml.safe_load(out["rloop/templates/prometheusrule.yaml"])
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    return path, [r for g in rule["spec"]["groups"] for r in g["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target in the committed dashboard, rows' panels included."""
    board = json.loads((CHART / "files" / "dashboard.json").read_text())
    out = []
    for panel in all_panels(board):
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted Grafana variable in {panel['title']}: {expr}"
            out.append((panel["title"], expr))
    return out


def _has_data(prom: Prometheus, expr: str) -> bool:
    try:
        return bool(prom.wait_for_data(expr, timeout=30))
    except TimeoutError:
        return False


def test_dashboard_and_alert_queries_return_data(tmp_path: Path) -> None:
    require_prometheus()
    rules_path, rules = rendered_rules(tmp_path)
    check = promtool_check_rules(rules_path)
    assert check.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in check.stdout, (
        check.stdout + check.stderr
    )

    server = start()
    for ns in (NS, FAULTY):
        server.create_namespace(ns)
    # Real API errors for the operator in one namespace: the Job is stored, the answer is a 500.
    server.emulator[f"post /apis/batch/v1/namespaces/{FAULTY}/jobs"] << 500
    kubelet = Kubelet(server, translate=fake_stage, max_concurrency=4, poll_interval=0.2).start()
    operator = OperatorProcess(server, tmp_path / "operator.log").start()  # all namespaces
    stage_port = free_ports(1)[0]
    telemetry = StageTelemetry("good", "rl", stage_port)
    for step, reward in enumerate((0.25, 0.5, 0.625)):
        telemetry.observe_step(
            {
                "step": step,
                "reward": reward,
                "pass_rate": reward,
                "entropy": 1.2,
                "tokens_per_s": 900.0,
                "rollout_tokens_per_s": 2400.0,
            }
            | {f"time_{phase}_s": 0.1 * (i + 1) for i, phase in enumerate(PHASES)}
        )
    prom = Prometheus.start(
        [
            # As the chart's ServiceMonitor: honor the operator's own `namespace` label (the run's).
            ScrapeTarget(
                OPERATOR_JOB, f"127.0.0.1:{operator.port}", {"namespace": RELEASE_NS}, honor_labels=True
            ),
            ScrapeTarget("rloop-stages", f"127.0.0.1:{stage_port}", {"namespace": NS}),
        ],
        rule_files=[rules_path],
    )
    try:
        # The error counter must be scraped at 0 before the errors happen, or rate() sees no increase.
        prom.wait_for_targets_up()
        prom.wait_for_data("rloop_reconcile_errors_total == 0")
        for doc in (
            run_doc("good", NS),
            run_doc("flaky", NS, retry={"limit": 20, "backoffSeconds": 1}),
            run_doc("stuck", NS),
            run_doc("apierr", FAULTY),
        ):
            server.create(RLOOPRUNS, doc, namespace=doc["metadata"]["namespace"])
        bad = run_doc("bad", NS)
        bad["spec"]["loop"]["rl"]["steps"] = 0
        server.create(RLOOPRUNS, bad, namespace=NS)

        def condition(name: str, ns: str, type_: str) -> bool:
            run = server.get(RLOOPRUNS, ns, name) or {}
            return any(
                c["type"] == type_ and c["status"] == "True"
                for c in (run.get("status") or {}).get("conditions") or []
            )

        # A drained node: the stuck run's first pod is evicted (once it runs), and the stage restarts.
        kubelet.evict("stuck-b-init-a0", NS)
        wait_for(lambda: server.get(JOBS, NS, "stuck-b-init-a1"), 60, "stuck: restart after eviction", operator)
        wait_for(lambda: condition("good", NS, "Succeeded"), 120, "run good to succeed", operator)
        wait_for(lambda: condition("apierr", FAULTY, "Succeeded"), 120, "run apierr to succeed", operator)
        wait_for(lambda: condition("bad", NS, "Failed"), 30, "run bad to fail", operator)
        assert condition("stuck", NS, "Progressing")

        # Every dashboard query returns data (all of them are tried, then the empty ones are named).
        empty = [(title, expr) for title, expr in dashboard_queries() if not _has_data(prom, expr)]
        assert not empty, f"dashboard queries without data: {empty}"
        good = f'namespace="{NS}", run="good"'
        assert float(prom.query(f'rloop_run_expert_trajectories{{{good}, iteration="0"}}')[0]["value"][1]) == EXPERTS
        assert float(prom.query(f'rloop_run_rft_loss_before{{{good}, iteration="0"}}')[0]["value"][1]) == NLL_BEFORE
        assert float(prom.query(f'rloop_run_rft_loss{{{good}, iteration="0"}}')[0]["value"][1]) == NLL_AFTER
        stuck = f'namespace="{NS}", run="stuck", stage="init"'
        assert float(prom.query(f"rloop_stage_disruptions_total{{{stuck}}}")[0]["value"][1]) == 1
        assert float(prom.query(f"rloop_stage_retries_total{{{stuck}}}")[0]["value"][1]) == 1
        phases = {s["metric"]["phase"] for s in prom.query('rloop_train_phase_seconds{run="good"}')}
        assert phases == set(PHASES)
        good_reward = prom.query(f'rloop_run_train_reward{{namespace="{NS}", run="good"}}')
        assert float(good_reward[0]["value"][1]) == 0.625
        assert float(prom.query('rloop_train_reward{run="good"}')[0]["value"][1]) == 0.625
        by_condition = {
            s["metric"]["condition"]: float(s["value"][1])
            for s in prom.query(f'sum by (condition) (rloop_runs{{namespace="{NS}"}})')
        }
        assert (
            by_condition["Succeeded"] == 1
            and by_condition["Failed"] == 1
            and by_condition["Progressing"] == 2
        )

        # Every alert loaded, and each one's expression returns data in the situation it is about.
        loaded = {r["name"]: r for r in prom.rules()}
        assert set(loaded) == {r["alert"] for r in rules} and all(
            r["health"] == "ok" for r in loaded.values()
        )
        expr_of = {r["alert"]: r["expr"] for r in rules}
        fired = {
            "RLoopRunFailed": {"run": "bad"},
            "RLoopStageStuck": {"run": "stuck"},
            "RLoopRetriesClimbing": {"run": "flaky", "stage": "init"},
            "RLoopReconcileErrors": {},
        }
        for alert, labels in fired.items():
            samples = prom.wait_for_data(expr_of[alert], timeout=30)
            assert any(labels.items() <= s["metric"].items() for s in samples), (alert, samples)
        down = expr_of["RLoopOperatorDown"]
        assert re.search(rf'job="{OPERATOR_JOB}", namespace="{RELEASE_NS}"', down)
        assert prom.query(down) == []  # the operator is up: the alert has nothing to say
        operator.stop()
        assert prom.wait_for_data(down, timeout=30)
    finally:
        prom.stop()
        operator.stop()
        kubelet.stop()
        server.stop()


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    require_prometheus()
    path = tmp_path / "broken.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum by (run (x)"}]}]})
    )
    check = promtool_check_rules(path)
    assert check.returncode != 0 and "parse error" in (check.stdout + check.stderr)
