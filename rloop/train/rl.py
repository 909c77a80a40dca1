"""The RL loop (GRPO family): each step runs named, timed phases

    rollout → verify → advantage → update → sync

and returns every trajectory it generated (the RLoop pool) plus one metrics row.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from rloop.data import Example
from rloop.policy import trainable_parameters
from rloop.rollout import PromptResult, RolloutEngine, SamplingParams
from rloop.spec import RLSpec
from rloop.train.algos import (
    aggregate,
    clipped_policy_loss,
    dynamic_sampling_keep,
    group_advantages,
    kl_k3,
    overlong_penalty,
)
from rloop.train.batching import PackedBatch, forward_logprobs, pack

Scorer = Callable[[list[str], list[Example]], list[float | None]]


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
    """Owns the policy, optimizer, optional reference model, and the rollout engine for one RL stage."""

    def __init__(self, model, tokenizer, engine: RolloutEngine, cfg: RLSpec, score: Scorer, *, iteration: int = 0):
        self.model, self.tok, self.engine, self.cfg, self.score = model, tokenizer, engine, cfg, score
        self.opt = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ref = None
        if cfg.kl_coef > 0:  # frozen copy of P_k for the k3 penalty
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.seed = cfg.seed + 1000 * iteration
        self.dev = next(model.parameters()).device

    def step(self, step: int, batch: list[Example], render: Callable[[Example], str]) -> StepOutput:
        cfg, t = self.cfg, _Timer()
        n = cfg.samples_per_prompt
        with t.phase("rollout"):
            results = self.engine.generate(
                [render(e) for e in batch],
                SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_tokens=cfg.max_response_tokens, stop=tuple(cfg.stop), seed=self.seed + step),
            )
        flat = [(e, r, c) for e, r in zip(batch, results, strict=True) for c in r.completions]
        with t.phase("verify"):
            scores = self.score([c.text for _, _, c in flat], [e for e, _, _ in flat])
        with t.phase("advantage"):
            rewards = shaped_rewards(scores, [len(c.token_ids) for *_, c in flat], [c.finish_reason for *_, c in flat], cfg)
            grouped = rewards.view(len(batch), n)
            adv = advantages_with_unscorable(grouped, scale=cfg.algorithm != "dr_grpo")
            keep = (
                dynamic_sampling_keep(torch.nan_to_num(grouped, nan=-1e9)) if cfg.dynamic_sampling
                else torch.ones(len(batch), dtype=torch.bool)
            )
            trainable = (keep.repeat_interleave(n) & ~torch.isnan(rewards)).tolist()
        with t.phase("update"):
            upd = self._update(flat, adv.flatten(), trainable, results)
        with t.phase("sync"):
            self.engine.update_weights(self.model)  # the hf engine shares the module; vLLM reloads weights

        correct = [s is not None and s >= 1.0 for s in scores]
        gen_tokens = sum(len(c.token_ids) for *_, c in flat)
        scored = [s for s in scores if s is not None]
        metrics = {
            "step": step,
            "reward": float(torch.nanmean(rewards)) if scored else float("nan"),
            "pass_rate": sum(correct) / len(correct),
            "groups_kept": int(keep.sum()),
            "unscorable": len(scores) - len(scored),
            "response_tokens_mean": gen_tokens / len(flat),
            "tokens_per_s": gen_tokens / max(sum(t.seconds.values()), 1e-9),  # whole step: RL throughput
            "rollout_tokens_per_s": gen_tokens / max(t.seconds["rollout"], 1e-9),
            **upd,
            **{f"time_{k}_s": v for k, v in t.seconds.items()},
        }
        trajectories = [
            {
                "step": step, "prompt_id": e.id, "prompt": r.prompt, "response": c.text, "score": s,
                "reward": float(rw), "correct": ok, "response_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                "ground_truth": e.answer,
            }
            for (e, r, c), s, rw, ok in zip(flat, scores, rewards.tolist(), correct, strict=True)
        ]
        return StepOutput(metrics, trajectories)

    def _update(self, flat, adv: torch.Tensor, trainable: list[bool], results: list[PromptResult]) -> dict[str, float]:
        """Policy-gradient update on the trainable responses, split into `mini_batches` optimizer steps."""
        cfg = self.cfg
        idx = [i for i, ok in enumerate(trainable) if ok]
        if not idx:
            return {"loss": float("nan"), "clip_fraction": 0.0, "entropy": float("nan"), "kl": 0.0, "grad_norm": 0.0,
                    "trained_responses": 0}
        batch = pack([flat[i][1].prompt_token_ids for i in idx], [flat[i][2].token_ids for i in idx],
                     self.tok.pad_token_id).to(self.dev)
        adv = adv[idx].to(self.dev)
        with torch.no_grad():  # behaviour-policy logprobs recomputed by the trainer (as verl does)
            old_lp, _ = forward_logprobs(self.model, batch)
            ref_lp = forward_logprobs(self.ref, batch)[0] if self.ref is not None else None
        global_tokens = float(batch.response_mask.sum())
        chunks = torch.arange(len(idx)).chunk(min(cfg.mini_batches, len(idx)))
        stats = {"loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "kl": 0.0, "grad_norm": 0.0}
        for rows in chunks:
            mb: PackedBatch = batch.rows(rows)
            lp, ent = forward_logprobs(self.model, mb, with_entropy=True)
            mb_tokens = float(mb.response_mask.sum())
            # token_mean normalises by the whole step's token count, so mini-batches add up to DAPO's loss.
            loss, pst = clipped_policy_loss(
                lp, old_lp[rows], adv[rows], mb.response_mask.float(), clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                agg=cfg.loss_agg, global_tokens=global_tokens, norm_length=cfg.max_response_tokens,
            )
            if cfg.loss_agg != "token_mean":
                loss = loss * len(rows) / len(idx)  # sequence-mean modes: weight mini-batches by size
            kl = torch.zeros((), device=self.dev)
            if ref_lp is not None:
                kl = aggregate(kl_k3(lp, ref_lp[rows]), mb.response_mask.float(), "token_mean", global_tokens=mb_tokens)
                loss = loss + cfg.kl_coef * kl * mb_tokens / global_tokens
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), cfg.max_grad_norm)
            self.opt.step()
            w = mb_tokens / global_tokens
            stats["loss"] += loss.item()
            stats["clip_fraction"] += pst["clip_fraction"] * w
            stats["entropy"] += float((ent * mb.response_mask).sum()) / global_tokens
            stats["kl"] += kl.item() * w
            stats["grad_norm"] += float(gn) / len(chunks)
        stats["trained_responses"] = len(idx)
        return stats
