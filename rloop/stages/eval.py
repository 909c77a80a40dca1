"""`eval`: n samples per held-out prompt from a policy → avg@n, unbiased pass@k, forgetting rate
against the previous evaluation of the same set, and n-gram self-similarity of responses."""

from __future__ import annotations

from collections import defaultdict

from rloop.evaluate import avg_at_n, forgetting_rate, mean_self_similarity, pass_at_k_mean
from rloop.plan import dependencies, policy_out
from rloop.stages.common import InputError, StageContext, load_dataset, parquet_bytes
from rloop.stages.rollout import sample_and_score


def eval_metrics(rows: list[dict], k_list: list[int], prev_rows: list[dict] | None) -> dict:
    """Pure: metrics from scored samples (prompt_id, response, correct)."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r)
    correct = [[bool(r["correct"]) for r in v] for v in by_prompt.values()]
    counts = [(len(c), sum(c)) for c in correct]
    out = {
        "num_prompts": len(by_prompt),
        "n": min(len(c) for c in correct),
        "avg_at_n": avg_at_n(correct),
        "pass_at_k": {str(k): pass_at_k_mean(counts, k) for k in k_list},
        "self_similarity": mean_self_similarity([[r["response"] for r in v] for v in by_prompt.values()]),
        "forgetting_rate": None,
    }
    if prev_rows is not None:
        before: dict[str, bool] = defaultdict(bool)
        for r in prev_rows:
            before[r["prompt_id"]] |= bool(r["correct"])
        after = {pid: any(r["correct"] for r in v) for pid, v in by_prompt.items()}
        out["forgetting_rate"] = forgetting_rate(dict(before), after)
    return out


def run(ctx: StageContext) -> dict:
    from rloop.policy import load_policy

    spec, stage = ctx.spec, ctx.stage
    sets = {s.name: s for s in spec.data.eval}
    if stage.eval_set not in sets:
        raise InputError(f"--set {stage.eval_set!r} is not in data.eval (have {sorted(sets)})")
    es = sets[stage.eval_set]
    policy = "base/init/policy" if stage.iteration is None else policy_out(spec, stage.iteration)
    examples = load_dataset(es, f"data.eval[{es.name}]")
    policy_dir = ctx.policy_dir(policy)
    model, tok = load_policy(policy_dir, spec.model.dtype)
    ev = spec.loop.eval
    rows = sample_and_score(ctx, model, tok, examples, n=es.samples_per_prompt, temperature=ev.temperature,
                            model_path=policy_dir,
                            top_p=ev.top_p, max_tokens=ev.max_response_tokens or spec.loop.rl.max_response_tokens,
                            seed=ev.seed, desc=f"eval {stage.prefix} {es.name}")
    prev = [d for d in dependencies(spec, stage) if d.kind == "eval"]
    prev_rows = ctx.read_parquet(prev[0].id, "samples.parquet") if prev else None
    metrics = {"set": es.name, "iteration": stage.iteration, "policy": policy,
               **eval_metrics(rows, ev.k_list, prev_rows)}
    with ctx.store.stage_writer(stage.id) as w:
        w.put_bytes("samples.parquet", parquet_bytes(rows))
        w.put_json("metrics.json", metrics)
        ctx.commit(w, metrics)
    return metrics

