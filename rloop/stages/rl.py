"""`rl`: RL from P_k for N_rl steps; every trajectory goes to the pool.

Writes `pool/trajectories.parquet` (every generated response with step, reward, correctness),
`metrics.jsonl` (one row per step), `final/` (the RL end policy: the next P in `rl` mode, discarded
by RLoop), and `checkpoints/step-NNNNNN/` when the pool comes from checkpoints.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

from rloop.plan import policy_in
from rloop.stages.common import StageContext, load_dataset, make_scorer, parquet_bytes
from rloop.stages.rollout import rollout_engine


def run(ctx: StageContext) -> dict:
    from rloop.policy import load_policy, prepare_for_training, save_policy
    from rloop.telemetry import StageTelemetry
    from rloop.train.rl import PromptSampler, RLTrainer

    spec, k = ctx.spec, ctx.iteration
    cfg = spec.loop.rl
    train = load_dataset(spec.data.train, "data.train")
    policy_dir = ctx.policy_dir(policy_in(spec, k))
    model, tok = load_policy(policy_dir, spec.model.dtype, training=True)
    model = prepare_for_training(model, spec.model.lora, spec.model.gradient_checkpointing)
    fmt = ctx.prompt_format(tok)
    engine = rollout_engine(ctx, model, tok, fmt, model_path=policy_dir, lora=spec.model.lora is not None,
                            colocated=True)
    trainer = RLTrainer(model, tok, engine, cfg, make_scorer(spec), iteration=k,
                        compute_dtype=spec.model.dtype)
    sampler = PromptSampler(train, seed=cfg.seed + 1000 * k)
    pool, rows = [], []
    telemetry = StageTelemetry.from_env(ctx.run.metadata.name, ctx.stage.kind)
    ckpt_every = spec.loop.pool.checkpoint_every if spec.mode == "rloop" and spec.loop.pool.source == "checkpoints" else 0

    with ctx.store.stage_writer(ctx.stage.id) as w, tempfile.TemporaryDirectory() as tmp, closing(engine):
        bar = tqdm(range(cfg.steps), desc=f"iter {k} rl", unit="step", leave=False)
        for step in bar:
            out = trainer.step(step, sampler.next(cfg.prompts_per_step), fmt.render, more=sampler.next)
            pool += out.trajectories
            rows.append(out.metrics)
            telemetry.observe_step(out.metrics)
            bar.set_postfix(reward=f"{out.metrics['reward']:.3f}", ent=f"{out.metrics['entropy']:.2f}")
            if ckpt_every and ((step + 1) % ckpt_every == 0 or step + 1 == cfg.steps):
                d = Path(tmp) / f"step-{step + 1:06d}"
                save_policy(model if spec.model.lora is None else _merged_copy(model), tok, d, spec.model.dtype)
                w.put_dir(f"checkpoints/step-{step + 1:06d}", d)
        final = model.merge_and_unload() if spec.model.lora is not None else model
        save_policy(final, tok, Path(tmp) / "final", spec.model.dtype)
        w.put_dir("final", Path(tmp) / "final")
        w.put_bytes("pool/trajectories.parquet", parquet_bytes(pool))
        w.put_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        tail = rows[-max(1, len(rows) // 10):]
        summary = {
            "steps": len(rows),
            "trajectories": len(pool),
            "train_reward_first": rows[0]["reward"],
            "train_reward_last10pct": _mean(r["reward"] for r in tail),
            "pass_rate_last10pct": _mean(r["pass_rate"] for r in tail),
            "entropy_last": rows[-1]["entropy"],
            "tokens_per_s": _mean(r["tokens_per_s"] for r in rows),
            "rollout_tokens_per_s": _mean(r["rollout_tokens_per_s"] for r in rows),
            "step_time_s": _mean(sum(v for kk, v in r.items() if kk.startswith("time_")) for r in rows),
        }
        w.commit(summary)
    return summary


def _merged_copy(model):
    import copy

    return copy.deepcopy(model).merge_and_unload()


def _mean(xs) -> float:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")
