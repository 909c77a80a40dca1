"""Unit tests for rloop.train.algos against hand-computed numbers (derivations in comments)."""

import math

import pytest
import torch

from rloop.train.algos import (
    aggregate,
    clipped_policy_loss,
    dynamic_sampling_keep,
    group_advantages,
    kl_k3,
    overlong_penalty,
    response_nll,
    token_entropy,
    token_logprobs,
    truncated_is_weights,
)


def close(actual, expected, atol=1e-5):
    """Assert a tensor equals a nested list of python numbers within atol."""
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------
# advantages


REWARDS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])


def test_group_advantages_use_unbiased_std():
    # group 0: mean 0.5, deviations +-0.5, sum sq 1.0, unbiased var 1/3, std 0.577350 -> +-0.866025
    # group 1: mean 0.75, deviations .25 .25 .25 -.75, sum sq 0.75, unbiased var 0.25, std 0.5
    #          -> 0.5 0.5 0.5 -1.5
    # (population std would give +-1.0 and 0.577 ... -1.732, so this pins the unbiased choice)
    adv = group_advantages(REWARDS)
    close(adv, [[0.866025, -0.866025, 0.866025, -0.866025], [0.5, 0.5, 0.5, -1.5]])


def test_group_advantages_dr_grpo_unscaled():
    adv = group_advantages(REWARDS, scale=False)
    close(adv, [[0.5, -0.5, 0.5, -0.5], [0.25, 0.25, 0.25, -0.75]])


def test_group_advantages_constant_group_and_singleton_are_zero():
    close(group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])), [[0.0] * 3, [0.0] * 3])
    close(group_advantages(torch.tensor([[1.0], [0.0]])), [[0.0], [0.0]])


def test_group_advantages_rejects_flat_input():
    with pytest.raises(ValueError, match="G, n"):
        group_advantages(torch.tensor([1.0, 0.0]))


def test_dynamic_sampling_keep():
    rewards = torch.tensor(
        [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 1.0]]
    )
    keep = dynamic_sampling_keep(rewards)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, False, True]


def test_overlong_penalty_ramp():
    # threshold = 100 - 20 = 80; 85 -> (80-85)/20 = -0.25; 90 -> -0.5; 100 -> -1; 120 -> -2 clamped to -1
    lengths = torch.tensor([50, 80, 85, 90, 100, 120])
    close(overlong_penalty(lengths, max_tokens=100, buffer=20, penalty=1.0), [0, 0, -0.25, -0.5, -1, -1])
    close(
        overlong_penalty(lengths, max_tokens=100, buffer=20, penalty=0.5),
        [0, 0, -0.125, -0.25, -0.5, -0.5],
    )


def test_overlong_penalty_zero_buffer_disables():
    close(overlong_penalty(torch.tensor([10, 500]), max_tokens=100, buffer=0, penalty=1.0), [0.0, 0.0])


# ----------------------------------------------------------------------------------------------
# per-token quantities


def test_token_logprobs_against_manual_softmax():
    # position 0: logits log([1, 2, 5]) -> softmax [1/8, 2/8, 5/8]; token 2 -> log(5/8) = -0.470004
    # position 1: uniform logits over 3 -> log(1/3) = -1.098612
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(5.0)], [1.0, 1.0, 1.0]]])
    ids = torch.tensor([[2, 1]])
    out = token_logprobs(logits, ids)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    close(out, [[-0.470004, -1.098612]])
    # token 0 at position 0 -> log(1/8) = -2.079442; bf16 input is upcast to a float32 result
    out_bf16 = token_logprobs(logits.to(torch.bfloat16), torch.tensor([[0, 1]]))
    assert out_bf16.dtype == torch.float32
    close(out_bf16, [[-2.079442, -1.098612]], atol=2e-2)


def test_token_entropy_uniform_and_hand_value():
    # uniform over V=7 -> log 7 = 1.945910
    close(token_entropy(torch.zeros(2, 3, 7)), [[1.945910] * 3] * 2)
    # probs [1/8, 1/4, 5/8]: H = .125*2.079442 + .25*1.386294 + .625*0.470004 = 0.900256
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(5.0)]]])
    close(token_entropy(logits), [[0.900256]])


def test_kl_k3():
    lp = torch.tensor([[math.log(0.5), math.log(0.25), -1.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -1.0]])
    # d = ref - lp = -ln2: 0.5 + 0.693147 - 1 = 0.193147;  d = +ln2: 2 - 0.693147 - 1 = 0.306853;  d = 0: 0
    close(kl_k3(lp, ref), [[0.193147, 0.306853, 0.0]])


