"""Supervised fine-tuning on (prompt, response) pairs: the RFT stage and the tiny model's warm-up.

Loss = NLL of response tokens only (prompt tokens are context, never targets).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rloop.policy import trainable_parameters
from rloop.train.algos import response_nll
from rloop.train.batching import forward_logprobs, pack


@dataclass
class SFTResult:
    steps: int
    first_loss: float
    last_loss: float


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], add_special_tokens: bool = True):
    """Token ids of prompts and of responses (+EOS, so the model learns to stop)."""
    prompts = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p, _ in pairs]
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, r in pairs]
    return prompts, responses


@torch.no_grad()
def mean_nll(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 256) -> float:
    """Token-mean response NLL over all pairs (how well the model fits an expert set)."""
    prompts, responses = encode_pairs(tokenizer, pairs)
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(pairs), batch_size):
        b = pack(prompts[i : i + batch_size], responses[i : i + batch_size], tokenizer.pad_token_id).to(dev)
        lp, _ = forward_logprobs(model, b)
        total += float(-(lp * b.response_mask).sum())
        count += int(b.response_mask.sum())
    model.train(was_training)
    return total / max(count, 1)


def sft_train(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]] | Callable[[int], Sequence[tuple[str, str]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> SFTResult:
    """AdamW on response NLL for `steps` steps. `pairs` is a fixed list (shuffled into epochs) or a
    function step -> fresh batch (the warm-up draws new synthetic pairs every step)."""
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    first = last = float("nan")
    for step in range(steps):
        if callable(pairs):
            batch_pairs = pairs(step)
        else:
            if len(order) < batch_size:
                fresh = list(range(len(pairs)))
                rng.shuffle(fresh)
                order += fresh
            batch_pairs = [pairs[i] for i in order[:batch_size]]
            del order[:batch_size]
        prompts, responses = encode_pairs(tokenizer, batch_pairs)
        b = pack(prompts, responses, tokenizer.pad_token_id).to(dev)
        lp, _ = forward_logprobs(model, b)
        loss = response_nll(lp, b.response_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
        opt.step()
        last = loss.item()
        if step == 0:
            first = last
        if on_step:
            on_step(step, last)
    return SFTResult(steps, first, last)


def epochs_to_steps(num_pairs: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    per_epoch = max(1, -(-num_pairs // batch_size))
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps
