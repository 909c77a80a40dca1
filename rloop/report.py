"""`rloop report`: a run's story as a table and PNG plots, read from committed manifests only, written as
report.md and as report.html (one self-contained page, images embedded) from the same blocks.

Plots: train reward per RL step across iterations; held-out avg@n and pass@k per iteration;
and, given several runs (e.g. tiny.yaml vs tiny-rl.yaml), those curves side by side.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from rloop.plan import Stage, all_stages
from rloop.report_format import (
    Block,
    Code,
    Figure,
    Heading,
    Paragraph,
    Table,
    markdown_table,
    to_html,
    to_markdown,
)
from rloop.spec import parse_run
from rloop.store import RunStore


def collect(store: RunStore) -> dict[str, Any]:
    """Everything the report shows, from validated manifests (uncommitted stages are skipped).

    RL steps are counted across iterations as they ran (an adaptive horizon may end one early), so
    `iteration_end_step[k]` is the RL step budget spent through iteration k: where the policy that
    iteration produced is placed on the Figure-1 plot."""
    run = parse_run(store.read_spec())
    spec = run.spec
    committed = store.committed([s.id for s in all_stages(spec)])
    data: dict[str, Any] = {"name": run.metadata.name, "mode": spec.mode, "uri": store.uri,
                            "iterations": spec.loop.iterations, "steps_per_iteration": spec.loop.rl.steps,
                            "eval": {}, "stages": {}, "rl_steps": [], "rl_evals": [], "iteration_end_step": {}}
    offset = 0
    for stage_id in sorted(committed):  # iter-000/rl sorts before iter-001/rl: the offsets add up in order
        m = store.validate(stage_id, deep=False)
        data["stages"][stage_id] = m.summary
        st = Stage.from_id(stage_id)
        if st.kind == "eval":
            label = "base" if st.iteration is None else str(st.iteration)
            data["eval"].setdefault(st.eval_set, {})[label] = m.summary
        elif st.kind == "rl":
            for line in store.read_verified(stage_id, "metrics.jsonl", m).decode().splitlines():
                row = json.loads(line)
                row["iteration"] = st.iteration
                row["global_step"] = offset + row["step"] + 1
                data["rl_steps"].append(row)
            if any(f.path == "evals.jsonl" for f in m.files):
                for line in store.read_verified(stage_id, "evals.jsonl", m).decode().splitlines():
                    row = json.loads(line)
                    data["rl_evals"].append({**row, "iteration": st.iteration, "global_step": offset + row["step"]})
            offset += int(m.summary.get("steps", spec.loop.rl.steps))
            data["iteration_end_step"][st.iteration] = offset
    return data


def rl_budget(data: dict[str, Any]) -> int:
    """RL steps the run has spent (all committed iterations)."""
    return max(data["iteration_end_step"].values(), default=0)


def find_baseline(store: RunStore) -> RunStore | None:
    """For an RLoop run: a vanilla-RL run (mode rl) next to it in the same store namespace with the same
    model, data, RL settings and RL-step budget (e.g. tiny-rl beside tiny), or None."""
    run = parse_run(store.read_spec())
    if run.spec.mode != "rloop":
        return None
    namespace_dir = store.base.rsplit("/", 1)[0]
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(namespace_dir, detail=False))
    except (FileNotFoundError, OSError):
        return None
    for name in names:
        other = RunStore(store.root_uri, run.metadata.namespace, name)
        if name == run.metadata.name or not other.exists("spec.json"):
            continue
        try:
            theirs = parse_run(other.read_spec()).spec
        except ValueError:
            continue
        mine = run.spec
        if (theirs.mode == "rl" and theirs.model == mine.model and theirs.data == mine.data
                and theirs.loop.rl == mine.loop.rl and theirs.loop.iterations == mine.loop.iterations):
            return other
    return None


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def iteration_table(data: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """`iteration_rows` as a markdown table (what `rloop run` prints and report.md shows)."""
    return markdown_table(*iteration_rows(data, baseline))


def iteration_rows(data: dict[str, Any], baseline: dict[str, Any] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per evaluated policy (base, then each iteration); with `baseline` (a vanilla
    RL run's `collect()`), a last row with its final policy at its RL-step budget."""
    header = ["policy", "RL steps", "RL reward (last 10%)", "expert set", "RFT NLL before→after"]
    sets = sorted(data["eval"])
    for s in sets:
        any_metrics = next(iter(data["eval"][s].values()))
        k_max = max(int(k) for k in any_metrics["pass_at_k"])
        header += [f"{s} avg@{any_metrics['n']}", f"{s} pass@1", f"{s} pass@{k_max}", f"{s} forgetting"]
    rows = []
    labels = ["base"] + [str(k) for k in range(data["iterations"])]
    for label in labels:
        if label == "base":
            row = ["P_0 (base)", "0", "", "", ""]
        else:
            k = int(label)
            rl = data["stages"].get(f"iter-{k:03d}/rl", {})
            ver = data["stages"].get(f"iter-{k:03d}/verify", {})
            rft = data["stages"].get(f"iter-{k:03d}/rft", {})
            nll = f"{_fmt(rft.get('nll_before'))}→{_fmt(rft.get('nll_after'))}" if "nll_before" in rft else "–"
            row = [f"iter {k}", _fmt(data["iteration_end_step"].get(k)), _fmt(rl.get("train_reward_last10pct")),
                   _fmt(ver.get("expert_trajectories")) if data["mode"] == "rloop" else "n/a (rl)", nll]
        have = _eval_cells(data, label, sets, row)
        if have or label != "base":
            rows.append(row)
    if baseline is not None:
        last = max((int(k) for k in baseline["iteration_end_step"]), default=None)
        if last is not None:
            rl = baseline["stages"].get(f"iter-{last:03d}/rl", {})
            row = [f"vanilla RL ({baseline['name']}), end", _fmt(rl_budget(baseline)),
                   _fmt(rl.get("train_reward_last10pct")), "n/a (rl)", "–"]
            _eval_cells(baseline, str(last), sets, row)
            rows.append(row)
    return header, rows


