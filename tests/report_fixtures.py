"""A finished run's committed manifests, written straight into a store (no model, no stages), for the
report tests: `rloop.report` reads only manifests, so this is all it needs to draw a real report."""

from __future__ import annotations

import json
from pathlib import Path

from rloop.store import RunStore

SPEC = {
    "model": {"base": "builtin:tiny"},
    "data": {
        "train": {"synthetic": {"size": 32, "seed": 5}},
        "eval": [{"name": "heldout", "synthetic": {"split": "heldout", "size": 16}}],
    },
}


def eval_summary(avg: float, pass16: float) -> dict:
    return {"avg_at_n": avg, "n": 16, "pass_at_k": {"1": avg, "16": pass16}, "forgetting_rate": None}


def finished_run(root: Path, name: str, mode: str = "rloop", steps_run: tuple[int, ...] = (6, 6),
                 rl_steps: int = 6) -> RunStore:
    """A run with one iteration per entry of `steps_run` (the RL steps it ran; `rl_steps` is the spec's
    budget, so a smaller entry is an iteration the adaptive horizon ended early): base policy at avg@16
    0.400, iteration k at 0.500 + 0.010·k, RL reward 0.1·step, 10 expert trajectories per RLoop iteration."""
    store = RunStore(str(root), "default", name)
    spec = {**SPEC, "mode": mode, "loop": {"iterations": len(steps_run), "rl": {"steps": rl_steps}}}
    store.write_spec({"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "metadata": {"name": name}, "spec": spec})
    _commit(store, "base/init", {})
    _commit(store, "base/eval/heldout", eval_summary(0.4, 0.9))
    for k, steps in enumerate(steps_run):
        metrics = [{"step": s, "reward": 0.1 * s} for s in range(steps)]
        evals = [{"step": s, "set": "heldout", "role": "test", "avg_at_n": 0.4, "pass_at_k": {"16": 0.9}}
                 for s in (0, steps)]
        _commit(store, f"iter-{k:03d}/rl", {"steps": steps, "train_reward_last10pct": 0.5},
                {"metrics.jsonl": _jsonl(metrics), "evals.jsonl": _jsonl(evals)})
        if mode == "rloop":
            _commit(store, f"iter-{k:03d}/verify", {"expert_trajectories": 10})
            _commit(store, f"iter-{k:03d}/rft", {"nll_before": 1.25, "nll_after": 0.75})
        _commit(store, f"iter-{k:03d}/eval/heldout", eval_summary(0.5 + 0.01 * k, 0.8))
    return store


def _commit(store: RunStore, stage_id: str, summary: dict, files: dict[str, bytes] | None = None) -> None:
    with store.stage_writer(stage_id) as w:
        for rel, data in (files or {}).items():
            w.put_bytes(rel, data)
        w.commit(summary)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()
