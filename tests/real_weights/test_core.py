"""The learning core on real weights (SmolLM2-135M-Instruct: BPE tokenizer, pad == eos, chat template):
the sampler and the trainer score the same policy at T = 0.7, stop strings never leave a spurious EOS,
the chat template is applied once, and rollout → math verify → RL step → RFT step → eval runs through
the real stages with RFT training on exactly the sampled ids. Sized to tokens: a few minutes on 2 cores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rloop.data import load_examples
from rloop.plan import Stage
from rloop.prompts import PromptFormat
from rloop.rollout import SamplingParams
from rloop.rollout.hf import HFEngine
from rloop.train.batching import forward_logprobs, pack
from tests.real_weights.conftest import ROOT

pytestmark = [pytest.mark.real_weights, pytest.mark.slow, pytest.mark.timeout(900)]

GSM8K = ROOT / "tests" / "data" / "gsm8k" / "train-sample.jsonl"
EOS = 2  # <|im_end|>, also the pad token


@pytest.fixture(scope="module")
def engine(smollm2):
    model, tok = smollm2
    fmt = PromptFormat.for_model(tok, chat_template=True)
    return HFEngine(model, tok, encode=fmt.encode), fmt


def _completions(results):
    return [(r, c) for r in results for c in r.completions]


def test_engine_and_trainer_logprobs_agree_at_t07(engine):
    eng, fmt = engine
    examples = load_examples(str(GSM8K), limit=2)
    results = eng.generate([fmt.render(e) for e in examples], SamplingParams(n=3, max_tokens=24, temperature=0.7, seed=0))
    pairs = [(r.prompt_token_ids, c) for r, c in _completions(results)]
    batch = pack([p for p, _ in pairs], [c.token_ids for _, c in pairs], eng.pad_id)
    with torch.no_grad():
        lp, _ = forward_logprobs(eng.model, batch, temperature=0.7)
    diff = max(float((lp[i][batch.response_mask[i]] - torch.tensor(c.logprobs)).abs().max())
               for i, (_, c) in enumerate(pairs))
    print(f"\nSmolLM2 engine vs trainer logprobs at T=0.7: max abs diff {diff:.2e} over "
          f"{int(batch.response_mask.sum())} tokens")
    assert diff <= 1e-4


def test_stop_string_leaves_no_spurious_eos(engine):
    """pad == eos: a sequence ended by a stop string is padded with EOS ids it never sampled."""
    eng, fmt = engine
    examples = load_examples(str(GSM8K), limit=2)
    results = eng.generate([fmt.render(e) for e in examples], SamplingParams(n=4, max_tokens=32, temperature=0.7,
                                                                             stop=(".",), seed=1))
    by_stop = 0
    for _, c in _completions(results):
        assert len(c.logprobs) == len(c.token_ids) and "." not in c.text
        if EOS in c.token_ids:
            assert c.token_ids.index(EOS) == len(c.token_ids) - 1 and c.finish_reason == "stop"
        elif c.finish_reason == "stop":
            by_stop += 1
            decoded = eng.tok.decode(c.token_ids)
            assert "." in decoded and "." not in eng.tok.decode(c.token_ids[:-1])  # ends at the stop string
    assert by_stop > 0


def test_chat_template_is_applied_once(smollm2):
    _, tok = smollm2
    fmt = PromptFormat.for_model(tok, chat_template=True)
    [example] = load_examples(str(GSM8K), limit=1)
    ids = fmt.encode(fmt.render(example))
    reference = tok.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=True,
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == list(reference)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 3  # <|im_start|> system, user, assistant: one template, once


def test_bf16_master_weights_change_at_lr_1e6(smollm2_dir):
    from rloop.policy import autocast, load_policy
    from rloop.spec import RLSpec
    from rloop.train.rl import RLTrainer

    model, tok = load_policy(smollm2_dir, "bfloat16", training=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fmt = PromptFormat.for_model(tok, chat_template=True)
    engine = HFEngine(model, tok, encode=fmt.encode, autocast=autocast("bfloat16"))
    cfg = RLSpec(steps=1, prompts_per_step=1, samples_per_prompt=4, max_response_tokens=12, lr=1e-6, temperature=0.7)

    def rank_of_text(texts, examples):  # distinct responses get distinct rewards: a real gradient
        order = sorted(set(texts))
        return [order.index(t) / len(order) for t in texts]

    trainer = RLTrainer(model, tok, engine, cfg, rank_of_text, compute_dtype="bfloat16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trainer.step(0, load_examples(str(GSM8K), limit=1), fmt.render)
    assert math.isfinite(out.metrics["loss"]) and out.metrics["grad_norm"] > 0
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"\nbf16 autocast, fp32 master weights, lr 1e-6: {moved / total:.1%} of {total:,} weights changed")
    assert moved / total > 0.5


# ------------------------------------------------------------------------------ through the stages

EASY = [("What is 2 + 3? Answer with the number.", "5"), ("What is 4 + 4? Answer with the number.", "8"),
        ("What is 10 - 3? Answer with the number.", "7")]


def _run_doc(smollm2_dir, data) -> dict:
    return {
        "apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "metadata": {"name": "smol"},
        "spec": {
            "model": {"base": str(smollm2_dir), "chatTemplate": True},
            "data": {"train": {"path": str(data)}, "eval": [{"name": "easy", "path": str(data), "samplesPerPrompt": 2}]},
            "verifier": {"name": "math"},
            "loop": {
                "iterations": 1,
                "rl": {"steps": 1, "promptsPerStep": 3, "samplesPerPrompt": 4, "maxResponseTokens": 24,
                       "temperature": 0.7, "lr": 1e-5},
                "rft": {"epochs": 1, "lr": 1e-5, "batchSize": 8, "microBatchSize": 3},
                "eval": {"kList": [1, 2], "temperature": 0.7, "maxResponseTokens": 24, "evalBase": False},
            },
        },
    }


def test_rollout_verify_rl_rft_eval_on_real_weights(smollm2_dir, tmp_path, monkeypatch):
    import rloop.train.sft as sft
    from rloop.stages import run_stage
    from rloop.stages.common import EXIT_OK
    from rloop.store import RunStore

    data = tmp_path / "easy.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in EASY))
    store = RunStore(str(tmp_path / "store"), "default", "smol")
    store.write_spec(_run_doc(smollm2_dir, data))
    trained: list = []
    real_sft = sft.sft_train

    def recording_sft(model, pairs, **kwargs):
        trained.extend(pairs)
        return real_sft(model, pairs, **kwargs)

    monkeypatch.setattr(sft, "sft_train", recording_sft)
    for stage in (Stage("init"), Stage("rl", 0), Stage("verify", 0), Stage("rft", 0), Stage("eval", 0, "easy")):
        assert run_stage(store.uri, stage) == EXIT_OK, stage.id

    from rloop.policy import load_policy
    from rloop.stages.common import StageContext

    ctx = StageContext.open(store.uri, Stage("rft", 0))
    pool = ctx.read_parquet("iter-000/rl", "pool/trajectories.parquet")
    experts = ctx.read_parquet("iter-000/verify", "expert.parquet")
    _, tok = load_policy(smollm2_dir)
    fmt = PromptFormat.for_model(tok, chat_template=True)
    by_id = {e.id: e for e in load_examples(str(data))}
    assert len(pool) == 12
    for row in pool:  # ids exactly as sampled: one chat template, EOS only when sampled and last
        assert row["prompt_token_ids"] == fmt.encode(fmt.render(by_id[row["prompt_id"]]))
        ids = row["response_token_ids"]
        assert len(ids) == row["response_tokens"] <= 24
        assert (row["finish_reason"] == "stop") == (ids[-1:] == [EOS]) and ids.count(EOS) <= 1
    assert experts, "no correct answer among 12 samples of 3 easy sums: the model or verifier is broken"
    assert all(e["finish_reason"] == "stop" and e["correct"] for e in experts)
    assert sorted(trained) == sorted((e["prompt_token_ids"], e["response_token_ids"]) for e in experts)

    rl = store.validate("iter-000/rl", deep=False).summary
    rft = store.validate("iter-000/rft", deep=False).summary
    ev = store.validate("iter-000/eval/easy", deep=False).summary
    assert math.isfinite(rl["train_reward_first"]) and rft["steps"] >= 1
    assert math.isfinite(rft["nll_before"]) and rft["nll_after"] < rft["nll_before"]
    assert 0.0 <= ev["avg_at_n"] <= 1.0 and ev["num_prompts"] == 3

    def weights(path):
        model, _ = load_policy(path)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    base = weights(ctx.policy_dir("base/init/policy"))
    assert not torch.equal(weights(ctx.policy_dir("iter-000/rl/final")), base)  # the RL step moved the policy
    assert not torch.equal(weights(ctx.policy_dir("iter-000/rft/policy")), base)  # and so did RFT
