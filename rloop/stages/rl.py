"""`rl`: RL from P_k for N_rl steps; every trajectory goes to the pool.

Writes `pool/trajectories.parquet` (every generated response with step, reward, correctness),
`metrics.jsonl` (one row per step), `final/` (the RL end policy: the next P in `rl` mode, discarded
by RLoop), and `checkpoints/step-NNNNNN/` when the pool comes from checkpoints. With
`loop.eval.everySteps`, `evals.jsonl` holds the held-out (and validation) evaluations of the policy
being trained, before the first step and every everySteps steps; `loop.rl.adaptiveHorizon` ends the
RL there once validation pass@k has stopped improving.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path

from rloop.plan import policy_in
from rloop.progress import Progress
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
    during = None
    if spec.loop.eval.every_steps:  # the held-out curve during RL starts at the iteration's policy
        during = DuringRLEval(ctx, model, tok, engine, trainer.optimizer.full_parameters)
        during.at(0)
    stopped_early = False
    telemetry = StageTelemetry.from_env(ctx.run.metadata.name, ctx.stage.kind) if world.is_main else None
    ckpt_every = spec.loop.pool.checkpoint_every if spec.mode == "rloop" and spec.loop.pool.source == "checkpoints" else 0
    # Rank 0 alone writes: the pool and metrics of all processes, the policy, the commit manifest.
    writer = ctx.store.stage_writer(ctx.stage.id) if world.is_main else nullcontext()
    with writer as w, tempfile.TemporaryDirectory() as tmp, closing(engine):
        bar = Progress(cfg.steps, f"iter {k} rl", enabled=world.is_main)
        for step in range(cfg.steps):
            out = trainer.step(step, sampler.next(cfg.prompts_per_step), fmt.render, more=sampler.next)
            if world.is_main:
                pool += out.trajectories
                rows.append(out.metrics)
                telemetry.observe_step(out.metrics)
                ctx.tracker.log_step(out.metrics)
                bar.update(1, reward=out.metrics["reward"], ent=out.metrics["entropy"])
            if during and (step + 1) % spec.loop.eval.every_steps == 0:
                during.at(step + 1)
                stopped_early = world.all(during.horizon_reached(step + 1)) and step + 1 < cfg.steps
            last_step = stopped_early or step + 1 == cfg.steps
            if ckpt_every and ((step + 1) % ckpt_every == 0 or last_step):
                with trainer.optimizer.main_model() as whole:  # every process takes part; rank 0 saves
                    if whole is not None:
                        d = Path(tmp) / f"step-{step + 1:06d}"
                        save_policy(whole if spec.model.lora is None else _merged_copy(whole), tok, d, spec.model.dtype)
                        w.put_dir(f"checkpoints/step-{step + 1:06d}", d)
            if stopped_early:
                break
        bar.close()
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
        if during:
            w.put_bytes("evals.jsonl", "".join(json.dumps(r) + "\n" for r in during.rows).encode())
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
        if spec.loop.rl.adaptive_horizon is not None:
            summary |= {"steps_budget": cfg.steps, "stopped_early": stopped_early}
        if during:
            summary |= during.latest()
        if world.size > 1:
            summary["processes"] = world.size
        ctx.commit(w, summary)
    close_world(world)
    return summary


class DuringRLEval:
    """Evaluations of the policy while it trains (`loop.eval.everySteps`): every data.eval set and
    data.validation, sampled by the stage's own rollout engine from the current weights, scored like the
    eval stage. Every process evaluates the whole set on the gathered weights (ZeRO-3 forwards are
    collectives otherwise) with the same seed; rank 0's rows are written."""

    def __init__(self, ctx: StageContext, model, tok, engine, gathered):
        spec = ctx.spec
        self.ctx, self.model, self.tok, self.engine, self.gathered = ctx, model, tok, engine, gathered
        self.sets = [(s, "test") for s in spec.data.eval]
        if spec.data.validation is not None:
            self.sets.append((spec.data.validation, "validation"))
        self.examples = {s.name: load_dataset(s, "data.validation" if role == "validation" else f"data.eval[{s.name}]")
                         for s, role in self.sets}
        self.horizon = spec.loop.rl.adaptive_horizon
        self.watched: list[float] = []  # validation pass@k per evaluation, for the adaptive horizon
        self.rows: list[dict] = []

    def at(self, steps_done: int) -> list[dict]:
        """Evaluate now (after `steps_done` RL steps); returns this evaluation's rows (also kept in `rows`)."""
        from rloop.stages.eval import eval_metrics
        from rloop.stages.rollout import sample_and_score

        ev, spec = self.ctx.spec.loop.eval, self.ctx.spec
        out = []
        for es, role in self.sets:
            with self.gathered(), _eval_mode(self.model):
                samples = sample_and_score(self.ctx, self.model, self.tok, self.examples[es.name],
                                           n=es.samples_per_prompt, temperature=ev.temperature, top_p=ev.top_p,
                                           max_tokens=ev.max_response_tokens or spec.loop.rl.max_response_tokens,
                                           seed=ev.seed, desc=f"rl eval {es.name}", engine=self.engine)
            watch = role == "validation" and self.horizon is not None
            ks = sorted({*ev.k_list, self.horizon.k}) if watch else ev.k_list
            metrics = eval_metrics(samples, ks, None)
            row = {"step": steps_done, "set": es.name, "role": role, "n": metrics["n"],
                   "avg_at_n": metrics["avg_at_n"],
                   "pass_at_k": {str(k): metrics["pass_at_k"][str(k)] for k in ev.k_list},
                   "self_similarity": metrics["self_similarity"]}
            if watch:
                self.watched.append(metrics["pass_at_k"][str(self.horizon.k)])
                row[f"pass_at_{self.horizon.k}_watched"] = self.watched[-1]
            out.append(row)
        self.rows += out
        return out

    def horizon_reached(self, steps_done: int) -> bool:
        from rloop.evaluate import horizon_reached

        h = self.horizon
        return h is not None and steps_done >= h.min_steps and horizon_reached(self.watched, h.patience)

    def latest(self) -> dict:
        """The last evaluation of each set, flattened for the stage summary."""
        out = {}
        for row in self.rows:
            ks = row["pass_at_k"]
            k_max = max(ks, key=int)
            out[f"during_{row['set']}_avg_at_n"] = row["avg_at_n"]
            out[f"during_{row['set']}_pass_at_{k_max}"] = ks[k_max]
        return out


@contextmanager
def _eval_mode(model):
    """The model in eval mode (no dropout) while it is evaluated, back in its own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
