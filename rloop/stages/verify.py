"""`verify`: pool of scored trajectories → expert set (RLoop's filter) and pool statistics.

Rewards were computed by the verifier during RL (or the rollout stage); this stage applies the
RLoop filter: correct trajectories of prompts the policy has not mastered (pooled pass rate
<= filter.maxPassRate), deduplicated, at most filter.maxPerPrompt per prompt.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from rloop.evaluate import coverage
from rloop.spec import FilterSpec
from rloop.stages.common import InputError, StageContext, parquet_bytes


def select_experts(pool: list[dict[str, Any]], cfg: FilterSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pure filter. pool rows need prompt_id, prompt, response, correct, finish_reason (and step).
    The pass rate counts every trajectory; truncated ones are candidates only with includeTruncated.
    With fromStep only the pool window of later steps counts (rows without a step are always in)."""
    pool_all = pool
    if cfg.from_step:
        pool = [r for r in pool if int(r.get("step", cfg.from_step)) >= cfg.from_step]
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in pool:
        by_prompt[r["prompt_id"]].append(r)
    rng = random.Random(cfg.seed)
    experts: list[dict[str, Any]] = []
    kept_prompts = mastered = 0
    for pid in sorted(by_prompt):
        rows = by_prompt[pid]
        rate = sum(bool(r["correct"]) for r in rows) / len(rows)
        if rate > cfg.max_pass_rate:
            mastered += 1
            continue
        cands = [r for r in rows if r["correct"] and (cfg.include_truncated or r["finish_reason"] != "length")]
        if cfg.dedup:
            seen: dict[str, dict[str, Any]] = {}
            for r in cands:
                seen.setdefault(_response_key(r), r)
            cands = list(seen.values())
        if len(cands) > cfg.max_per_prompt:
            cands = rng.sample(cands, cfg.max_per_prompt)
        if cands:
            kept_prompts += 1
        experts += [{**r, "pool_pass_rate": rate} for r in cands]
    stats = {
        "pool_trajectories": len(pool_all),
        "pool_correct": sum(bool(r["correct"]) for r in pool),
        "pool_prompts": len(by_prompt),
        "prompts_over_max_pass_rate": mastered,
        "expert_prompts": kept_prompts,
        "expert_trajectories": len(experts),
        "truncated_correct": sum(bool(r["correct"]) and r["finish_reason"] == "length" for r in pool),
        "distinct_correct_responses": len({_response_key(r) for r in pool if r["correct"]}),
    }
    if cfg.from_step:
        stats["window_trajectories"] = len(pool)
    if pool_all and "step" in pool_all[0]:  # coverage describes the whole RL run, not the window
        solved: dict[str, list[tuple[int, bool]]] = defaultdict(list)
        for r in pool_all:
            solved[r["prompt_id"]].append((int(r["step"]), bool(r["correct"])))
        stats |= coverage(solved)
    return experts, stats


def accumulate(earlier: list[dict[str, Any]], new: list[dict[str, Any]], dedup: bool) -> list[dict[str, Any]]:
    """Earlier iterations' experts followed by this one's; with dedup a (prompt, response) already there
    is not added again. Pure."""
    if not dedup:
        return earlier + new
    seen = {_response_key(r) for r in earlier}
    return earlier + [r for r in new if _response_key(r) not in seen]


def _response_key(row: dict[str, Any]) -> tuple[str, str]:
    """What makes two expert rows the same answer: the prompt and the response text, trimmed."""
    return row["prompt_id"], row["response"].strip()


def run(ctx: StageContext) -> dict:
    spec, k = ctx.spec, ctx.iteration
    if spec.loop.pool.source == "checkpoints":
        pool = ctx.read_parquet(f"iter-{k:03d}/rollout", "samples.parquet")
    else:
        pool = ctx.read_parquet(f"iter-{k:03d}/rl", "pool/trajectories.parquet")
    if not pool:
        raise InputError(f"iteration {k}: the trajectory pool is empty")
    experts, stats = select_experts(pool, spec.loop.filter)
    if spec.loop.filter.accumulate and k > 0:  # iteration k-1's set already holds every earlier one
        earlier = ctx.read_parquet(f"iter-{k - 1:03d}/verify", "expert.parquet")
        experts = accumulate(earlier, experts, spec.loop.filter.dedup)
        stats |= {"earlier_expert_trajectories": len(earlier), "expert_trajectories": len(experts)}
    with ctx.store.stage_writer(ctx.stage.id) as w:
        w.put_bytes("expert.parquet", parquet_bytes(experts))
        w.put_json("stats.json", stats)
        ctx.commit(w, stats)
    return stats
