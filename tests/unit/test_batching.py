"""The trainer's forward pass: response-position logprobs at the sampling temperature, equal (values and
gradients) to the full-logits computation, also on the chunked, recomputing path and through peft."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import rloop.train.batching as batching
from rloop.policy import attach_lora, build_tiny
from rloop.spec import LoraSpec, TinyModel
from rloop.train.batching import forward_logprobs, pack, response_values
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)


def _batch(tok):
    prompts = [tok(p)["input_ids"] for p in ("38152/09:", "1/2:", "97531/17:")]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in ("81", "2", "9531")]
    return pack(prompts, responses, tok.pad_token_id)


def test_response_values_sit_on_the_response_targets():
    # prompts [1, 2] and [3]; responses [7, 8, 9] and [6]: targets are ids[1:], responses start at len(p) - 1
    batch = pack([[1, 2], [3]], [[7, 8, 9], [6]], pad_id=0)
    values = response_values(batch, [[-0.1, -0.2, -0.3], [-0.4]])
    assert batch.targets.tolist() == [[2, 7, 8, 9], [6, 0, 0, 0]]
    torch.testing.assert_close(values, torch.tensor([[0.0, -0.1, -0.2, -0.3], [-0.4, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="values per row"):
        response_values(batch, [[-0.1, -0.2], [-0.4]])


def _reference(model, batch, temperature):
    """The textbook computation: full [B, L, V] logits, log_softmax, gather, entropy."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.response_mask
    ent = -(logp.exp() * logp).sum(-1) * batch.response_mask
    return lp, ent


def _grads(model, lp, mask):
    model.zero_grad(set_to_none=True)
    (-(lp * mask).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_floats", [batching._CHUNK_FLOATS, 4 * 15])  # 15-token vocab: 4-row chunks
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_logprobs_equal_full_logits(monkeypatch, chunk_floats, temperature):
    monkeypatch.setattr(batching, "_CHUNK_FLOATS", chunk_floats)
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=2, heads=2, seed=0))
    batch = _batch(tok)
    lp, ent = forward_logprobs(model, batch, temperature=temperature, with_entropy=True)
    ref_lp, ref_ent = _reference(model, batch, temperature)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    assert not ent.requires_grad
    assert (lp[~batch.response_mask] == 0).all()  # prompt and padding positions are never computed
    mask = batch.response_mask.float()
    ours, theirs = _grads(model, lp, mask), _grads(model, _reference(model, batch, temperature)[0], mask)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4)


def test_temperature_changes_the_scored_policy():
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=2, heads=2, seed=0))
    batch = _batch(tok)
    with torch.no_grad():
        at_one, _ = forward_logprobs(model, batch)
        at_07, _ = forward_logprobs(model, batch, temperature=0.7)
    assert (at_one - at_07).abs().max() > 1e-3


def test_forward_logprobs_through_a_peft_wrapper():
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=2, heads=2, seed=0))
    model = attach_lora(model, LoraSpec(r=2, alpha=4))
    batch = _batch(tok)
    lp, _ = forward_logprobs(model, batch)
    torch.testing.assert_close(lp, _reference(model, batch, 1.0)[0], atol=1e-5, rtol=0)
    trained = _grads(model, lp, batch.response_mask.float())
    assert trained and all("lora_" in n for n in trained)
