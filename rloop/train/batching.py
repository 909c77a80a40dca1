"""Packing (prompt, response) token lists into right-padded training tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rloop.train.algos import token_entropy, token_logprobs


@dataclass
class PackedBatch:
    """input_ids/attention_mask [B, L]; targets/response_mask [B, L-1] aligned with logits[:, :-1]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor

    def to(self, dev: torch.device) -> PackedBatch:
        return PackedBatch(*(t.to(dev) for t in (self.input_ids, self.attention_mask, self.targets, self.response_mask)))

    def rows(self, idx: torch.Tensor | slice) -> PackedBatch:
        return PackedBatch(self.input_ids[idx], self.attention_mask[idx], self.targets[idx], self.response_mask[idx])


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    """Concatenate each prompt with its response, right-pad to the longest, and mark which target
    positions are response tokens (only those are trained on)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    resp = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p) : len(p) + len(r)] = True
    # logits at position t predict token t+1: shift targets and the response mask by one.
    return PackedBatch(ids, attn, ids[:, 1:].clone(), resp[:, 1:].clone())


def forward_logprobs(model, batch: PackedBatch, *, with_entropy: bool = False):
    """Per-token logprobs of the targets [B, L-1] (and entropies [B, L-1] when asked)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    lp = token_logprobs(logits, batch.targets)
    if not with_entropy:
        return lp, None
    with torch.no_grad():
        ent = token_entropy(logits.detach())
    return lp, ent
