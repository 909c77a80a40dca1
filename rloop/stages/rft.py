"""`rft`: rejection-sampling fine-tuning — response-token NLL of P_k on the expert set → P_{k+1}.

Trains on the expert rows' prompt and response token ids exactly as they were sampled (no
re-tokenization). With an empty expert set (nothing solved) P_{k+1} = P_k unchanged, recorded in the summary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tqdm import tqdm

from rloop.plan import rft_init_policy
from rloop.pool import TOKEN_COLUMNS
from rloop.stages.common import InputError, StageContext


def run(ctx: StageContext) -> dict:
    from rloop.policy import load_policy, prepare_for_training, save_policy
    from rloop.train.sft import epochs_to_steps, mean_nll, sft_train

    spec, k = ctx.spec, ctx.iteration
    cfg, dtype = spec.loop.rft, spec.model.dtype
    verify_id = f"iter-{k:03d}/verify"
    experts = ctx.read_parquet(verify_id, "expert.parquet")
    if experts and not set(TOKEN_COLUMNS) <= experts[0].keys():
        raise InputError(f"{verify_id}/expert.parquet has no {' / '.join(TOKEN_COLUMNS)} columns (written by an "
                         f"older rloop); delete iter-{k:03d}/rl and iter-{k:03d}/verify from the store to re-run them")
    model, tok = load_policy(ctx.policy_dir(rft_init_policy(spec, k)), dtype, training=True)
    pairs = [(list(r["prompt_token_ids"]), list(r["response_token_ids"])) for r in experts]
    summary: dict = {"expert_trajectories": len(pairs), "init_policy": rft_init_policy(spec, k)}
    if pairs:
        pad = tok.pad_token_id
        nll_before = mean_nll(model, pairs, pad_id=pad, compute_dtype=dtype)
        model = prepare_for_training(model, spec.model.lora, spec.model.gradient_checkpointing)
        steps = epochs_to_steps(len(pairs), cfg.batch_size, cfg.epochs, cfg.max_steps)
        bar = tqdm(total=steps, desc=f"iter {k} rft", unit="step", leave=False)
        res = sft_train(model, pairs, pad_id=pad, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=k,
                        micro_batch_size=cfg.micro_batch_size, compute_dtype=dtype,
                        on_step=lambda s, loss: (bar.update(1), bar.set_postfix(nll=f"{loss:.3f}")))
        bar.close()
        if spec.model.lora is not None:
            model = model.merge_and_unload()
        summary |= {"steps": res.steps, "expert_tokens": sum(len(r) for _, r in pairs), "nll_before": nll_before,
                    "nll_after": mean_nll(model, pairs, pad_id=pad, compute_dtype=dtype)}
    else:
        summary |= {"steps": 0, "note": "empty expert set: policy unchanged"}
    with ctx.store.stage_writer(ctx.stage.id) as w, tempfile.TemporaryDirectory() as tmp:
        save_policy(model, tok, Path(tmp) / "policy", dtype)
        w.put_dir("policy", Path(tmp) / "policy")
        w.commit(summary)
    return summary
