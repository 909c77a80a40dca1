"""RLTrainer and its helpers: advantage/reward shaping by hand, one step's contract, and that RL learns."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

pytest.importorskip("transformers")

import copy

from rloop.data.synthetic import make_split
from rloop.policy import attach_lora, build_tiny, load_policy, prepare_for_training, save_policy
from rloop.rollout import SamplingParams
from rloop.rollout.hf import HFEngine
from rloop.spec import LoraSpec, RLSpec, TinyModel
from rloop.train.algos import group_advantages
from rloop.train.batching import forward_logprobs, pack
from rloop.train.rl import PromptSampler, RLTrainer, advantages_with_unscorable, shaped_rewards
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)

NAN = float("nan")
METRIC_KEYS = {
    "reward", "pass_rate", "clip_fraction", "entropy", "kl", "grad_norm", "tokens_per_s", "time_rollout_s",
    "time_verify_s", "time_advantage_s", "time_update_s", "time_sync_s", "memory_used_rollout_gib",
    "memory_used_update_gib", "rollout_logprob_abs_diff",
}
EXAMPLES = make_split("train", 16, seed=0)




def render(e):
    return e.prompt


def digit_share(texts, examples):
    """A dense reward (share of digits in a 4-token answer) so every group has signal."""
    return [sum(ch.isdigit() for ch in t) / 4 for t in texts]


def starts_with_7(texts, examples):
    return [1.0 if t.startswith("7") else 0.0 for t in texts]


def always_right(texts, examples):
    return [1.0 for _ in texts]


def tiny(seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    return build_tiny(TinyModel(hidden_size=hidden, layers=1, heads=2, seed=seed))


def trainer(model, tok, score, compute_dtype: str = "float32", **rl) -> RLTrainer:
    cfg = RLSpec(**{"prompts_per_step": 4, "samples_per_prompt": 4, "max_response_tokens": 4, **rl})
    from rloop.policy import autocast

    engine = HFEngine(model, tok, autocast=autocast(compute_dtype))
    return RLTrainer(model, tok, engine, cfg, score, compute_dtype=compute_dtype)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


# ---------------------------------------------------------------------------------------- helpers


def test_unscorable_rewards_stay_out_of_the_baseline():
    rewards = torch.tensor([[1.0, 0.0, NAN, 1.0], [NAN, NAN, 1.0, 0.0], [NAN, 1.0, NAN, NAN]])
    # group 0: scorable [1, 0, 1], mean 2/3, unbiased std sqrt(1/3) -> (1/3)/0.57735 = 0.57735, -1.1547
    # group 1: [1, 0] -> +-0.70711; group 2: one scorable sample, nothing to compare -> 0
    adv = advantages_with_unscorable(rewards, scale=True)
    expected = [[0.57735, -1.15470, 0.0, 0.57735], [0.0, 0.0, 0.70711, -0.70711], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-4, rtol=0)
    # Dr.GRPO (no std scaling): r - mean over the scorable entries only
    adv = advantages_with_unscorable(rewards, scale=False)
    expected = [[1 / 3, -2 / 3, 0.0, 1 / 3], [0.0, 0.0, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)


def test_shaped_rewards_with_overlong_buffer():
    cfg = RLSpec(max_response_tokens=8, overlong_buffer=4, overlong_penalty=0.5)
    # ramp starts after 8 - 4 = 4 tokens: len 6 -> (4-6)/4*0.5 = -0.25, len 8 -> -0.5, beyond clamps at -0.5
    r = shaped_rewards([1.0, 0.0, None, 1.0, 0.0, 1.0], [2, 4, 6, 6, 8, 10], ["stop"] * 6, cfg)
    assert math.isnan(r[2])
    torch.testing.assert_close(r[[0, 1, 3, 4, 5]], torch.tensor([1.0, 0.0, 0.75, -0.5, 0.5]), atol=1e-6, rtol=0)
    plain = shaped_rewards([1.0, None, 0.0], [8, 8, 8], ["length"] * 3, RLSpec(max_response_tokens=8))
    assert plain[0] == 1.0 and math.isnan(plain[1]) and plain[2] == 0.0


# -------------------------------------------------------------------------------------- one step


def test_one_step_updates_and_reports_everything():
    model, tok = tiny()
    tr = trainer(model, tok, digit_share, lr=1e-2)
    before = snapshot(model)
    batch = PromptSampler(EXAMPLES, 0).next(4)
    out = tr.step(0, batch, render)
    assert changed(model, before)  # the update phase moved the weights
    assert out.metrics.keys() >= METRIC_KEYS
    m = out.metrics
    assert all(m[f"time_{p}_s"] >= 0 for p in ("rollout", "verify", "advantage", "update", "sync"))
    assert m["tokens_per_s"] > 0 and m["grad_norm"] > 0 and m["entropy"] > 0
    assert m["kl"] == 0.0  # no reference model without kl_coef
    assert m["memory_used_rollout_gib"] > 0.01 and m["memory_used_update_gib"] > 0.01  # this process's RSS
    assert m["groups_kept"] == 4 and m["trained_responses"] == 16 and m["unscorable"] == 0
    assert len(out.trajectories) == 16  # one per sample
    for i, t in enumerate(out.trajectories):
        assert t["step"] == 0
        assert t["prompt_id"] == batch[i // 4].id and t["prompt"] == batch[i // 4].prompt
        assert t["reward"] == pytest.approx(t["score"])  # no shaping configured
        assert t["correct"] == (t["score"] >= 1.0)
        assert 1 <= t["response_tokens"] <= 4
    assert m["reward"] == pytest.approx(statistics.mean(t["reward"] for t in out.trajectories))
    assert m["pass_rate"] == pytest.approx(sum(t["correct"] for t in out.trajectories) / 16)


def test_unscorable_samples_are_reported_and_not_trained():
    model, tok = tiny()
    calls = iter(range(10**6))

    def every_other_unscorable(texts, examples):
        return [None if next(calls) % 2 else sum(ch.isdigit() for ch in t) / 4 for t in texts]

    out = trainer(model, tok, every_other_unscorable).step(0, PromptSampler(EXAMPLES, 0).next(4), render)
    assert out.metrics["unscorable"] == 8
    assert out.metrics["trained_responses"] == 8
    assert [t["score"] is None for t in out.trajectories] == [i % 2 == 1 for i in range(16)]
    assert all(math.isnan(t["reward"]) for t in out.trajectories[1::2])
    assert not math.isnan(out.metrics["reward"])


def test_kl_is_zero_against_itself_then_grows():
    model, tok = tiny()
    tr = trainer(model, tok, digit_share, lr=1e-2, kl_coef=0.1)
    sampler = PromptSampler(EXAMPLES, 0)
    kls = [tr.step(s, sampler.next(4), render).metrics["kl"] for s in range(2)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    assert kls[1] > 1e-4
    assert tr.ref is not None and not any(p.requires_grad for p in tr.ref.parameters())


def test_second_mini_batch_sees_a_moved_policy():
    model, tok = tiny()
    one = trainer(model, tok, digit_share, lr=3e-2, mini_batches=1)
    assert one.step(0, PromptSampler(EXAMPLES, 0).next(4), render).metrics["clip_fraction"] == 0.0
    model, tok = tiny()
    two = trainer(model, tok, digit_share, lr=3e-2, mini_batches=2)
    # after the first optimizer step the ratio of the second mini-batch is != 1, and with a large lr clipped
    assert two.step(0, PromptSampler(EXAMPLES, 0).next(4), render).metrics["clip_fraction"] > 0.0


def test_dynamic_sampling_skips_update_when_no_group_has_signal():
    model, tok = tiny()
    tr = trainer(model, tok, always_right, algorithm="dapo", lr=1e-2)
    assert tr.cfg.dynamic_sampling
    before = snapshot(model)
    out = tr.step(0, PromptSampler(EXAMPLES, 0).next(4), render)
    assert out.metrics["groups_kept"] == 0 and out.metrics["trained_responses"] == 0
    assert out.metrics["reward"] == 1.0 and out.metrics["pass_rate"] == 1.0
    assert not changed(model, before)  # no optimizer step at all
    assert len(out.trajectories) == 16  # but every trajectory is still kept for the pool


def test_lora_step_changes_only_adapters():
    base, tok = tiny()
    model = attach_lora(base, LoraSpec(r=4, alpha=8))
    before = snapshot(model)
    trainer(model, tok, digit_share, lr=1e-2).step(0, PromptSampler(EXAMPLES, 0).next(4), render)
    moved = changed(model, before)
    assert moved
    assert all("lora_" in n for n in moved)


# ---------------------------------------------------------------------------------------- learning


def test_rl_raises_reward_on_an_easy_task():
    """Reward 1 iff the answer starts with "7" (~1/15 at random init). Measured over model seeds 0-19 with these
    settings: first-5-step mean 0.08-0.12, last-5-step mean 0.66-0.77 after 30 steps (~0.5 s on one thread)."""
    model, tok = tiny(seed=0)
    tr = trainer(model, tok, starts_with_7, lr=3e-3, prompts_per_step=8, samples_per_prompt=8)
    sampler = PromptSampler(make_split("train", 32, seed=0), 0)
    rewards = [tr.step(s, sampler.next(8), render).metrics["reward"] for s in range(30)]
    first, last = statistics.mean(rewards[:5]), statistics.mean(rewards[-5:])
    assert first < 0.25
    assert last > 0.45 and last - first > 0.3, rewards


# ------------------------------------------------------------------------- the update, exactly


def _record_first_step_grads(tr: RLTrainer) -> dict[str, torch.Tensor]:
    """Gradients as the optimizer sees them at its first step (clipping disabled by the caller)."""
    grads: dict[str, torch.Tensor] = {}
    real_step = tr.optimizer.opt.step

    def step(*args, **kwargs):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    tr.optimizer.opt.step = step
    return grads


def test_each_mini_batch_is_normalised_by_its_own_tokens():
    """With M mini-batches each optimizer step is the token-mean loss of its own mini-batch (verl/TRL),
    not 1/M of it: the first step's gradient equals that of -sum(A * logprob) / (its own token count)."""
    model, tok = tiny()
    start = copy.deepcopy(model)
    tr = trainer(model, tok, digit_share, lr=1e-3, mini_batches=2, max_grad_norm=1e4, loss_agg="token_mean")
    grads = _record_first_step_grads(tr)
    out = tr.step(0, PromptSampler(EXAMPLES, 0).next(4), render)
    assert out.metrics["optimizer_steps"] == 2
    rows = out.trajectories[:8]  # the first of two mini-batches: prompt groups 0 and 1
    adv = group_advantages(torch.tensor([t["reward"] for t in out.trajectories]).view(4, 4))[:2].flatten()
    batch = pack([t["prompt_token_ids"] for t in rows], [t["response_token_ids"] for t in rows], tok.pad_token_id)
    lp, _ = forward_logprobs(start, batch)
    mask = batch.response_mask.float()
    (-(adv.unsqueeze(1) * lp * mask).sum() / mask.sum()).backward()
    expected = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-4)