def test_kl_k3_clamps_log_ratio():
    # d = 100 is clamped to 20: e^20 - 21, finite instead of inf
    out = kl_k3(torch.tensor([[-100.0]]), torch.tensor([[0.0]]))
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# aggregation

# ragged mask: row 0 has 4 tokens, row 1 has 1, row 2 has none (masked values are junk on purpose)
VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [6.0, 100.0, 100.0, 100.0], [7.0, 100.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_aggregate_modes_hand_values():
    # token_mean: (1+2+3+4+6)/5 = 3.2
    assert aggregate(VALUES, MASK, "token_mean").item() == pytest.approx(3.2)
    # seq_mean_token_mean: rows 2.5 and 6.0, empty row ignored -> 4.25
    assert aggregate(VALUES, MASK, "seq_mean_token_mean").item() == pytest.approx(4.25)
    # Dr.GRPO: row sums 10, 6, 0 divided by 4 -> 2.5, 1.5, 0 -> mean over 3 rows = 4/3
    got = aggregate(VALUES, MASK, "seq_mean_token_sum_norm", norm_length=4).item()
    assert got == pytest.approx(4.0 / 3.0)
    # explicit global token count: 16 / 10
    assert aggregate(VALUES, MASK, "token_mean", global_tokens=10).item() == pytest.approx(1.6)


def test_token_mean_minibatches_add_up_to_full_batch():
    full = aggregate(VALUES, MASK, "token_mean").item()
    total = MASK.sum().item()  # 5 tokens in the step's batch
    # mb1 = row 0: 10/5 = 2.0; mb2 = rows 1-2: 6/5 = 1.2; sum 3.2 = full batch token mean
    mb1 = aggregate(VALUES[:1], MASK[:1], "token_mean", global_tokens=total).item()
    mb2 = aggregate(VALUES[1:], MASK[1:], "token_mean", global_tokens=total).item()
    assert mb1 == pytest.approx(2.0) and mb2 == pytest.approx(1.2)
    assert mb1 + mb2 == pytest.approx(full)
    # without the global count each mini-batch normalises locally: (2.5 + 6.0) / 2 = 4.25 != 3.2
    local = (aggregate(VALUES[:1], MASK[:1], "token_mean") + aggregate(VALUES[1:], MASK[1:], "token_mean")) / 2
    assert local.item() == pytest.approx(4.25)


def test_aggregate_errors_and_empty_mask():
    with pytest.raises(ValueError, match="token_mean.*seq_mean_token_mean.*seq_mean_token_sum_norm"):
        aggregate(VALUES, MASK, "mean")
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(VALUES, MASK, "seq_mean_token_sum_norm")
    empty = torch.zeros_like(MASK)
    assert aggregate(VALUES, empty, "token_mean").item() == 0.0
    assert aggregate(VALUES, empty, "seq_mean_token_mean").item() == 0.0


# ----------------------------------------------------------------------------------------------
# policy loss


def _logprobs_for_ratios(ratios):
    """old = 0, lp = log(ratio) so that exp(lp - old) == ratio; lp is a grad leaf."""
    lp = torch.log(torch.tensor(ratios, dtype=torch.float32)).requires_grad_(True)
    return lp, torch.zeros_like(lp)


def test_clipped_loss_inside_clip_equals_unclipped_surrogate():
    lp, old = _logprobs_for_ratios([[1.1, 0.9], [1.0, 1.2]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 2)
    loss, stats = clipped_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token_mean")
    # all ratios in [0.8, 1.28] -> loss_tok = -A*r: -2.2, -1.8, 1.0, 1.2 -> mean -0.45
    assert loss.item() == pytest.approx(-0.45, abs=1e-6)
    assert stats["clip_fraction"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.05, abs=1e-6)  # (1.1+0.9+1.0+1.2)/4
    # approx_kl = mean(old - lp) = -ln(1.1*0.9*1.0*1.2)/4 = -ln(1.188)/4 = -0.0430678
    assert stats["approx_kl"] == pytest.approx(-0.0430678, abs=1e-6)
    assert all(isinstance(v, float) for v in stats.values())


def test_clipped_loss_positive_advantage_high_ratio_is_clipped_with_zero_grad():
    # ratio 1.5 > 1.28 with A = +1: min(1.5, 1.28) = 1.28 -> loss -1.28, no gradient
    # ratio 1.0: loss -1.0, d(-r*A)/dlp = -r*A = -1, divided by 2 tokens -> -0.5
    lp, old = _logprobs_for_ratios([[1.5, 1.0]])
    loss, stats = clipped_policy_loss(
        lp, old, torch.tensor([1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.28, agg="token_mean"
    )
    assert loss.item() == pytest.approx(-1.14, abs=1e-6)  # (-1.28 - 1.0) / 2
    loss.backward()
    close(lp.grad, [[0.0, -0.5]], atol=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_clipped_loss_negative_advantage_low_ratio_is_clipped():
    # A = -1. ratio 0.5 < 0.8: min(-0.5, -0.8) = -0.8 -> clipped, loss 0.8, no gradient.
    # ratio 1.5 > 1.28: min(-1.5, -1.28) = -1.5 -> NOT clipped (pessimistic side), loss 1.5,
    #   grad = -A*r / 2 tokens = 0.75
    lp, old = _logprobs_for_ratios([[0.5, 1.5]])
    loss, stats = clipped_policy_loss(
        lp, old, torch.tensor([-1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.28, agg="token_mean"
    )
    assert loss.item() == pytest.approx(1.15, abs=1e-6)  # (0.8 + 1.5) / 2
    loss.backward()
    close(lp.grad, [[0.0, 0.75]], atol=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_clip_fraction_counts_masked_tokens_and_asymmetry():
    # A = +1, ratios [1.5, 1.25, 0.5, 1.5], last token masked.
    # clip_high 0.28: only 1.5 is clipped (1.25 < 1.28; low ratio with A>0 keeps the smaller unclipped term)
    # -> 1 of 3 masked tokens. Symmetric 0.2 also clips 1.25 -> 2 of 3.
    lp, old = _logprobs_for_ratios([[1.5, 1.25, 0.5, 1.5]])
    adv, mask = torch.tensor([1.0]), torch.tensor([[1, 1, 1, 0]])
    _, stats = clipped_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token_mean")
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.25 + 0.5) / 3, abs=1e-6)
    _, stats = clipped_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="token_mean")
    assert stats["clip_fraction"] == pytest.approx(2 / 3)


def test_clipped_loss_passes_aggregation_through():
    # ratios all 1, A = [1, 2]: loss_tok -1 (3 tokens) and -2 (1 token)
    lp, old = _logprobs_for_ratios([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    adv, mask = torch.tensor([1.0, 2.0]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    kw = dict(clip_low=0.2, clip_high=0.28)
    tok, _ = clipped_policy_loss(lp, old, adv, mask, agg="token_mean", **kw)
    seq, _ = clipped_policy_loss(lp, old, adv, mask, agg="seq_mean_token_mean", **kw)
    drg, _ = clipped_policy_loss(lp, old, adv, mask, agg="seq_mean_token_sum_norm", norm_length=3, **kw)
    assert tok.item() == pytest.approx(-5 / 4)  # (-3 - 2) / 4
    assert seq.item() == pytest.approx(-1.5)  # (-1 + -2) / 2
    assert drg.item() == pytest.approx(-5 / 6)  # (-3/3 + -2/3) / 2


def test_truncated_is_weights_are_the_capped_trainer_over_engine_ratio():
    old = torch.tensor([[0.0, -1.0, -3.0]])
    rollout = torch.tensor([[0.0, -2.0, -1.0]])
    # exp(0) = 1; exp(-1 + 2) = e, capped at 2; exp(-3 + 1) = e^-2 (below 1: never raised)
    close(truncated_is_weights(old, rollout, cap=2.0), [[1.0, 2.0, math.exp(-2.0)]])
    assert not truncated_is_weights(old.requires_grad_(), rollout, cap=2.0).requires_grad


def test_clipped_loss_token_weights_scale_each_token_and_its_gradient():
    # ratios 1, A = 1: loss_tok = -1 per token; weights [2, 0, 0.5] -> token_mean (-2 - 0 - 0.5) / 3
    lp, old = _logprobs_for_ratios([[1.0, 1.0, 1.0]])
    lp.requires_grad_()
    weights = torch.tensor([[2.0, 0.0, 0.5]])
    loss, _ = clipped_policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), clip_low=0.2, clip_high=0.2,
                                  agg="token_mean", token_weights=weights)
    assert loss.item() == pytest.approx(-2.5 / 3)
    loss.backward()
    # d/dlp of -w * exp(lp - old) / 3 at ratio 1 = -w / 3: the zero-weight token gets no gradient
    close(lp.grad, [[-2 / 3, 0.0, -0.5 / 3]])


def test_response_nll_token_mean():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert response_nll(lp, mask).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
