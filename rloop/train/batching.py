"""Packing (prompt, response) token lists into right-padded training tensors, and the trainer's
forward pass: log-probabilities of the response tokens only.

Memory on the hot path decides whether a 7B step fits, so `forward_logprobs` never builds the
[B, L, V] logits of a whole batch: it runs the decoder, keeps the hidden states of response positions
only, and applies the LM head to them in chunks of bounded size. Logprobs of the chosen tokens and
(detached) entropies come out per chunk; with gradients on, a chunk's logits are recomputed in
backward instead of being kept, so the peak is one chunk's [n, V], not [tokens, V].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rloop.train.algos import token_entropy, token_logprobs

# Upper bound on one chunk's fp32 logits (rows x vocabulary floats): 2^26 floats = 256 MiB.
_CHUNK_FLOATS = 2**26


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


def response_values(batch: PackedBatch, values: list[list[float]]) -> torch.Tensor:
    """Per-response-token values (one list per row, one value per response token, e.g. the engine's
    sampling logprobs) laid out like the batch's targets: [B, L-1], zero outside the response mask."""
    lengths = batch.response_mask.sum(dim=1).tolist()
    if [len(v) for v in values] != lengths:
        raise ValueError(f"{[len(v) for v in values]} values per row for {lengths} response tokens")
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.response_mask.device)
    # A row's response positions are contiguous and in order, so a boolean-mask assignment (row-major)
    # puts the concatenated values exactly on them.
    out[batch.response_mask] = torch.tensor([x for row in values for x in row], dtype=torch.float32,
                                            device=out.device)
    return out


def _decoder_and_head(model):
    """(decoder, lm_head) of a causal LM (through a peft wrapper), or None when its logits are more
    than head(hidden) (softcapping, logit scales): those models take the full forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and head is not None else None


def _chunk_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """hidden [n, H], targets [n] -> logprobs [n] of softmax(head(hidden) / T) (checkpointed path)."""
    return token_logprobs(head(hidden).float() / temperature, targets)


def forward_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0, with_entropy: bool = False):
    """Per-token logprobs of the targets under softmax(logits / temperature), [B, L-1], zero outside the
    response mask (and detached entropies [B, L-1] when asked).

    The temperature is the sampler's: the policy that sampled the tokens is softmax(logits / T), so the
    ratio, entropy and KL are that policy's (as verl and TRL do).
    """
    mask = batch.response_mask
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    ent = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) if with_entropy else None
    parts = _decoder_and_head(model)
    if parts is None:  # fallback: full logits
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
        logits = logits[mask].float() / temperature
        out[mask] = token_logprobs(logits, batch.targets[mask])
        if ent is not None:
            with torch.no_grad():
                ent[mask] = token_entropy(logits.detach())
        return out, ent
    decoder, head = parts
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    hidden, targets = hidden[:, :-1][mask], batch.targets[mask]  # [N, H], [N]: response positions only
    rows = max(1, _CHUNK_FLOATS // getattr(head, "out_features", 1 << 16))
    recompute = torch.is_grad_enabled() and hidden.shape[0] > rows
    picked, entropies = [], []
    for s in range(0, hidden.shape[0], rows):
        h, t = hidden[s : s + rows], targets[s : s + rows]
        if recompute:  # keep only h for backward; the chunk's logits are rebuilt there
            picked.append(checkpoint(_chunk_logprobs, head, h, t, temperature, use_reentrant=False))
            if ent is not None:
                with torch.no_grad():
                    entropies.append(token_entropy(head(h).float() / temperature))
            continue
        logits = head(h).float() / temperature
        picked.append(token_logprobs(logits, t))
        if ent is not None:
            with torch.no_grad():
                entropies.append(token_entropy(logits.detach()))
    if picked:
        out[mask] = torch.cat(picked)
        if ent is not None:
            ent[mask] = torch.cat(entropies)
    return out, ent
