"""`rft`: rejection-sampling fine-tuning — response-token NLL of P_k on the expert set → P_{k+1}.

With an empty expert set (nothing solved) P_{k+1} = P_k unchanged, recorded in the summary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tqdm import tqdm

from rloop.plan import rft_init_policy
from rloop.stages.common import StageContext


def run(ctx: StageContext) -> dict:
    from rloop.policy import attach_lora, load_policy, save_policy
    from rloop.train.sft import epochs_to_steps, mean_nll, sft_train

    spec, k = ctx.spec, ctx.iteration
    cfg = spec.loop.rft
    experts = ctx.read_parquet(f"iter-{k:03d}/verify", "expert.parquet")
    model, tok = load_policy(ctx.policy_dir(rft_init_policy(spec, k)), spec.model.dtype)
    pairs = [(r["prompt"], r["response"]) for r in experts]
    summary: dict = {"expert_trajectories": len(pairs), "init_policy": rft_init_policy(spec, k)}
    if pairs:
        nll_before = mean_nll(model, tok, pairs)
        model = attach_lora(model, spec.model.lora)
        steps = epochs_to_steps(len(pairs), cfg.batch_size, cfg.epochs, cfg.max_steps)
        bar = tqdm(total=steps, desc=f"iter {k} rft", unit="step", leave=False)
        res = sft_train(model, tok, pairs, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=k,
                        on_step=lambda s, loss: (bar.update(1), bar.set_postfix(nll=f"{loss:.3f}")))
        bar.close()
        if spec.model.lora is not None:
            model = model.merge_and_unload()
        summary |= {"steps": res.steps, "nll_before": nll_before, "nll_after": mean_nll(model, tok, pairs)}
    else:
        summary |= {"steps": 0, "note": "empty expert set: policy unchanged"}
    with ctx.store.stage_writer(ctx.stage.id) as w, tempfile.TemporaryDirectory() as tmp:
        save_policy(model, tok, Path(tmp) / "policy")
        w.put_dir("policy", Path(tmp) / "policy")
        w.commit(summary)
    return summary
