"""HFEngine: shape of the output, EOS/stop handling, sampling logprobs vs a teacher-forced pass, seeding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from rloop.policy import build_tiny
from rloop.rollout import SamplingParams, make_engine
from rloop.rollout.hf import HFEngine
from rloop.spec import TinyModel
from rloop.train.batching import forward_logprobs, pack
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)

# Different lengths on purpose: generation left-pads, the trainer right-pads; both must agree.
PROMPTS = ["38152/09:", "1/2:", "4", "97531/17:"]




@pytest.fixture(scope="module")
def policy():
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=2, heads=2, seed=0))
    return model, tok


def _all(results):
    return [(r, c) for r in results for c in r.completions]


def test_n_completions_per_prompt_in_prompt_order(policy):
    model, tok = policy
    eng = make_engine("hf", model, tok, batch_size=6)  # 6 // 3 = 2 prompts per generate() chunk
    assert isinstance(eng, HFEngine)
    results = eng.generate(PROMPTS, SamplingParams(n=3, max_tokens=5, seed=0))
    assert [r.prompt for r in results] == PROMPTS
    assert [r.prompt_token_ids for r in results] == [tok(p)["input_ids"] for p in PROMPTS]
    assert all(len(r.completions) == 3 for r in results)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("nope", model, tok)


def test_lengths_eos_and_finish_reason(policy):
    model, tok = policy
    eos = tok.eos_token_id
    results = HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=16, max_tokens=4, seed=1))
    finishes = set()
    for _, c in _all(results):
        assert len(c.token_ids) <= 4
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        finishes.add(c.finish_reason)
        if eos in c.token_ids:
            assert c.finish_reason == "stop"
            assert c.token_ids.index(eos) == len(c.token_ids) - 1  # EOS kept, and it is the last token
        else:
            assert c.finish_reason == "length"
            assert len(c.token_ids) == 4
        assert "<eos>" not in c.text and "<pad>" not in c.text
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert finishes == {"stop", "length"}  # 64 samples from a random model: both must occur


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_the_trainer(policy, temperature):
    """The trainer scores exactly the policy the engine sampled from: softmax(logits / T)."""
    model, tok = policy
    results = HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=4, max_tokens=6, temperature=temperature, seed=2))
    pairs = [(r.prompt_token_ids, c) for r, c in _all(results) if c.token_ids]
    batch = pack([p for p, _ in pairs], [c.token_ids for _, c in pairs], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        lp, _ = forward_logprobs(model, batch, temperature=temperature)
    for i, (_, c) in enumerate(pairs):
        teacher = lp[i][batch.response_mask[i]]
        torch.testing.assert_close(torch.tensor(c.logprobs), teacher, atol=1e-4, rtol=0)


def test_temperature_scales_sampling_logprobs(policy):
    model, tok = policy
    results = HFEngine(model, tok).generate(["38152/09:"], SamplingParams(n=4, max_tokens=4, temperature=0.5, seed=3))
    comps = [c for _, c in _all(results) if c.token_ids]
    batch = pack([results[0].prompt_token_ids] * len(comps), [c.token_ids for c in comps], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / 0.5
    lp = torch.log_softmax(logits, -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    for i, c in enumerate(comps):
        torch.testing.assert_close(torch.tensor(c.logprobs), lp[i][batch.response_mask[i]], atol=1e-4, rtol=0)


def test_same_seed_same_samples(policy):
    model, tok = policy
    eng = HFEngine(model, tok)
    params = SamplingParams(n=4, max_tokens=6, seed=7)
    a = [c.token_ids for _, c in _all(eng.generate(PROMPTS, params))]
    b = [c.token_ids for _, c in _all(eng.generate(PROMPTS, params))]
    c = [c.token_ids for _, c in _all(eng.generate(PROMPTS, SamplingParams(n=4, max_tokens=6, seed=8)))]
    assert a == b
    assert a != c


def test_generate_restores_train_mode(policy):
    model, tok = policy
    model.train()
    HFEngine(model, tok).generate(["1/2:"], SamplingParams(n=2, max_tokens=2, seed=0))
    assert model.training


def test_stop_strings_truncate_text(policy):
    model, tok = policy
    eng = HFEngine(model, tok)
    base = eng.generate(PROMPTS, SamplingParams(n=8, max_tokens=8, seed=4))
    # pick a character that occurs inside some unstopped completion, then stop on it
    stop = next(ch for _, c in _all(base) for ch in c.text[1:] if ch.isdigit())
    results = eng.generate(PROMPTS, SamplingParams(n=8, max_tokens=8, seed=4, stop=(stop,)))
    stopped = 0
    for _, c in _all(results):
        assert stop not in c.text
        if c.finish_reason == "length":
            assert len(c.token_ids) == 8
        elif tok.eos_token_id not in c.token_ids:
            stopped += 1  # ended by the stop string: its tokens are generated, the text cut before it
            full = tok.decode(c.token_ids, skip_special_tokens=True)
            assert full.endswith(stop)  # generation ended right at the stop string
            assert c.text == full[: full.index(stop)]
            assert len(c.logprobs) == len(c.token_ids)
    assert stopped > 0


# ------------------------------------------------------------------- real-tokenizer conventions


@pytest.fixture
def pad_is_eos():
    """The tiny policy with a tokenizer whose pad token is its EOS (as SmolLM2, Qwen2.5, Llama-3 ship)."""
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=2, heads=2, seed=0))
    tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.eos_token_id
    assert tok.pad_token_id == tok.eos_token_id
    return model, tok


def test_pad_equal_to_eos_is_never_read_as_a_sampled_eos(pad_is_eos):
    """A row ended by a stop string is padded with pad == eos; those pads are not the model's tokens."""
    model, tok = pad_is_eos
    eng = HFEngine(model, tok)
    stop = "1"
    results = eng.generate(PROMPTS, SamplingParams(n=16, max_tokens=8, seed=4, stop=(stop,)))
    by_stop = [c for _, c in _all(results) if c.finish_reason == "stop" and tok.eos_token_id not in c.token_ids]
    assert by_stop, "no completion ended by the stop string"
    for _, c in _all(results):
        assert len(c.logprobs) == len(c.token_ids)
        if tok.eos_token_id in c.token_ids:  # a real EOS is the last token and ends the response
            assert c.token_ids.index(tok.eos_token_id) == len(c.token_ids) - 1 and c.finish_reason == "stop"
            assert stop not in tok.decode(c.token_ids[:-1])
    for c in by_stop:  # the last token completes the stop string: nothing after it
        assert tok.decode(c.token_ids).endswith(stop) and stop not in tok.decode(c.token_ids[:-1])
    # every kept token is one the model sampled: its sampling logprob is that of a real choice
    assert all(lp > -30 for _, c in _all(results) for lp in c.logprobs)


