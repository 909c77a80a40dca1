"""`rft`: rejection-sampling fine-tuning — response-token NLL of P_k on the expert set → P_{k+1}.

Trains on the expert rows' prompt and response token ids exactly as they were sampled (no
re-tokenization). With an empty expert set (nothing solved) P_{k+1} = P_k unchanged, recorded in the summary.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

from rloop.plan import rft_init_policy
from rloop.pool import TOKEN_COLUMNS
from rloop.progress import Progress
from rloop.stages.common import InputError, StageContext


def run(ctx: StageContext) -> dict:
    from rloop.policy import load_policy, prepare_for_training, save_policy
    from rloop.train.distributed import close_world, init_world, make_optimizer
    from rloop.train.sft import epochs_to_steps, mean_nll, sft_train

    spec, k = ctx.spec, ctx.iteration
    cfg, dtype = spec.loop.rft, spec.model.dtype
    world = init_world(spec.loop.distributed.timeout_seconds)
    verify_id = f"iter-{k:03d}/verify"
    experts = ctx.read_parquet(verify_id, "expert.parquet")
    if experts and not set(TOKEN_COLUMNS) <= experts[0].keys():
        raise InputError(f"{verify_id}/expert.parquet has no {' / '.join(TOKEN_COLUMNS)} columns (written by an "
                         f"older rloop); delete iter-{k:03d}/rl and iter-{k:03d}/verify from the store to re-run them")
    model, tok = load_policy(ctx.policy_dir(rft_init_policy(spec, k)), dtype, training=True)
    pairs = [(list(r["prompt_token_ids"]), list(r["response_token_ids"])) for r in experts]
    summary: dict = {"expert_trajectories": len(pairs), "init_policy": rft_init_policy(spec, k)}
    optimizer = None
    if pairs:
        pad = tok.pad_token_id
        nll_before = mean_nll(model, pairs, pad_id=pad, compute_dtype=dtype) if world.is_main else float("nan")
        model = prepare_for_training(model, spec.model.lora, spec.model.gradient_checkpointing)
        steps = epochs_to_steps(len(pairs), cfg.batch_size, cfg.epochs, cfg.max_steps)
        optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=0.0, max_grad_norm=1.0, dtype=dtype, world=world,
                                   distributed=spec.loop.distributed)
        bar = Progress(steps, f"iter {k} rft", enabled=world.is_main)
        res = sft_train(model, pairs, pad_id=pad, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=k,
                        micro_batch_size=cfg.micro_batch_size, compute_dtype=dtype, optimizer=optimizer, world=world,
                        on_step=lambda s, loss: bar.update(1, nll=loss))
        bar.close()
        summary |= {"steps": res.steps, "expert_tokens": sum(len(r) for _, r in pairs), "nll_before": nll_before}
    else:
        summary |= {"steps": 0, "note": "empty expert set: policy unchanged"}
    if world.size > 1:
        summary["processes"] = world.size
    # Every process takes part (ZeRO-3 gathers the weights); rank 0 alone measures, saves and commits.
    trained = optimizer.main_model() if optimizer is not None else nullcontext(model if world.is_main else None)
    with trained as whole:
        if whole is not None:
            if spec.model.lora is not None and pairs:
                whole = whole.merge_and_unload()
            if pairs:
                summary["nll_after"] = mean_nll(whole, pairs, pad_id=tok.pad_token_id, compute_dtype=dtype)
            with ctx.store.stage_writer(ctx.stage.id) as w, tempfile.TemporaryDirectory() as tmp:
                save_policy(whole, tok, Path(tmp) / "policy", dtype)
                w.put_dir("policy", Path(tmp) / "policy")
                ctx.commit(w, summary)
    close_world(world)
    return summary if world.is_main else {"rank": world.rank}
