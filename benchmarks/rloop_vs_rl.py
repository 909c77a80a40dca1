"""RLoop vs vanilla RL at an equal RL-step budget, over seeds, through the product's own `rloop run`.

    python benchmarks/rloop_vs_rl.py            # 3 seeds + ablations (~40 min on 2 cores): docs/science.md + PNG
    python benchmarks/rloop_vs_rl.py --quick    # 1 seed, smaller budget, no ablations (~10 min)
    python benchmarks/rloop_vs_rl.py --smoke    # 1 seed, a few steps: checks the harness (a test runs it)

Every run starts from examples/tiny.yaml (the demo's defaults; the vanilla run is tiny-rl.yaml's mode rl
with the same model, data, RL settings and budget) with the seed put into the model init, the data
splits, RL sampling and evaluation sampling. Runs go to a store of their own (`--store`, default
./rloop-runs-bench), two at a time; a run already committed there is resumed, not redone.

Per seed: held-out avg@n and pass@k for every k of loop.eval.kList on each test set, forgetting rate,
coverage (train prompts solved at least once during RL), diversity (n-gram self-similarity of a prompt's
samples, lower = more diverse) and train reward; then mean ± sd and the paired difference RLoop − vanilla.
Ablations (seed 0) each change one knob of the RLoop run. Ends with one line
`RESULT avg_gain=… passk_gain=… seeds=…` (mean paired difference on the shifted held-out set).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rloop.evaluate import coverage  # noqa: E402
from rloop.report import collect, markdown_table, plot_figure1  # noqa: E402
from rloop.store import RunStore  # noqa: E402

REPORTED_SET = "heldout"  # the RESULT line and the goal are on the shifted held-out set; all sets are tabled

# One knob each, against the seed-0 RLoop run (names are run-name suffixes: DNS labels).
ABLATIONS: dict[str, tuple[str, dict]] = {
    "paper-rft": ("the paper's loop: RFT of P_k on this iteration's experts only",
                  {"loop.rft.initPolicy": "initial", "loop.filter.accumulate": False}),
    "no-accumulate": ("RFT of P_0 on this iteration's experts only", {"loop.filter.accumulate": False}),
    "pk-accumulate": ("RFT of P_k on all experts so far", {"loop.rft.initPolicy": "initial"}),
    "all-correct": ("expert set = all correct responses (duplicates kept), cap 4", {"loop.filter.dedup": False}),
    "freq-weighted": ("all correct, cap 64 (frequent answers weigh more)",
                      {"loop.filter.dedup": False, "loop.filter.maxPerPrompt": 64}),
    "cap-1": ("distinct correct, at most 1 per prompt", {"loop.filter.maxPerPrompt": 1}),
    "cap-16": ("distinct correct, at most 16 per prompt", {"loop.filter.maxPerPrompt": 16}),
    "late-window": ("pool window: the later half of each iteration's RL steps", {"loop.filter.fromStep": "half"}),
    "ckpt-pool": ("checkpoint pool: fresh samples from checkpoints every 20 RL steps",
                  {"loop.pool.source": "checkpoints", "loop.pool.checkpointEvery": 20}),
    "rft-lr-x3": ("RFT learning rate x3", {"loop.rft.lr": "x3"}),
    "rft-steps-x2": ("RFT steps x2", {"loop.rft.maxSteps": "x2"}),
    "adaptive": ("adaptive RL horizon: stop at patience 2 without a new best validation pass@8",
                 {"loop.rl.adaptiveHorizon": {"patience": 2, "k": 8}}),
}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def set_path(doc: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def get_path(doc: dict, dotted: str):
    node = doc
    for p in dotted.split("."):
        node = node[p]
    return node


def seeded(doc: dict, seed: int) -> dict:
    """The document with every seed moved: model init and warm-up, data splits, RL and eval sampling."""
    doc = copy.deepcopy(doc)
    spec = doc["spec"]
    spec["model"]["tiny"]["seed"] = seed
    for ds in [spec["data"]["train"], *spec["data"].get("eval", []), *([spec["data"]["validation"]]
                                                                         if "validation" in spec["data"] else [])]:
        if "synthetic" in ds:
            ds["synthetic"]["seed"] = seed
    spec["loop"]["rl"]["seed"] = seed
    spec["loop"].setdefault("eval", {})["seed"] = 1234 + seed
    return doc


def with_budget(doc: dict, iterations: int | None, steps: int | None, every: int | None) -> dict:
    doc = copy.deepcopy(doc)
    loop = doc["spec"]["loop"]
    if iterations:
        loop["iterations"] = iterations
    if steps:
        loop["rl"]["steps"] = steps
    if every is not None:
        loop.setdefault("eval", {})["everySteps"] = every
    return doc


def ablated(doc: dict, changes: dict) -> dict:
    doc = copy.deepcopy(doc)
    spec = doc["spec"]
    for dotted, value in changes.items():
        key = dotted.removeprefix("spec.")
        if value == "half":
            value = spec["loop"]["rl"]["steps"] // 2
        elif isinstance(value, str) and value.startswith("x"):
            value = type(get_path(spec, key))(get_path(spec, key) * float(value[1:]))
        set_path(spec, key, value)
        if key == "loop.rl.adaptiveHorizon":
            spec["loop"]["eval"]["everySteps"] = spec["loop"]["eval"].get("everySteps") or 10
            samples = max(spec["loop"]["eval"].get("kList", [16]))  # every k of kList is also reported for it
            spec["data"]["validation"] = {"name": "validation", "samplesPerPrompt": samples,
                                          "synthetic": {"task": "subset-sum", "split": "validation", "size": 64,
                                                        "seed": spec["data"]["train"]["synthetic"]["seed"]}}
    return doc


def named(doc: dict, name: str) -> dict:
    doc = copy.deepcopy(doc)
    doc["metadata"]["name"] = name
    return doc


def run_all(docs: list[dict], store: Path, jobs: int, log) -> dict[str, float]:
    """`rloop run` every document (two at a time by default); returns wall seconds per run."""
    cfg_dir = store / "_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}  # one core per run

    def one(doc: dict) -> tuple[str, float]:
        name = doc["metadata"]["name"]
        path = cfg_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        t0 = time.monotonic()
        with open(cfg_dir / f"{name}.log", "w") as out:
            rc = subprocess.run([sys.executable, "-m", "rloop", "run", str(path), "--store", str(store), "--no-report"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"rloop run {name} failed (exit {rc}); see {cfg_dir / (name + '.log')}")
        seconds = time.monotonic() - t0
        # A resumed run adds the seconds it worked now to what it took before (kept beside its config), so
        # the time a run cost survives a benchmark that is re-run to redo its tables.
        spent = cfg_dir / f"{name}.seconds"
        before = float(spent.read_text()) if spent.exists() else 0.0
        ran_now = re.search(r"\((\d+) stages run now", (cfg_dir / f"{name}.log").read_text())
        total = before + seconds if ran_now is None or int(ran_now.group(1)) > 0 else before
        spent.write_text(f"{total:.1f}")
        log(f"  {name}: {seconds:.0f}s now, {total:.0f}s in all")
        return name, total

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, docs))


def outcome(store_root: Path, name: str) -> dict:
    """The final policy's numbers for one run, from its committed manifests (`rloop.report.collect`)."""
    store = RunStore(str(store_root), "default", name)
    data = collect(store)
    last = str(data["iterations"] - 1)
    out: dict = {"name": name, "mode": data["mode"], "data": data, "rl_steps": max(data["iteration_end_step"].values())}
    for s, by_policy in data["eval"].items():
        for label, key in ((last, "final"), ("base", "base")):
            m = by_policy.get(label)
            if m is None:
                continue
            out[f"{key}:{s}"] = {"avg": m["avg_at_n"], "n": m["n"], **{f"pass@{k}": v for k, v in m["pass_at_k"].items()},
                                 "forgetting": m.get("forgetting_rate"), "self_sim": m.get("self_similarity")}
    last_rl = data["stages"][f"iter-{int(last):03d}/rl"]
    out["train_reward"] = last_rl.get("train_reward_last10pct")
    solved: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    for k in range(data["iterations"]):
        pool = pq.read_table(io.BytesIO(store.read_verified(f"iter-{k:03d}/rl", "pool/trajectories.parquet")),
                             columns=["prompt_id", "step", "correct"]).to_pylist()
        for r in pool:
            solved[r["prompt_id"]].append((int(r["step"]) + 1000 * k, bool(r["correct"])))
    out["coverage"] = coverage(solved)["union_coverage"]
    return out


