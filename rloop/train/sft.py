"""Supervised fine-tuning on (prompt ids, response ids) pairs: the RFT stage and the tiny model's warm-up.

Loss = NLL of response tokens only (prompt tokens are context, never targets). RFT passes the exact
token ids that were sampled during RL (`rloop.pool`), so it trains on what the model produced:
no re-tokenization, no second BOS, no EOS appended to a response that was cut off.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rloop.policy import autocast
from rloop.train.algos import response_nll
from rloop.train.batching import PackedBatch, forward_logprobs, pack
from rloop.train.distributed import SINGLE, PolicyOptimizer, TorchOptimizer, World


@dataclass
class SFTResult:
    steps: int
    first_loss: float
    last_loss: float


TokenPair = tuple[list[int], list[int]]
"""(prompt token ids, response token ids): exactly what the model saw and what it should produce."""


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[TokenPair]:
    """Token pairs for text pairs the model never sampled (the tiny model's synthetic warm-up):
    prompt with the tokenizer's special tokens, response + EOS so the model learns to stop.
    RFT never uses this: it trains on the pool's sampled ids."""
    return [(list(tokenizer(p)["input_ids"]), list(tokenizer(r, add_special_tokens=False)["input_ids"])
             + [tokenizer.eos_token_id]) for p, r in pairs]


def _pack(pairs: Sequence[TokenPair], pad_id: int, dev) -> PackedBatch:
    return pack([p for p, _ in pairs], [r for _, r in pairs], pad_id).to(dev)


@torch.no_grad()
def mean_nll(model, pairs: Sequence[TokenPair], *, pad_id: int, batch_size: int = 256,
             compute_dtype: str = "float32") -> float:
    """Token-mean response NLL over all pairs (how well the model fits an expert set)."""
    dev = next(model.parameters()).device
    context = autocast(compute_dtype, dev)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(pairs), batch_size):
        b = _pack(pairs[i : i + batch_size], pad_id, dev)
        with context():
            lp, _ = forward_logprobs(model, b)
        total += float(-(lp * b.response_mask).sum())
        count += int(b.response_mask.sum())
    model.train(was_training)
    return total / max(count, 1)


def sft_train(
    model,
    pairs: Sequence[TokenPair] | Callable[[int], Sequence[TokenPair]],
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    micro_batch_size: int | None = None,
    compute_dtype: str = "float32",
    on_step: Callable[[int, float], None] | None = None,
    optimizer: PolicyOptimizer | None = None,
    world: World = SINGLE,
) -> SFTResult:
    """AdamW on response NLL for `steps` steps. `pairs` is a fixed list (shuffled into epochs) or a
    function step -> fresh batch (the warm-up draws new synthetic pairs every step).

    Each step is one optimizer step on `batch_size` pairs; `micro_batch_size` accumulates gradients
    over smaller forward/backward passes (memory only: the loss is the batch's token mean either way).

    Several processes (`world`, with a DeepSpeed `optimizer` from rloop.train.distributed): all draw the
    same batch (same seed), each trains on its share, normalised by the whole batch's token count, and
    all run as many micro-batches as the largest share needs (idle ones past their own rows).
    """
    dev = next(model.parameters()).device
    context = autocast(compute_dtype, dev)
    if optimizer is None:
        optimizer = TorchOptimizer(model, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    rng = random.Random(seed)
    idle = _pack([([pad_id], [pad_id])], pad_id, dev)
    order: list[int] = []
    model.train()
    first = last = float("nan")
    for step in range(steps):
        if callable(pairs):
            batch_pairs = list(pairs(step))
        else:
            if len(order) < batch_size:
                fresh = list(range(len(pairs)))
                rng.shuffle(fresh)
                order += fresh
            batch_pairs = [pairs[i] for i in order[:batch_size]]
            del order[:batch_size]
        tokens = float(sum(len(r) for _, r in batch_pairs))
        mine = world.shard(batch_pairs)
        largest_share = len(world.shard(batch_pairs, rank=0))  # shares differ by one at most, rank 0's first
        micro = micro_batch_size or largest_share
        passes = -(-largest_share // micro)
        optimizer.zero_grad()
        loss_value = 0.0
        for pass_no in range(passes):
            chunk = mine[pass_no * micro : (pass_no + 1) * micro]
            b = _pack(chunk, pad_id, dev) if chunk else idle
            with context():
                lp, _ = forward_logprobs(model, b)
            loss = response_nll(lp, b.response_mask, global_tokens=tokens) if chunk else lp.sum() * 0.0
            optimizer.backward(loss, last=pass_no == passes - 1)
            loss_value += loss.item()
        optimizer.step()
        last = world.sum([loss_value])[0]
        if step == 0:
            first = last
        if on_step:
            on_step(step, last)
    return SFTResult(steps, first, last)


def epochs_to_steps(num_pairs: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    per_epoch = max(1, -(-num_pairs // batch_size))
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps
