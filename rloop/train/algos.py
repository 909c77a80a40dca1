"""Loss and advantage math for RL with verifiable rewards (GRPO / Dr.GRPO / DAPO).

Pure tensor functions, no model or optimizer state, so each piece can be unit-tested against
hand-computed numbers. Shape conventions:

    G  prompt groups, n  samples per prompt (a rollout batch is [G, n] before flattening)
    B  sequences in a (mini/micro) batch, T  response tokens, V  vocabulary size

Masks are [B, T] with 1 (or True) on response tokens that count and 0 on prompt/padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# exp() of a log-ratio beyond this overflows float32 or is numerically meaningless; verl clamps the same way.
_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------
# advantages and reward shaping


def group_advantages(rewards: Tensor, *, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO group-relative advantages.

    rewards: [G, n] scalar reward of each of the n samples of each of the G prompts.
    returns: [G, n] float advantages.

    scale=True  (GRPO): (r - mean_g) / (std_g + eps), std_g the *unbiased* (Bessel-corrected,
                torch.std default) standard deviation of the group, matching verl's GRPO.
    scale=False (Dr.GRPO): r - mean_g; dividing by std up-weights near-uniform groups (a bias Dr.GRPO removes).

    A group whose rewards are all equal gets advantage 0 (no learning signal). A group of size 1 also
    gets 0: there is nothing to compare against, and unbiased std is undefined (NaN) for n=1.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    std = rewards.std(dim=1, keepdim=True)  # unbiased (correction=1), as verl
    return centered / (std + eps)


def dynamic_sampling_keep(accuracy: Tensor) -> Tensor:
    """DAPO dynamic sampling filter.

    accuracy: [G, n] verifier accuracy of each sample (1.0 correct, 0.0 wrong, NaN unscorable).
    returns:  [G] bool, True for groups whose *scorable* samples are not all equal. All-correct and
    all-wrong groups have zero advantage everywhere, so they only dilute the batch's gradient; DAPO
    drops them. Unscorable samples neither make a group mixed nor uniform; a group with fewer than two
    scorable samples has nothing to compare and is dropped. Accuracy, not the shaped reward: an overlong
    penalty would make an all-correct group look mixed.
    """
    if accuracy.dim() != 2:
        raise ValueError(f"accuracy must be [G, n], got shape {tuple(accuracy.shape)}")
    nan = torch.isnan(accuracy)
    highest = torch.where(nan, float("-inf"), accuracy).max(dim=1).values
    lowest = torch.where(nan, float("inf"), accuracy).min(dim=1).values
    return highest > lowest


def overlong_penalty(lengths: Tensor, *, max_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO soft overlong punishment, added to the task reward.

    lengths: [B] response lengths in tokens (int).
    returns: [B] float <= 0:
        0                                               if len <= max_tokens - buffer
        ((max_tokens - buffer) - len) / buffer * penalty  otherwise, clamped at -penalty
    i.e. a linear ramp over the last `buffer` tokens instead of a cliff, so truncated-but-nearly-right
    answers are not punished as hard as a reward of 0 would. buffer=0 disables the penalty (zeros).
    """
    if penalty < 0:
        raise ValueError(f"penalty is a magnitude and must be >= 0, got {penalty}")
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    threshold = max_tokens - buffer
    ramp = (threshold - lengths) / buffer * penalty
    # max=0 keeps short answers at 0; min=-penalty bounds responses past max_tokens.
    return ramp.clamp(min=-penalty, max=0.0)


# ----------------------------------------------------------------------------------------------
# per-token quantities from logits


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """Log-probability of each chosen token.

    logits:    [..., V] (e.g. [B, T, V] or [N, V]; any float dtype: bf16 logits are upcast because
               log_softmax in bf16 loses several bits exactly where ratios exp(lp - old) are sensitive)
    token_ids: [...] int64
    returns:   [...] float32
    """
    logits = logits.float()
    # gather - logsumexp avoids materialising the full [B, T, V] log_softmax output.
    picked = logits.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position.

    logits:  [..., V]
    returns: [...] float32, H = logsumexp(z) - sum_v softmax(z)_v * z_v  (in nats)
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref), per token.

    logprobs, ref_logprobs: [B, T] log-probs of the sampled tokens under policy and reference.
    returns: [B, T], exp(d) - d - 1 with d = ref - lp; unbiased, always >= 0, and low variance.
    d is clamped to [-20, 20] so one wildly off token cannot produce inf.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1.0


# ----------------------------------------------------------------------------------------------
# loss aggregation and losses


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    global_tokens: float | None = None,
    norm_length: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    values, mask: [B, T]
    returns: scalar tensor.

    "token_mean":              sum(values * mask) / global_tokens. global_tokens defaults to mask.sum();
                               the trainer passes the token count of the whole step's batch so that the
                               mini/micro-batch losses add up exactly to the full-batch token mean (DAPO:
                               every token weighs the same, long answers are not down-weighted).
    "seq_mean_token_mean":     mean over sequences of each sequence's token mean (original GRPO);
                               sequences with no masked tokens are left out.
    "seq_mean_token_sum_norm": Dr.GRPO: per-sequence token sum / norm_length (a constant, e.g. the max
                               generation length, so length does not rescale the gradient), then mean over
                               sequences. norm_length is required.
    """
    mask = mask.to(values.dtype)
    masked = values * mask
    if mode == "token_mean":
        if global_tokens is None:
            # clamp: an all-padding micro-batch gives 0 rather than NaN
            return masked.sum() / mask.sum().clamp_min(1.0)
        if global_tokens <= 0:
            raise ValueError(f"global_tokens must be > 0, got {global_tokens}")
        return masked.sum() / global_tokens
    if mode == "seq_mean_token_mean":
        counts = mask.sum(dim=-1)
        present = counts > 0
        seq_means = masked.sum(dim=-1)[present] / counts[present]
        if seq_means.numel() == 0:
            return masked.sum() * 0.0  # keeps the graph connected
        return seq_means.mean()
    if mode == "seq_mean_token_sum_norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError(f"mode 'seq_mean_token_sum_norm' needs a positive norm_length, got {norm_length}")
        return (masked.sum(dim=-1) / norm_length).mean()
    raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")


def _masked_mean_float(values: Tensor, mask: Tensor) -> float:
    """Mean of values [B, T] over mask [B, T] as a python float (0.0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count.item() == 0:
        return 0.0
    return ((values * mask).sum() / count).item()


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    agg: str,
    global_tokens: float | None = None,
    norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric clipping (DAPO clip-higher).

    logprobs:     [B, T] current policy log-probs (requires grad)
    old_logprobs: [B, T] behaviour-policy log-probs (no grad)
    advantages:   [B] per-sequence advantage, broadcast over tokens ([B, T] per-token is accepted too)
    mask:         [B, T]
    token_weights: [B, T] or None, no grad: multiplies each token's term (the rollout correction,
                  `truncated_is_weights`)
    returns: (scalar loss, stats) with
        loss_tok = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) [* token_weights],  r = exp(lp - old)
        aggregated by `aggregate(loss_tok, mask, agg, ...)`.
    clip_high > clip_low leaves more room to raise low-probability tokens, which counters entropy collapse.

    stats (python floats, over masked tokens):
        clip_fraction: share of tokens where the clipped term is strictly smaller (so it was chosen and
                       the token's gradient is zero)
        ratio_mean:    mean of r
        approx_kl:     mean of old - lp (k1 estimate of KL(old || current))
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B] -> [B, 1], broadcast over T
    advantages = advantages.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss_tok = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        loss_tok = loss_tok * token_weights.detach().to(loss_tok.dtype)
    loss = aggregate(loss_tok, mask, agg, global_tokens=global_tokens, norm_length=norm_length)

    with torch.no_grad():
        was_clipped = (clipped < unclipped).to(logprobs.dtype)
        stats = {
            "clip_fraction": _masked_mean_float(was_clipped, mask),
            "ratio_mean": _masked_mean_float(ratio.detach(), mask),
            "approx_kl": _masked_mean_float((old_logprobs - logprobs).detach(), mask),
        }
    return loss, stats


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, *, cap: float) -> Tensor:
    """Token-level truncated importance weights for the sampler/trainer mismatch (verl's rollout
    correction, "token" level; Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training").

    old_logprobs:     [B, T] the trainer's log-probs of the sampled tokens under the behaviour policy
    rollout_logprobs: [B, T] the rollout engine's log-probs of the same tokens (what actually sampled them)
    returns:          [B, T] min(exp(old - rollout), cap), no grad

    The engine (vLLM kernels, bf16, another batch shape) computes a slightly different distribution than
    the trainer; the weight re-weights each token from the distribution that sampled it to the one the
    trainer scores, and the cap bounds the variance a rare large ratio would bring.
    """
    log_ratio = (old_logprobs - rollout_logprobs).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(log_ratio).clamp(max=cap)


def response_nll(logprobs: Tensor, mask: Tensor, *, global_tokens: float | None = None) -> Tensor:
    """SFT negative log-likelihood of the response tokens.

    logprobs: [B, T] log-probs of the target tokens, mask: [B, T] (1 on response tokens)
    returns:  scalar, sum of -logprobs over masked tokens / global_tokens (default: the mask's count, so
              the token mean; 0 when the mask is empty). Pass the optimizer step's token count when
              the step is accumulated over micro-batches.
    """
    return aggregate(-logprobs, mask, "token_mean", global_tokens=global_tokens)