def fmt(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:+d}" if signed else str(v)
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(set(values)) == 1:  # one seed, or a constant such as the RL-step budget
        return fmt(values[0])
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def metric_columns(results: dict, sets: list[str]) -> list[tuple[str, str]]:
    """(column title, key) for every per-set metric: avg@n, each pass@k, forgetting, self-similarity."""
    any_run = next(iter(results.values()))
    cols = []
    for s in sets:
        m = any_run[f"final:{s}"]
        cols.append((f"{s} avg@{m['n']}", f"{s}|avg"))
        cols += [(f"{s} {k}", f"{s}|{k}") for k in sorted((k for k in m if k.startswith("pass@")),
                                                          key=lambda k: int(k.removeprefix("pass@")))]
        cols += [(f"{s} forget", f"{s}|forgetting"), (f"{s} self-sim", f"{s}|self_sim")]
    return cols + [("coverage", "coverage"), ("train reward", "train_reward"), ("RL steps", "rl_steps")]


def value(result: dict, key: str, which: str = "final"):
    if "|" not in key:
        return result.get(key)
    s, metric = key.split("|")
    return result.get(f"{which}:{s}", {}).get(metric)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 iterations, no ablations (~10 min)")
    ap.add_argument("--smoke", action="store_true", help="1 seed, a few RL steps: checks the harness only")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--store", type=Path, default=ROOT / "rloop-runs-bench")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core)")
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "tiny.yaml")
    ap.add_argument("--docs", type=Path, default=None,
                    help="write the tables here (the full run defaults to docs/science.md and its PNG)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base_doc = load_yaml(args.config)
    iterations = steps = None
    every = 20
    seeds, ablations = args.seeds, {} if args.no_ablations else ABLATIONS
    if args.quick:
        seeds, ablations, iterations = seeds[:1], {}, 2
    if args.smoke:
        seeds, ablations, iterations, steps, every = seeds[:1], {}, 1, 4, 2
        spec = base_doc["spec"]
        spec["model"]["tiny"] |= {"hiddenSize": 32, "layers": 1, "heads": 2, "warmupSteps": 20}
        spec["data"]["train"]["synthetic"]["size"] = 16
        for es in spec["data"]["eval"]:
            es["synthetic"]["size"], es["samplesPerPrompt"] = 8, 4
        spec["loop"]["eval"]["kList"] = [1, 4]
        spec["loop"]["rl"]["promptsPerStep"] = 4
        spec["loop"]["rft"]["maxSteps"] = 4
    tag = "smoke" if args.smoke else ("quick" if args.quick else "full")
    docs = []
    for seed in seeds:
        rloop_doc = with_budget(seeded(base_doc, seed), iterations, steps, None)
        rloop_doc["spec"]["mode"] = "rloop"
        vanilla_doc = copy.deepcopy(rloop_doc)
        vanilla_doc["spec"]["mode"] = "rl"
        for key in ("filter", "rft", "pool"):
            vanilla_doc["spec"]["loop"].pop(key, None)
        vanilla_doc = with_budget(vanilla_doc, None, None, every)  # the held-out curve during RL
        docs += [named(rloop_doc, f"{tag}-rloop-s{seed}"), named(vanilla_doc, f"{tag}-rl-s{seed}")]
    for name, (_, changes) in ablations.items():
        docs.append(named(ablated(with_budget(seeded(base_doc, seeds[0]), iterations, steps, None), changes),
                          f"{tag}-{name}-s{seeds[0]}"))
    log(f"{len(docs)} runs, {args.jobs} at a time, store {args.store}")
    walls = run_all(docs, args.store, args.jobs, log)
    results = {d["metadata"]["name"]: outcome(args.store, d["metadata"]["name"]) for d in docs}
    sets = sorted(next(iter(results.values()))["data"]["eval"])
    cols = metric_columns(results, sets)

    # 1. per seed: base, vanilla, RLoop, and the paired difference
    rows, diffs = [], defaultdict(list)
    for seed in seeds:
        rl, rlp = results[f"{tag}-rl-s{seed}"], results[f"{tag}-rloop-s{seed}"]
        rows.append([str(seed), "base P_0"] + [fmt(value(rlp, key, "base")) if "|" in key else "–" for _, key in cols])
        rows.append([str(seed), "vanilla RL"] + [fmt(value(rl, key)) for _, key in cols])
        rows.append([str(seed), "RLoop"] + [fmt(value(rlp, key)) for _, key in cols])
        diff = []
        for _, key in cols:
            a, b = value(rlp, key), value(rl, key)
            d = None if a is None or b is None else a - b
            diffs[key].append(d)
            diff.append(fmt(d, signed=True))
        rows.append([str(seed), "RLoop − vanilla"] + diff)
    per_seed = markdown_table(["seed", "policy"] + [c for c, _ in cols], rows)

    # 2. mean ± sd over seeds
    summary_rows = []
    for label, which, prefix in (("base P_0", "base", "rloop"), ("vanilla RL", "final", "rl"), ("RLoop", "final", "rloop")):
        summary_rows.append([label] + [mean_sd([value(results[f"{tag}-{prefix}-s{s}"], key, which) for s in seeds])
                                       if "|" in key or which == "final" else "–" for _, key in cols])
    summary_rows.append(["RLoop − vanilla (paired)"] + [mean_sd(diffs[key]) for _, key in cols])
    summary = markdown_table(["policy"] + [c for c, _ in cols], summary_rows)

    # 3. ablations (seed 0), against the seed-0 RLoop and vanilla runs
    k_max = max(int(k.split("@")[1]) for _, k in cols if "|pass@" in k and k.startswith(REPORTED_SET))
    n = next(iter(results.values()))[f"final:{REPORTED_SET}"]["n"]
    abl_cols = [(f"{s} avg@{n}", f"{s}|avg") for s in sets] + [(f"{s} pass@{k_max}", f"{s}|pass@{k_max}") for s in sets]
    abl_cols += [("coverage", "coverage"), ("RL steps", "rl_steps")]
    s0 = seeds[0]
    abl_rows = [["vanilla RL", "same budget"] + [fmt(value(results[f"{tag}-rl-s{s0}"], k)) for _, k in abl_cols],
                ["RLoop (defaults)", "examples/tiny.yaml"] + [fmt(value(results[f"{tag}-rloop-s{s0}"], k)) for _, k in abl_cols]]
    for name, (what, _) in ablations.items():
        abl_rows.append([name, what] + [fmt(value(results[f"{tag}-{name}-s{s0}"], k)) for _, k in abl_cols])
    abl = markdown_table(["variant", "change"] + [c for c, _ in abl_cols], abl_rows) if ablations else ""

    # 4. the figure (seed 0: vanilla as a curve, RLoop per iteration, base at step 0)
    out_dir = args.docs.parent if args.docs else (ROOT / "docs" if tag == "full" else args.store)
    figure = out_dir / ("figures/rloop_vs_rl.png" if tag == "full" and not args.docs else f"rloop_vs_rl_{tag}.png")
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_figure1([results[f"{tag}-rl-s{s0}"]["data"], results[f"{tag}-rloop-s{s0}"]["data"]], figure)

    avg_key, pass_key = f"{REPORTED_SET}|avg", f"{REPORTED_SET}|pass@{k_max}"
    avg_gain = statistics.mean(diffs[avg_key])
    passk_gain = statistics.mean(diffs[pass_key])
    base_pass = statistics.mean(value(results[f"{tag}-rloop-s{s}"], pass_key, "base") for s in seeds)
    rloop_pass = statistics.mean(value(results[f"{tag}-rloop-s{s}"], pass_key) for s in seeds)
    minutes = (time.monotonic() - t0) / 60
    print(f"## Per seed (final policy; {REPORTED_SET} = shifted test set, indist = in-distribution test set)\n")
    print(per_seed)
    print(f"\n## Mean ± sd over seeds {seeds}\n")
    print(summary)
    if abl:
        print(f"\n## Ablations (seed {s0})\n")
        print(abl)
    print(f"\nfigure: {figure}")
    run_minutes = sum(walls.values()) / 60
    print(f"wall: {minutes:.1f} min for this invocation; the {len(docs)} runs took {run_minutes:.1f} run-minutes "
          f"({args.jobs} at a time: ~{run_minutes / args.jobs:.1f} min), slowest {max(walls.values()):.0f}s")
    goal = avg_gain > 0 and passk_gain > 0 and rloop_pass >= base_pass
    if tag == "full" or args.docs:
        target = args.docs or ROOT / "docs" / "science.md"
        write_docs(target, args, seeds, per_seed, summary, abl, figure, run_minutes, goal, avg_gain, passk_gain,
                   base_pass, rloop_pass, k_max)
        print(f"wrote {target}")
    print(f"RESULT avg_gain={avg_gain:.4f} passk_gain={passk_gain:.4f} k={k_max} seeds={len(seeds)} "
          f"rloop_passk={rloop_pass:.4f} base_passk={base_pass:.4f} goal_met={str(goal).lower()}")
    return 0


def write_docs(target: Path, args, seeds, per_seed, summary, abl, figure, run_minutes, goal, avg_gain, passk_gain,
               base_pass, rloop_pass, k_max) -> None:
    """The benchmark's section of docs/science.md: everything between its two markers is regenerated."""
    begin, end = "<!-- rloop_vs_rl:begin -->", "<!-- rloop_vs_rl:end -->"
    cmd = "python benchmarks/rloop_vs_rl.py" + (" --smoke" if args.smoke else " --quick" if args.quick else "")
    cmd += f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else ""  # as typed
    verdict = (f"**Goal met**: RLoop beats vanilla RL at equal budget on {REPORTED_SET} avg@n (mean paired "
               f"difference {avg_gain:+.3f}) and pass@{k_max} ({passk_gain:+.3f}), and its pass@{k_max} "
               f"({rloop_pass:.3f}) is at least the base's ({base_pass:.3f})."
               if goal else
               f"**Goal not met**: mean paired difference RLoop − vanilla on {REPORTED_SET}: avg@n {avg_gain:+.3f}, "
               f"pass@{k_max} {passk_gain:+.3f}; RLoop's pass@{k_max} {rloop_pass:.3f} vs the base's {base_pass:.3f}.")
    body = "\n".join([
        begin,
        f"Measured {datetime.date.today().isoformat()} with `{cmd}` on {os.cpu_count()} CPU cores, seeds {seeds}: "
        f"the runs took {run_minutes:.1f} run-minutes, ~{run_minutes / args.jobs:.1f} min at {args.jobs} at a time.",
        "",
        verdict,
        "",
        "### Per seed (final policy)",
        "",
        per_seed,
        "",
        "### Mean ± sd over seeds",
        "",
        summary,
        "",
        *([f"### Ablations (seed {seeds[0]}, one knob each)", "", abl, ""] if abl else []),
        f"![RLoop vs vanilla RL, seed {seeds[0]}]({figure.relative_to(target.parent)})",
        end,
    ])
    text = target.read_text() if target.exists() else f"# Science\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    target.write_text(head + body + rest.split(end, 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