def _eval_cells(data: dict[str, Any], label: str, sets: list[str], row: list[str]) -> bool:
    """Append the eval columns of policy `label` to `row`; False when no set has an evaluation for it."""
    have = False
    for s in sets:
        m = data["eval"].get(s, {}).get(label)
        have |= m is not None
        if m is None:
            row += ["–"] * 4
            continue
        pk = m["pass_at_k"]
        row += [_fmt(m["avg_at_n"]), _fmt(pk.get("1")), _fmt(pk.get(str(max(int(k) for k in pk)))),
                _fmt(m.get("forgetting_rate"))]
    return have


def _plot_train_reward(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for d in runs:
        xs = [r["global_step"] for r in d["rl_steps"]]
        ys = [r["reward"] for r in d["rl_steps"]]
        ax.plot(xs, _smooth(ys), label=f"{d['name']} ({d['mode']})")
        for k in range(1, d["iterations"]):
            ax.axvline(k * d["steps_per_iteration"], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("RL step (all iterations)")
    ax.set_ylabel("train reward (smoothed)")
    ax.set_title("Train reward per RL step; dotted lines = iteration boundaries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_eval(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({s for d in runs for s in d["eval"]})
    fig, axes = plt.subplots(1, max(1, len(sets)) * 2, figsize=(6 * max(1, len(sets)), 4), squeeze=False)
    for i, s in enumerate(sets):
        ax_avg, ax_pass = axes[0][2 * i], axes[0][2 * i + 1]
        for d in runs:
            ev = d["eval"].get(s, {})
            labels = [lab for lab in ["base"] + [str(k) for k in range(d["iterations"])] if lab in ev]
            xs = [-1 if lab == "base" else int(lab) for lab in labels]
            ax_avg.plot(xs, [ev[lab]["avg_at_n"] for lab in labels], marker="o", label=d["name"])
            if labels:
                kmax = str(max(int(k) for k in ev[labels[0]]["pass_at_k"]))
                ax_pass.plot(xs, [ev[lab]["pass_at_k"][kmax] for lab in labels], marker="o",
                             label=f"{d['name']} pass@{kmax}")
                ax_pass.plot(xs, [ev[lab]["pass_at_k"]["1"] for lab in labels] if "1" in ev[labels[0]]["pass_at_k"]
                             else [], marker=".", ls="--", label=f"{d['name']} pass@1")
        for ax, title in ((ax_avg, f"{s}: avg@n"), (ax_pass, f"{s}: pass@k")):
            ax.set_title(title)
            ax.set_xlabel("iteration (-1 = base policy)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_figure1(runs: list[dict[str, Any]], path: Path) -> None:
    """The paper's Figure 1 for these runs: train reward, then held-out avg@n and pass@k per test set,
    all against RL steps spent. A run's evaluations during RL (`loop.eval.everySteps`) are a curve; the
    policy each iteration ends with (for RLoop: after RFT) is a marker at the iteration's last RL step;
    the base policy sits at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({s for d in runs for s in d["eval"]})
    fig, axes = plt.subplots(1, 1 + 2 * len(sets), figsize=(4.2 * (1 + 2 * len(sets)), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0][0]
    for i, d in enumerate(runs):
        ax.plot([r["global_step"] for r in d["rl_steps"]], _smooth([r["reward"] for r in d["rl_steps"]]),
                color=colors[i % len(colors)], label=f"{d['name']} ({d['mode']})")
    ax.set_title("train reward (smoothed)")
    for j, s in enumerate(sets):
        ax_avg, ax_pass = axes[0][1 + 2 * j], axes[0][2 + 2 * j]
        for i, d in enumerate(runs):
            color, ev = colors[i % len(colors)], d["eval"].get(s, {})
            any_metrics = next(iter(ev.values()), None)
            if any_metrics is None:
                continue
            k_max = str(max(int(k) for k in any_metrics["pass_at_k"]))
            curve = [r for r in d["rl_evals"] if r["set"] == s]
            for axis, value in ((ax_avg, lambda m: m["avg_at_n"]), (ax_pass, lambda m, k=k_max: m["pass_at_k"][k])):
                if curve:
                    axis.plot([r["global_step"] for r in curve], [value(r) for r in curve], color=color, lw=1,
                              alpha=0.8, label=f"{d['name']} during RL")
                points = [(0, ev["base"])] if "base" in ev else []
                points += [(d["iteration_end_step"][int(lab)], ev[lab]) for lab in ev
                           if lab != "base" and int(lab) in d["iteration_end_step"]]
                points.sort(key=lambda p: p[0])
                axis.plot([x for x, _ in points], [value(m) for _, m in points], color=color, ls="--",
                          marker="o", label=f"{d['name']} per iteration")
            ax_avg.set_title(f"{s}: avg@{any_metrics['n']}")
            ax_pass.set_title(f"{s}: pass@{k_max}")
    for axis in axes[0]:
        axis.set_xlabel("RL steps spent")
        axis.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(ys: list[float], w: int = 5) -> list[float]:
    out = []
    for i in range(len(ys)):
        window = [y for y in ys[max(0, i - w + 1) : i + 1] if not math.isnan(y)]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


FIGURES = [Figure("figure1.png", "figure 1"), Figure("train_reward.png", "train reward"),
           Figure("eval.png", "held-out evaluation")]


class ReportFiles(NamedTuple):
    """Where `write_report` put the report: the markdown and the self-contained HTML page."""

    markdown: str
    html: str


def report_blocks(runs: list[dict[str, Any]], baseline: dict[str, Any] | None) -> list[Block]:
    """The report's content, for both renderings: per run a header, its store and its iteration table (the
    first run's with the `baseline` row), then the plots of FIGURES."""
    blocks: list[Block] = [Heading(1, (f"RLoop report: {', '.join(d['name'] for d in runs)}",))]
    for i, d in enumerate(runs):
        blocks += [Heading(2, (f"{d['name']} (mode ", Code(d["mode"]), f", {d['iterations']} iterations × "
                                f"{d['steps_per_iteration']} RL steps)")),
                   Paragraph(("Store: ", Code(d["uri"]))),
                   Table(*iteration_rows(d, baseline if i == 0 else None))]
    blocks += [Heading(2, ("Plots",)),
               Paragraph(("Train reward and held-out evaluation against RL steps spent (the paper's Figure 1): "
                          "curves are evaluations during RL (", Code("loop.eval.everySteps"), "), markers the "
                          "policy each iteration ends with.")),
               *FIGURES]
    return blocks


def write_report(stores: list[RunStore]) -> ReportFiles:
    """Write report.md, report.html and the plots into the first run's directory (`report/` there).

    An RLoop run's table gets a vanilla-RL row when such a run at the same budget sits beside it
    (`find_baseline`); given alone, that baseline joins the plots too."""
    runs = [collect(s) for s in stores]
    baseline_store = find_baseline(stores[0]) if len(stores) == 1 else None
    baseline = collect(baseline_store) if baseline_store is not None else None
    if baseline is None and runs[0]["mode"] == "rloop":  # `rloop report tiny tiny-rl`: the first rl run given
        baseline = next((d for d in runs[1:] if d["mode"] == "rl"), None)
    plotted = runs + ([baseline] if baseline_store is not None else [])
    target = stores[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plot_figure1(plotted, out / "figure1.png")
        _plot_train_reward(plotted, out / "train_reward.png")
        _plot_eval(plotted, out / "eval.png")
        blocks = report_blocks(runs, baseline)
        (out / "report.md").write_text(to_markdown(blocks))
        images = {f.file: (out / f.file).read_bytes() for f in FIGURES}
        (out / "report.html").write_text(to_html(blocks, images), encoding="utf-8")
        for p in out.iterdir():
            target.fs.put_file(str(p), target.path(f"report/{p.name}"))
    return ReportFiles(f"{target.uri}/report/report.md", f"{target.uri}/report/report.html")
