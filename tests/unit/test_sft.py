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
    experts = warmup_pairs(16, seed=0)
    before = mean_nll(model, tok, experts)
    assert before > 2.0  # random init: close to log(15) = 2.7 nats per token
    steps = []
    res = sft_train(model, tok, experts, steps=40, batch_size=8, lr=3e-3, seed=0,
                    on_step=lambda s, loss: steps.append((s, loss)))
    after = mean_nll(model, tok, experts)
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
        return warmup_pairs(4, seed=step)

    sft_train(model, tok, fresh, steps=3, batch_size=4, lr=1e-3)
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
    prompts, responses = encode_pairs(tok, [("38152/09:", "81")])
    assert prompts == [tok("38152/09:")["input_ids"]]
    assert responses == [[tok.convert_tokens_to_ids("8"), tok.convert_tokens_to_ids("1"), tok.eos_token_id]]
