"""SFT (the RFT stage and warm-up): it fits an expert set, step arithmetic, and response-only packing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from rloop.data.synthetic import warmup_pairs
from rloop.policy import build_tiny
from rloop.spec import TinyModel
from rloop.train.batching import pack
from rloop.train.sft import encode_pairs, epochs_to_steps, mean_nll, sft_train
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)


def test_sft_lowers_nll_on_the_expert_set():
    torch.manual_seed(0)
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=1, heads=2, seed=0))
    experts = encode_pairs(tok, warmup_pairs(16, seed=0))
    pad = tok.pad_token_id
    before = mean_nll(model, experts, pad_id=pad)
    assert before > 2.0  # random init: close to log(15) = 2.7 nats per token
    steps = []
    res = sft_train(model, experts, pad_id=pad, steps=40, batch_size=8, lr=3e-3, seed=0,
                    on_step=lambda s, loss: steps.append((s, loss)))
    after = mean_nll(model, experts, pad_id=pad)
    assert res.steps == 40 and [s for s, _ in steps] == list(range(40))
    assert res.first_loss == steps[0][1] and res.last_loss == steps[-1][1]
    assert after < before * 0.7, (before, after)
    assert model.training  # mean_nll restores the mode it found


def test_sft_with_a_batch_function_sees_fresh_pairs():
    torch.manual_seed(0)
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=1, heads=2, seed=0))
    asked = []

    def fresh(step):
        asked.append(step)
        return encode_pairs(tok, warmup_pairs(4, seed=step))

    sft_train(model, fresh, pad_id=tok.pad_token_id, steps=3, batch_size=4, lr=1e-3)
    assert asked == [0, 1, 2]


@pytest.mark.parametrize(
    ("pairs", "batch", "epochs", "cap", "steps"),
    [
        (10, 4, 2, None, 6),  # ceil(10/4) = 3 per epoch
        (8, 4, 3, None, 6),
        (10, 4, 2, 5, 5),  # capped
        (10, 4, 2, 50, 6),  # cap above the epoch count does nothing
        (3, 32, 2, None, 2),  # a partial batch is still one step per epoch
        (0, 32, 2, None, 2),  # never zero steps
    ],
)
def test_epochs_to_steps(pairs, batch, epochs, cap, steps):
    assert epochs_to_steps(pairs, batch, epochs, cap) == steps


def test_pack_marks_exactly_the_response_targets():
    b = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # targets[t] = input_ids[t+1]; the mask is on targets that are response tokens only
    assert b.targets.tolist() == [[2, 3, 5, 6], [7, 8, 9, 0]]
    assert b.response_mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert b.rows(torch.tensor([1])).input_ids.tolist() == [[4, 7, 8, 9, 0]]


def test_encode_pairs_appends_eos_to_responses_only():
    tok = build_tiny(TinyModel(hidden_size=16, layers=1, heads=2))[1]
    [(prompt, response)] = encode_pairs(tok, [("38152/09:", "81")])
    assert prompt == tok("38152/09:")["input_ids"]
    assert response == [tok.convert_tokens_to_ids("8"), tok.convert_tokens_to_ids("1"), tok.eos_token_id]


def test_micro_batches_accumulate_to_the_full_batch_update():
    """microBatchSize is memory only: 8 pairs in micro-batches of 3 (3+3+2, unequal token counts) give the
    same weights after a step as all 8 at once, because each step is normalised by its own token count."""
    pairs = encode_pairs(build_tiny(TinyModel(hidden_size=32, layers=1, heads=2))[1], warmup_pairs(8, seed=1))
    after = []
    for micro in (None, 3):
        model, tok = build_tiny(TinyModel(hidden_size=32, layers=1, heads=2, seed=0))
        sft_train(model, pairs, pad_id=tok.pad_token_id, steps=2, batch_size=8, lr=1e-2, micro_batch_size=micro)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (after[0] - torch.cat([p.detach().flatten() for p in build_tiny(
        TinyModel(hidden_size=32, layers=1, heads=2, seed=0))[0].parameters()])).abs().max()
    assert moved > 1e-3
    torch.testing.assert_close(after[1], after[0], atol=2e-5, rtol=0)
