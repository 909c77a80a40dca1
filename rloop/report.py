"""`rloop report`: a run's story as a markdown table and PNG plots, read from committed manifests only.

Plots: train reward per RL step across iterations; held-out avg@n and pass@k per iteration;
and, given several runs (e.g. tiny.yaml vs tiny-rl.yaml), those curves side by side.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from rloop.plan import Stage, all_stages
from rloop.spec import parse_run
from rloop.store import RunStore


def collect(store: RunStore) -> dict[str, Any]:
    """Everything the report shows, from validated manifests (uncommitted stages are skipped)."""
    run = parse_run(store.read_spec())
    spec = run.spec
    committed = store.committed([s.id for s in all_stages(spec)])
    data: dict[str, Any] = {"name": run.metadata.name, "mode": spec.mode, "uri": store.uri,
                            "iterations": spec.loop.iterations, "steps_per_iteration": spec.loop.rl.steps,
                            "eval": {}, "stages": {}, "rl_steps": []}
    for stage_id in sorted(committed):
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
                row["global_step"] = st.iteration * spec.loop.rl.steps + row["step"] + 1
                data["rl_steps"].append(row)
    return data


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def iteration_table(data: dict[str, Any]) -> str:
    """Markdown table: one row per evaluated policy (base, then each iteration)."""
    k_max = None
    header = ["policy", "RL reward (last 10%)", "expert set", "RFT NLL before→after"]
    sets = sorted(data["eval"])
    for s in sets:
        any_metrics = next(iter(data["eval"][s].values()))
        ks = sorted(int(k) for k in any_metrics["pass_at_k"])
        k_max = ks[-1]
        header += [f"{s} avg@{any_metrics['n']}", f"{s} pass@1", f"{s} pass@{k_max}", f"{s} forgetting"]
    rows = []
    labels = ["base"] + [str(k) for k in range(data["iterations"])]
    for label in labels:
        if label == "base":
            row = ["P_0 (base)", "", "", ""]
        else:
            k = int(label)
            rl = data["stages"].get(f"iter-{k:03d}/rl", {})
            ver = data["stages"].get(f"iter-{k:03d}/verify", {})
            rft = data["stages"].get(f"iter-{k:03d}/rft", {})
            nll = f"{_fmt(rft.get('nll_before'))}→{_fmt(rft.get('nll_after'))}" if "nll_before" in rft else "–"
            row = [f"iter {k}", _fmt(rl.get("train_reward_last10pct")),
                   _fmt(ver.get("expert_trajectories")) if data["mode"] == "rloop" else "n/a (rl)", nll]
        have = False
        for s in sets:
            m = data["eval"][s].get(label)
            have |= m is not None
            if m is None:
                row += ["–"] * 4
                continue
            pk = m["pass_at_k"]
            row += [_fmt(m["avg_at_n"]), _fmt(pk.get("1")), _fmt(pk.get(str(max(int(k) for k in pk)))),
                    _fmt(m.get("forgetting_rate"))]
        if have or label != "base":
            rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


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


def _smooth(ys: list[float], w: int = 5) -> list[float]:
    out = []
    for i in range(len(ys)):
        window = [y for y in ys[max(0, i - w + 1) : i + 1] if not math.isnan(y)]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def write_report(stores: list[RunStore]) -> str:
    """Write report.md and plots into the first run's directory (`report/` there); returns its URI."""
    runs = [collect(s) for s in stores]
    target = stores[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _plot_train_reward(runs, out / "train_reward.png")
        _plot_eval(runs, out / "eval.png")
        parts = [f"# RLoop report: {', '.join(d['name'] for d in runs)}", ""]
        for d in runs:
            parts += [f"## {d['name']} (mode `{d['mode']}`, {d['iterations']} iterations × "
                      f"{d['steps_per_iteration']} RL steps)", "", f"Store: `{d['uri']}`", "", iteration_table(d), ""]
        parts += ["## Plots", "", "![train reward](train_reward.png)", "", "![held-out evaluation](eval.png)", ""]
        (out / "report.md").write_text("\n".join(parts))
        for p in out.iterdir():
            target.fs.put_file(str(p), target.path(f"report/{p.name}"))
    return f"{target.uri}/report/report.md"
