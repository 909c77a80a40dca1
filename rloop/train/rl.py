"""The RL loop (GRPO family): each step runs named, timed phases

    rollout → verify → advantage → update → sync

and returns every trajectory it generated (the RLoop pool) plus one metrics row.

The update follows verl/TRL conventions: the trained responses are split into `miniBatches`
optimizer steps (repeated for `updateEpochs`), each normalised by its own token count (or sequence
count); `microBatchSize` only accumulates gradients inside a mini-batch (same update, less memory).
With one optimizer step per batch the policy is its own behaviour policy (ratio 1), so no separate
old-logprob pass is run. The trainer scores softmax(logits / T), the distribution the engine sampled.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from rloop.data import Example
from rloop.policy import autocast
from rloop.pool import is_correct, trajectory_row
from rloop.rollout import Completion, PromptResult, RolloutEngine, SamplingParams
from rloop.spec import DistributedSpec, RLSpec
from rloop.train.algos import (
    aggregate,
    clipped_policy_loss,
    dynamic_sampling_keep,
    group_advantages,
    kl_k3,
    overlong_penalty,
    truncated_is_weights,
)
from rloop.train.batching import PackedBatch, forward_logprobs, pack, response_values
from rloop.train.distributed import SINGLE, World, make_optimizer

Scorer = Callable[[list[str], list[Example]], list[float | None]]
# Step metrics that are means over trained tokens: NaN when a step trains on none.
_UNDEFINED_WITHOUT_TOKENS = ("loss", "entropy", "rollout_logprob_abs_diff", "rollout_is_weight_mean",
                             "rollout_is_capped_share")
# Update stats that are sums of per-process shares (their denominators are global counts).
_SUMMED_OVER_PROCESSES = ("loss", "clip_fraction", "entropy", "kl", "rollout_logprob_abs_diff",
                          "rollout_is_weight_mean", "rollout_is_capped_share", "trained_responses")


class PromptSampler:
    """Epochs over the train prompts in a seeded shuffled order, `k` prompts per call."""

    def __init__(self, examples: Sequence[Example], seed: int):
        self.examples, self.rng, self.queue = list(examples), random.Random(seed), []

    def next(self, k: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < k:
            if not self.queue:
                self.queue = list(range(len(self.examples)))
                self.rng.shuffle(self.queue)
            out.append(self.examples[self.queue.pop()])
        return out


@dataclass
class StepOutput:
    metrics: dict[str, float]
    trajectories: list[dict[str, Any]]


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class _Group:
    """One prompt's n samples with their scores, shaped rewards [n] and advantages [n]."""

    example: Example
    result: PromptResult
    scores: list[float | None]
    rewards: torch.Tensor
    advantages: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """[n] 1.0 correct / 0.0 wrong / NaN unscorable."""
        return torch.tensor([float("nan") if s is None else float(is_correct(s)) for s in self.scores])


def memory_in_use_gib(device: torch.device) -> float:
    """Memory in use now, GiB: on a CUDA device all of the device's (trainer and a colocated engine alike,
    which torch's allocator stats would not both count); on CPU this process's resident set. NaN where
    neither can be read."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / (1 << 30)
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1 << 30)


def shaped_rewards(
    scores: list[float | None], lengths: list[int], finish: list[str], cfg: RLSpec
) -> torch.Tensor:
    """Verifier scores (None = unscorable → NaN) plus DAPO's overlong penalty. [B] float."""
    r = torch.tensor([float("nan") if s is None else float(s) for s in scores])
    if cfg.overlong_buffer > 0:
        pen = overlong_penalty(
            torch.tensor(lengths), max_tokens=cfg.max_response_tokens, buffer=cfg.overlong_buffer,
            penalty=cfg.overlong_penalty,
        )
        r = r + pen
    return r


def advantages_with_unscorable(rewards: torch.Tensor, *, scale: bool) -> torch.Tensor:
    """Group advantages where NaN (unscorable) entries are left out of the group's baseline and get 0.
    rewards [G, n] (may hold NaN) → [G, n]."""
    adv = torch.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        ok = ~torch.isnan(rewards[g])
        if ok.sum() >= 2:
            adv[g, ok] = group_advantages(rewards[g, ok].unsqueeze(0), scale=scale)[0]
    return adv


