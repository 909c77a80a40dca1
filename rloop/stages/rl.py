"""`rl`: RL from P_k for N_rl steps; every trajectory goes to the pool.

Writes `pool/trajectories.parquet` (every generated response with step, reward, correctness),
`metrics.jsonl` (one row per step), `final/` (the RL end policy: the next P in `rl` mode, discarded
by RLoop), and `checkpoints/step-NNNNNN/` when the pool comes from checkpoints.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import closing, nullcontext
from pathlib import Path

from tqdm import tqdm

from rloop.plan import policy_in
from rloop.stages.common import InputError, StageContext, load_dataset, make_scorer, parquet_bytes
from rloop.stages.rollout import rollout_engine


def run(ctx: StageContext) -> dict:
    from rloop.policy import load_policy, prepare_for_training, save_policy
    from rloop.telemetry import StageTelemetry
    from rloop.train.distributed import close_world, init_world
    from rloop.train.rl import PromptSampler, RLTrainer

    spec, k = ctx.spec, ctx.iteration
    cfg = spec.loop.rl
    world = init_world(spec.loop.distributed.timeout_seconds)
    check_world(spec, world.size)
    train = load_dataset(spec.data.train, "data.train")
    policy_dir = ctx.policy_dir(policy_in(spec, k))
    model, tok = load_policy(policy_dir, spec.model.dtype, training=True)
    model = prepare_for_training(model, spec.model.lora, spec.model.gradient_checkpointing)
    fmt = ctx.prompt_format(tok)
    engine = rollout_engine(ctx, model, tok, fmt, model_path=policy_dir, lora=spec.model.lora is not None,
                            colocated=True)
    trainer = RLTrainer(model, tok, engine, cfg, make_scorer(spec), iteration=k,
                        compute_dtype=spec.model.dtype, world=world, distributed=spec.loop.distributed)
    sampler = PromptSampler(train, seed=cfg.seed + 1000 * k)  # same seed everywhere: the same prompts
    pool, rows = [], []
    telemetry = StageTelemetry.from_env(ctx.run.metadata.name, ctx.stage.kind) if world.is_main else None
    ckpt_every = spec.loop.pool.checkpoint_every if spec.mode == "rloop" and spec.loop.pool.source == "checkpoints" else 0
    # Rank 0 alone writes: the pool and metrics of all processes, the policy, the commit manifest.
    writer = ctx.store.stage_writer(ctx.stage.id) if world.is_main else nullcontext()
    with writer as w, tempfile.TemporaryDirectory() as tmp, closing(engine):
        bar = tqdm(range(cfg.steps), desc=f"iter {k} rl", unit="step", leave=False, disable=not world.is_main)
        for step in bar:
            out = trainer.step(step, sampler.next(cfg.prompts_per_step), fmt.render, more=sampler.next)
            if world.is_main:
                pool += out.trajectories
                rows.append(out.metrics)
                telemetry.observe_step(out.metrics)
                bar.set_postfix(reward=f"{out.metrics['reward']:.3f}", ent=f"{out.metrics['entropy']:.2f}")
            if ckpt_every and ((step + 1) % ckpt_every == 0 or step + 1 == cfg.steps):
                with trainer.optimizer.main_model() as whole:  # every process takes part; rank 0 saves
                    if whole is not None:
                        d = Path(tmp) / f"step-{step + 1:06d}"
                        save_policy(whole if spec.model.lora is None else _merged_copy(whole), tok, d, spec.model.dtype)
                        w.put_dir(f"checkpoints/step-{step + 1:06d}", d)
        with trainer.optimizer.main_model() as whole:
            if whole is not None:
                final = whole.merge_and_unload() if spec.model.lora is not None else whole
                save_policy(final, tok, Path(tmp) / "final", spec.model.dtype)
        if not world.is_main:
            close_world(world)
            return {"rank": world.rank}
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
        if world.size > 1:
            summary["processes"] = world.size
        w.commit(summary)
    close_world(world)
    return summary


def check_world(spec, processes: int) -> None:
    """What a stage of several processes cannot do, as an input error naming the field."""
    if processes == 1:
        return
    if spec.loop.rollout.engine == "vllm":
        raise InputError(
            f"loop.rollout.engine vllm runs in one process, but this stage has {processes} (resources gpus x "
            "nodes); use engine hf for a multi-GPU rl stage, or give the rl stage one GPU"
        )
    if spec.loop.rl.prompts_per_step < processes:
        raise InputError(
            f"loop.rl.promptsPerStep ({spec.loop.rl.prompts_per_step}) is below the stage's {processes} processes: "
            f"each samples whole prompt groups; raise promptsPerStep to at least {processes}"
        )


def _merged_copy(model):
    import copy

    return copy.deepcopy(model).merge_and_unload()


def _mean(xs) -> float:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")