def test_micro_batches_give_the_same_update_as_the_whole_mini_batch():
    after = []
    for micro in (None, 3):  # 16 responses, 2 mini-batches of 8, micro-batches of 3 + 3 + 2
        model, tok = tiny()
        trainer(model, tok, digit_share, lr=1e-2, mini_batches=2, micro_batch_size=micro).step(
            0, PromptSampler(EXAMPLES, 0).next(4), render)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(after[1], after[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("mini_batches", "epochs", "forwards"), [(1, 1, 1), (2, 1, 3), (2, 2, 5)])
def test_on_policy_update_runs_no_behaviour_policy_pass(mini_batches, epochs, forwards):
    """One optimizer step per batch: old logprobs = detached current ones (ratio 1), one forward in all.
    Otherwise one no-grad pass for the behaviour policy plus one forward per optimizer step."""
    model, tok = tiny()
    calls = []
    model.get_decoder().register_forward_hook(lambda module, *_: calls.append(module.training))
    out = trainer(model, tok, digit_share, mini_batches=mini_batches, update_epochs=epochs).step(
        0, PromptSampler(EXAMPLES, 0).next(4), render)
    assert out.metrics["optimizer_steps"] == mini_batches * epochs
    assert sum(calls) == forwards  # training-mode forwards (generation runs in eval mode)


def test_trainer_scores_at_the_sampling_temperature():
    model, tok = tiny()
    tr = trainer(model, tok, digit_share, temperature=0.7)
    [result] = tr.engine.generate(["38152/09:"], SamplingParams(n=8, max_tokens=4, temperature=0.7, seed=1))
    batch = pack([result.prompt_token_ids] * 8, [c.token_ids for c in result.completions], tok.pad_token_id)
    lp = tr.logprobs(model, batch, micro=3)
    for i, c in enumerate(result.completions):
        torch.testing.assert_close(lp[i][batch.response_mask[i]], torch.tensor(c.logprobs), atol=1e-4, rtol=0)


class ShiftedLogprobs:
    """An engine whose reported sampling logprobs are the real ones + `shift` (a sampler that disagrees with
    the trainer by a known amount); samples and weight sync are the wrapped engine's."""

    def __init__(self, engine, shift: float):
        self.engine, self.shift = engine, shift

    def generate(self, prompts, params):
        results = self.engine.generate(prompts, params)
        for r in results:
            for c in r.completions:
                c.logprobs = [lp + self.shift for lp in c.logprobs]
        return results

    def update_weights(self, model):
        self.engine.update_weights(model)

    def sleep(self):
        self.engine.sleep()


def shifted_trainer(shift: float, **rl) -> RLTrainer:
    model, tok = tiny()
    tr = trainer(model, tok, digit_share, lr=1e-2, **rl)
    tr.engine = ShiftedLogprobs(tr.engine, shift)
    return tr


def test_the_engine_sleeps_through_the_update_and_syncs_after_it():
    model, tok = tiny()
    tr = trainer(model, tok, digit_share, lr=1e-2)
    calls: list[tuple[str, bool]] = []
    before = snapshot(model)

    class Recording(ShiftedLogprobs):
        def generate(self, prompts, params):
            calls.append(("generate", bool(changed(model, before))))
            return super().generate(prompts, params)

        def sleep(self):
            calls.append(("sleep", bool(changed(model, before))))

        def update_weights(self, model_):
            calls.append(("update_weights", bool(changed(model, before))))

    tr.engine = Recording(tr.engine, 0.0)
    tr.step(0, PromptSampler(EXAMPLES, 0).next(4), render)
    # (call, had the update already moved the weights): asleep before the update, synced after it
    assert calls == [("generate", False), ("sleep", False), ("update_weights", True)]


def test_mismatch_with_the_engine_is_reported_and_the_correction_is_off_by_default():
    batch = PromptSampler(EXAMPLES, 0).next(4)
    same = trainer(*tiny(), digit_share, lr=1e-2).step(0, batch, render).metrics
    assert same["rollout_logprob_abs_diff"] < 1e-4  # hf samples with the trainer's own module
    shifted = shifted_trainer(math.log(3)).step(0, batch, render).metrics
    assert shifted["rollout_logprob_abs_diff"] == pytest.approx(math.log(3), abs=1e-4)
    assert shifted["loss"] == pytest.approx(same["loss"], abs=1e-6)  # off: the engine's logprobs are not used
    assert "rollout_is_weight_mean" not in shifted


@pytest.mark.parametrize(("shift", "weight", "capped"), [(math.log(3), 1 / 3, 0.0), (-math.log(3), 2.0, 1.0)])
def test_truncated_is_weights_each_token_by_the_capped_ratio(shift, weight, capped):
    """Engine logprobs higher by log 3: every ratio is 1/3 (kept); lower by log 3: every ratio is 3, capped at 2.
    Same samples as the uncorrected run, so the token-mean loss is that loss times the weight."""
    batch = PromptSampler(EXAMPLES, 0).next(4)
    plain = shifted_trainer(shift).step(0, batch, render).metrics
    corrected = shifted_trainer(shift, rollout_is_cap=2.0, loss_agg="token_mean").step(0, batch, render).metrics
    uncorrected = shifted_trainer(shift, loss_agg="token_mean").step(0, batch, render).metrics
    assert plain["trained_responses"] == corrected["trained_responses"] == 16
    assert corrected["rollout_is_weight_mean"] == pytest.approx(weight, rel=1e-4)
    assert corrected["rollout_is_capped_share"] == capped
    assert corrected["loss"] == pytest.approx(uncorrected["loss"] * weight, rel=1e-4)


def test_gradient_checkpointing_gives_the_same_update():
    after = []
    for checkpointing in (False, True):
        model, tok = tiny()
        model = prepare_for_training(model, None, gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        trainer(model, tok, digit_share, lr=1e-2).step(0, PromptSampler(EXAMPLES, 0).next(4), render)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(after[1], after[0], atol=1e-5, rtol=0)


def test_bf16_keeps_fp32_master_weights_so_tiny_updates_land(tmp_path):
    """AdamW's first step moves each weight by ~lr. In bf16 (8 bits of mantissa) a 1e-6 step on weights
    of size ~0.02 rounds away; fp32 master weights under bf16 autocast keep it."""
    model, tok = tiny()
    save_policy(model, tok, tmp_path / "p", "bfloat16")
    stored, _ = load_policy(tmp_path / "p", "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())  # stored and evaluated in bf16
    master, _ = load_policy(tmp_path / "p", "bfloat16", training=True)
    assert all(p.dtype == torch.float32 for p in master.parameters())
    before = snapshot(master)
    out = trainer(master, tok, digit_share, compute_dtype="bfloat16", lr=1e-6).step(
        0, PromptSampler(EXAMPLES, 0).next(4), render)
    assert math.isfinite(out.metrics["loss"]) and out.metrics["grad_norm"] > 0
    moved = changed(master, before)
    assert len(moved) == len(before)  # every tensor moved
    # the same step on bf16 weights: (almost) nothing changes
    bf16_before = snapshot(stored)
    trainer(stored, tok, digit_share, lr=1e-6).step(0, PromptSampler(EXAMPLES, 0).next(4), render)
    stuck = sum(int((p.detach() == bf16_before[n]).sum()) for n, p in stored.named_parameters())
    assert stuck / sum(p.numel() for p in stored.parameters()) > 0.9


# ---------------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_filters_on_accuracy_not_shaped_reward():
    """All correct, but the overlong penalty makes rewards differ by length: still no signal to learn."""
    model, tok = tiny()
    tr = trainer(model, tok, always_right, algorithm="dapo", overlong_buffer=3, max_response_tokens=4)
    out = tr.step(0, PromptSampler(EXAMPLES, 0).next(4), render)
    rewards = [t["reward"] for t in out.trajectories]
    assert len(set(rewards)) > 1  # shaped rewards do differ
    assert out.metrics["groups_kept"] == 0 and out.metrics["trained_responses"] == 0


def test_dynamic_sampling_ignores_unscorable_samples():
    """[1, None, 1, 1] is an all-correct group: the unscorable sample does not make it mixed."""
    model, tok = tiny()
    calls = iter(range(10**6))

    def one_unscorable_per_group(texts, examples):
        return [None if next(calls) % 4 == 1 else 1.0 for _ in texts]

    out = trainer(model, tok, one_unscorable_per_group, algorithm="dapo").step(
        0, PromptSampler(EXAMPLES, 0).next(4), render)
    assert out.metrics["unscorable"] == 4 and out.metrics["groups_kept"] == 0


def _odd_first_digit(example) -> bool:
    return int(example.prompt[0]) % 2 == 1


def signal_for_odd_prompts(texts, examples):
    """Groups of prompts starting with an odd digit are mixed (0, 1, 0, 1); all others are all correct."""
    return [float(i % 2) if _odd_first_digit(e) else 1.0 for i, (t, e) in enumerate(zip(texts, examples, strict=True))]


def test_dynamic_sampling_refills_the_batch_with_more_prompts():
    model, tok = tiny()
    sampler = PromptSampler(make_split("train", 64, seed=0), 0)
    first = sampler.next(4)
    assert sum(map(_odd_first_digit, first)) < 4  # precondition: round one alone cannot fill the batch
    tr = trainer(model, tok, signal_for_odd_prompts, algorithm="dapo", dynamic_sampling_max_rounds=5)
    out = tr.step(0, first, render, more=sampler.next)
    m = out.metrics
    assert m["generation_rounds"] >= 2 and m["groups_generated"] == 4 * m["generation_rounds"]
    assert m["groups_trained"] == 4 and m["trained_responses"] == 16 and m["groups_kept"] >= 4
    assert len(out.trajectories) == 16 * m["generation_rounds"]  # every generated trajectory goes to the pool
    # without `more` (or without dynamic sampling) there is one round and the batch shrinks instead
    model, tok = tiny()
    once = trainer(model, tok, signal_for_odd_prompts, algorithm="dapo").step(0, first, render)
    assert once.metrics["generation_rounds"] == 1 and once.metrics["groups_trained"] < 4


def test_dynamic_sampling_stops_after_max_rounds():
    model, tok = tiny()
    sampler = PromptSampler(EXAMPLES, 0)
    out = trainer(model, tok, always_right, algorithm="dapo", dynamic_sampling_max_rounds=3).step(
        0, sampler.next(4), render, more=sampler.next)
    assert out.metrics["generation_rounds"] == 3 and out.metrics["groups_trained"] == 0
    assert len(out.trajectories) == 48