class RLTrainer:
    """Owns the policy, optimizer, optional reference model, and the rollout engine for one RL stage.

    `compute_dtype` is the forward precision: "bfloat16" runs forwards under bf16 autocast while the
    model holds fp32 master weights (load it with `load_policy(..., training=True)`).

    With `world` of several processes (rloop.train.distributed) every process samples its share of each
    step's prompts, the update runs under DeepSpeed ZeRO (`distributed`), and rank 0 alone gets the
    step's metrics and trajectories over all processes.
    """

    def __init__(self, model, tokenizer, engine: RolloutEngine, cfg: RLSpec, score: Scorer, *, iteration: int = 0,
                 compute_dtype: str = "float32", world: World = SINGLE, distributed: DistributedSpec | None = None):
        self.model, self.tok, self.engine, self.cfg, self.score = model, tokenizer, engine, cfg, score
        self.world = world
        self.ref = None
        if cfg.kl_coef > 0:  # frozen copy of P_k for the k3 penalty (before ZeRO shards the model)
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.dev = next(model.parameters()).device
        self.optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                                        dtype=compute_dtype, world=world, distributed=distributed)
        self.seed = cfg.seed + 1000 * iteration
        self.autocast = autocast(compute_dtype, self.dev)
        # What a process with no rows of its own feeds the model so that all run the same passes.
        self._idle_batch = pack([[tokenizer.pad_token_id]], [[tokenizer.pad_token_id]], tokenizer.pad_token_id).to(self.dev)

    def step(self, step: int, prompts: list[Example], render: Callable[[Example], str],
             more: Callable[[int], list[Example]] | None = None) -> StepOutput:
        """One RL step on `prompts` (the whole step's: every process passes the same list and samples its
        share). With dynamic sampling, groups without signal are dropped and `more(k)` supplies k fresh
        prompts per extra generation round (at most `dynamicSamplingMaxRounds` rounds; every process
        takes part in every round, so they call `more` in step)."""
        cfg, t, world = self.cfg, _Timer(), self.world
        rounds = cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling and more is not None else 1
        wanted = len(world.shard(prompts))
        generated: list[_Group] = []
        kept: list[_Group] = []
        for round_no in range(rounds):
            batch = prompts if round_no == 0 else more(len(prompts))  # type: ignore[misc]
            groups = self._sample(step, round_no, world.shard(batch), render, t)
            generated += groups
            kept += [g for g, ok in zip(groups, self._keep(groups), strict=True) if ok]
            if world.all(len(kept) >= wanted):
                break
        trained = kept[:wanted]  # DAPO: a full batch of groups with signal, no more
        memory = {"memory_used_rollout_gib": memory_in_use_gib(self.dev)}
        with t.phase("sync"):
            self.engine.sleep()  # vLLM on GPU: the KV cache (and weights) make room for the update
        with t.phase("update"):
            update_stats = self._update(trained)
        memory["memory_used_update_gib"] = memory_in_use_gib(self.dev)
        with t.phase("sync"), self.optimizer.full_parameters():
            self.engine.update_weights(self.model)  # the hf engine shares the module; vLLM loads the new weights
        if (kv_cache_gib := getattr(self.engine, "kv_cache_gib", None)) is not None:  # vLLM's, fixed at start
            memory["engine_kv_cache_gib"] = kv_cache_gib
        counts = {"groups_kept": len(kept), "groups_trained": len(trained)}
        if world.size > 1:  # rank 0 reports and pools the whole step
            everyone = world.gather((generated, counts))
            if everyone is None:
                return StepOutput(self._metrics(step, generated, counts, round_no + 1, update_stats | memory, t), [])
            generated = [g for groups, _ in everyone for g in groups]
            counts = {k: sum(c[k] for _, c in everyone) for k in counts}
        return StepOutput(self._metrics(step, generated, counts, round_no + 1, update_stats | memory, t),
                          self._trajectories(step, generated))

    # ------------------------------------------------------------------------------ phases
    def _sample(self, step: int, round_no: int, batch: list[Example], render, t: _Timer) -> list[_Group]:
        cfg, n = self.cfg, self.cfg.samples_per_prompt
        seed = self.seed + step + 100_003 * round_no + 7_919 * self.world.rank
        # ZeRO-3: the engine samples from the whole model, gathered on every process for the rollout.
        with t.phase("rollout"), self.optimizer.full_parameters():
            results = self.engine.generate(
                [render(e) for e in batch],
                SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_tokens,
                               stop=tuple(cfg.stop), seed=seed),
            )
        flat: list[tuple[Example, Completion]] = [(e, c) for e, r in zip(batch, results, strict=True) for c in r.completions]
        with t.phase("verify"):
            scores = self.score([c.text for _, c in flat], [e for e, _ in flat])
        with t.phase("advantage"):
            rewards = shaped_rewards(scores, [len(c.token_ids) for _, c in flat], [c.finish_reason for _, c in flat], cfg)
            grouped = rewards.view(len(batch), n)
            adv = advantages_with_unscorable(grouped, scale=cfg.algorithm != "dr_grpo")
        return [_Group(e, r, scores[g * n : (g + 1) * n], grouped[g], adv[g])
                for g, (e, r) in enumerate(zip(batch, results, strict=True))]

    def _keep(self, groups: list[_Group]) -> list[bool]:
        if not self.cfg.dynamic_sampling:
            return [True] * len(groups)
        return dynamic_sampling_keep(torch.stack([g.accuracy for g in groups])).tolist()

    def _update(self, groups: list[_Group]) -> dict[str, float]:
        """Policy-gradient update on the scorable responses of `groups`: `updateEpochs` x `miniBatches`
        optimizer steps, each accumulating gradients over micro-batches of `microBatchSize` sequences.

        Several processes: each splits its own rows into the mini-batches; mini-batch i of the step is
        the union of every process's i-th, normalised by its global token (or sequence) count."""
        cfg, world = self.cfg, self.world
        rows = [(g.result, c, float(a)) for g in groups
                for c, s, a in zip(g.result.completions, g.scores, g.advantages, strict=True) if s is not None]
        stats = {"loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "kl": 0.0, "grad_norm": 0.0,
                 "rollout_logprob_abs_diff": 0.0, "trained_responses": len(rows), "optimizer_steps": 0}
        if cfg.rollout_is_cap is not None:
            stats |= {"rollout_is_weight_mean": 0.0, "rollout_is_capped_share": 0.0}
        if rows:
            batch = pack([r.prompt_token_ids for r, _, _ in rows], [c.token_ids for _, c, _ in rows],
                         self.tok.pad_token_id).to(self.dev)
            rollout_lp = response_values(batch, [c.logprobs for _, c, _ in rows])
        else:  # this process kept nothing: it still takes part in every collective pass
            batch, rollout_lp = self._idle_batch, torch.zeros(self._idle_batch.response_mask.shape, device=self.dev)
        adv = torch.tensor([a for *_, a in rows], device=self.dev)
        micro = cfg.micro_batch_size or max(len(rows), 1)
        minis = torch.arange(len(rows)).tensor_split(cfg.mini_batches)
        counted = world.sum([len(rows), *(float(batch.response_mask[m].sum()) for m in minis), *(len(m) for m in minis)])
        total_rows, mini_tokens, mini_seqs = counted[0], counted[1 : 1 + len(minis)], counted[1 + len(minis) :]
        if total_rows == 0:
            return stats | {k: float("nan") for k in stats if k in _UNDEFINED_WITHOUT_TOKENS}
        passes = [int(p) for p in world.max([*(-(-len(m) // micro) for m in minis), -(-len(rows) // micro)])]
        on_policy = cfg.mini_batches == 1 and cfg.update_epochs == 1  # ratio ≡ 1: reuse the current logprobs
        old_lp = None if on_policy else self.logprobs(self.model, batch, micro, passes=passes[-1])
        ref_lp = self.logprobs(self.ref, batch, micro) if self.ref is not None else None
        passes_tokens = sum(mini_tokens) * cfg.update_epochs
        for _ in range(cfg.update_epochs):
            for mini, tokens, seqs, mini_passes in zip(minis, mini_tokens, mini_seqs, passes[:-1], strict=True):
                if seqs == 0:  # fewer responses than miniBatches in the whole step
                    continue
                step_loss = self._optimizer_step(batch, adv, mini, micro, mini_passes, old_lp, ref_lp, rollout_lp,
                                                 stats, passes_tokens, tokens, seqs)
                stats["loss"] += step_loss
                stats["optimizer_steps"] += 1
        stats["loss"] /= stats["optimizer_steps"]
        stats["grad_norm"] /= stats["optimizer_steps"]
        if world.size > 1:
            summed = world.sum([stats[k] for k in _SUMMED_OVER_PROCESSES if k in stats])
            stats |= dict(zip([k for k in _SUMMED_OVER_PROCESSES if k in stats], summed, strict=True))
        return stats

    def _optimizer_step(self, batch: PackedBatch, adv: torch.Tensor, mini: torch.Tensor, micro: int, passes: int,
                        old_lp: torch.Tensor | None, ref_lp: torch.Tensor | None, rollout_lp: torch.Tensor,
                        stats: dict, passes_tokens: float, mini_tokens: float, mini_seqs: float) -> float:
        """Accumulate the mini-batch's loss over `passes` micro-batches (idle ones past this process's
        rows), clip, step. Returns this process's share of the mini-batch loss.
        `rollout_lp` [B, L-1] are the engine's logprobs of the sampled tokens (the rollout correction).

        token_mean divides by the mini-batch's (global) token count; the sequence-mean modes weight each
        micro-batch by its share of the mini-batch's sequences, so the shares sum to the mini-batch loss."""
        cfg = self.cfg
        self.optimizer.zero_grad()
        total = 0.0
        chunks = list(mini.split(micro)) if len(mini) else []
        for pass_no in range(passes):
            last = pass_no == passes - 1
            if pass_no >= len(chunks):
                self._idle_pass(last)
                continue
            rows = chunks[pass_no]
            mb = batch.rows(rows)
            mask = mb.response_mask.float()
            with self.autocast():
                lp, ent = forward_logprobs(self.model, mb, temperature=cfg.temperature, with_entropy=True)
            old = lp.detach() if old_lp is None else old_lp[rows]
            weight = 1.0 if cfg.loss_agg == "token_mean" else len(rows) / mini_seqs
            share = float(mask.sum()) / passes_tokens
            engine_lp = rollout_lp[rows]
            stats["rollout_logprob_abs_diff"] += float(((old - engine_lp).abs() * mask).sum()) / passes_tokens
            is_weights = None
            if cfg.rollout_is_cap is not None:
                is_weights = truncated_is_weights(old, engine_lp, cap=cfg.rollout_is_cap)
                stats["rollout_is_weight_mean"] += float((is_weights * mask).sum()) / passes_tokens
                stats["rollout_is_capped_share"] += float(((is_weights >= cfg.rollout_is_cap) * mask).sum()) / passes_tokens
            loss, pg_stats = clipped_policy_loss(
                lp, old, adv[rows], mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.loss_agg,
                global_tokens=mini_tokens, norm_length=cfg.max_response_tokens, token_weights=is_weights,
            )
            loss = loss * weight
            if ref_lp is not None:
                kl_tok = kl_k3(lp, ref_lp[rows])
                loss = loss + cfg.kl_coef * weight * aggregate(kl_tok, mask, cfg.loss_agg, global_tokens=mini_tokens,
                                                               norm_length=cfg.max_response_tokens)
                stats["kl"] += float((kl_tok.detach() * mask).sum()) / passes_tokens
            self.optimizer.backward(loss, last=last)
            total += loss.item()
            stats["clip_fraction"] += pg_stats["clip_fraction"] * share
            stats["entropy"] += float((ent * mask).sum()) / passes_tokens
        stats["grad_norm"] += self.optimizer.step()
        return total

    def _idle_pass(self, last: bool) -> None:
        """A forward and backward that change nothing (loss x 0), so this process runs as many passes as
        the one with the most rows (ZeRO-3 gathers parameters inside every pass)."""
        with self.autocast():
            lp, _ = forward_logprobs(self.model, self._idle_batch, temperature=self.cfg.temperature)
        self.optimizer.backward(lp.sum() * 0.0, last=last)

    @torch.no_grad()
    def logprobs(self, model, batch: PackedBatch, micro: int, passes: int | None = None) -> torch.Tensor:
        """[B, L-1] logprobs of the batch's responses under `model`, micro-batch by micro-batch; with
        `passes` beyond this process's micro-batches, idle forwards follow (the trained model under ZeRO-3)."""
        parts = []
        chunks = list(torch.arange(batch.input_ids.shape[0]).split(micro))
        for pass_no in range(max(passes or 0, len(chunks))):
            with self.autocast():
                rows = batch.rows(chunks[pass_no]) if pass_no < len(chunks) else self._idle_batch
                lp = forward_logprobs(model, rows, temperature=self.cfg.temperature)[0]
            if pass_no < len(chunks):
                parts.append(lp)
        return torch.cat(parts)

    # ------------------------------------------------------------------------------ reporting
    def _metrics(self, step: int, generated: list[_Group], counts: dict[str, int], rounds: int,
                 update_stats: dict, t: _Timer) -> dict[str, float]:
        scores = [s for g in generated for s in g.scores]
        scored = [s for s in scores if s is not None]
        rewards = torch.cat([g.rewards for g in generated])
        gen_tokens = sum(len(c.token_ids) for g in generated for c in g.result.completions)
        return {
            "step": step,
            "reward": float(torch.nanmean(rewards)) if scored else float("nan"),
            "pass_rate": sum(is_correct(s) for s in scores) / len(scores),
            "generation_rounds": rounds,
            "groups_generated": len(generated),
            **counts,
            "unscorable": len(scores) - len(scored),
            "response_tokens_mean": gen_tokens / len(scores),
            "truncated_share": sum(c.finish_reason == "length" for g in generated for c in g.result.completions)
            / len(scores),
            "tokens_per_s": gen_tokens / max(sum(t.seconds.values()), 1e-9),  # whole step: RL throughput
            "rollout_tokens_per_s": gen_tokens / max(t.seconds["rollout"], 1e-9),
            **update_stats,
            **{f"time_{k}_s": v for k, v in t.seconds.items()},
        }

    def _trajectories(self, step: int, generated: list[_Group]) -> list[dict[str, Any]]:
        return [
            trajectory_row(g.example, g.result.prompt, g.result.prompt_token_ids, c, s, step=step, reward=float(rw))
            for g in generated
            for c, s, rw in zip(g.result.completions, g.scores, g.rewards.tolist(), strict=True)
        ]