def test_every_eos_id_of_the_generation_config_ends_a_response(policy):
    """Llama-3 style: generation_config lists several EOS ids; each one ends a response."""
    model, tok = policy
    extra = tok.convert_tokens_to_ids("3")
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    try:
        eng = HFEngine(model, tok)
        assert eng.eos_ids == [tok.eos_token_id, extra]
        results = eng.generate(PROMPTS, SamplingParams(n=16, max_tokens=8, seed=5))
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    ended_by_extra = 0
    for _, c in _all(results):
        for eos in (tok.eos_token_id, extra):
            if eos in c.token_ids:
                assert c.token_ids.index(eos) == len(c.token_ids) - 1 and c.finish_reason == "stop"
        ended_by_extra += c.token_ids[-1:] == [extra]
        assert "3" not in c.text  # an EOS id is stripped from the text like the EOS token
    assert ended_by_extra > 0


def test_generation_config_of_the_model_is_not_inherited(policy):
    """A hub model's generation_config (top-k, repetition penalty, no-repeat n-grams) must not change
    what the engine samples: the sampled distribution is softmax(logits / T), as the trainer scores it."""
    model, tok = policy
    plain = [c.token_ids for _, c in _all(HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=8, max_tokens=8, seed=6)))]
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 50.0
    try:
        shaped = [c.token_ids for _, c in _all(HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=8, max_tokens=8, seed=6)))]
        assert model.generation_config.top_k == 1  # the model's own config is left as it was
    finally:
        model.generation_config.no_repeat_ngram_size = 0
        model.generation_config.top_k = 50
        model.generation_config.repetition_penalty = 1.0
    assert shaped == plain
    assert any(len(set(ids)) < len(ids) for ids in plain)  # repeats occur, so no-repeat would have changed them


def test_engine_keeps_no_full_vocabulary_logits(policy, monkeypatch):
    """[B, T, V] logits per rollout (~160 GB at 256 x 1k tokens x 152k vocab) are never requested."""
    model, tok = policy
    seen = {}
    real = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=2, max_tokens=4, seed=0))
    config = seen["generation_config"]
    assert not config.output_logits and not config.output_scores
    assert not seen.get("output_logits") and not seen.get("output_scores")


def test_vllm_engine_choice_and_missing_package(policy, monkeypatch):
    """`loop.rollout.engine` parses with CPU-safe vLLM defaults; without the vllm package make_engine('vllm')
    fails with the fix in the message (the real engine is tested in tests/vllm, inside .venv-vllm)."""
    import builtins

    from rloop.spec import LoopSpec

    ro = LoopSpec.model_validate({"rollout": {"engine": "vllm", "vllm": {"kvCacheGib": 2, "maxModelLen": 2048}}}).rollout
    assert (ro.engine, ro.vllm.kv_cache_gib, ro.vllm.max_model_len, ro.vllm.tensor_parallel_size) == ("vllm", 2, 2048, 1)
    assert LoopSpec().rollout.engine == "hf" and LoopSpec().rollout.vllm.enforce_eager
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    model, tok = policy
    with pytest.raises(RuntimeError, match="make vllm-venv"):
        make_engine("vllm", model, tok, model_path="/nonexistent")
