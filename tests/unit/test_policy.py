"""rloop.policy: the char tokenizer, the tiny model, save/load round trips, LoRA attach and merge."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from rloop.data.synthetic import PROMPT_CHARS
from rloop.policy import (
    attach_lora,
    build_tiny,
    char_tokenizer,
    load_policy,
    save_policy,
    trainable_parameters,
)
from rloop.spec import LoraSpec, TinyModel
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)

PROMPT = "38152/09:"
TINY = TinyModel(hidden_size=32, layers=2, heads=2, seed=0)




def _logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_char_tokenizer_one_token_per_char_and_round_trip():
    tok = char_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) == len(PROMPT)  # no BOS/EOS added, one id per character
    assert ids == [tok.convert_tokens_to_ids(ch) for ch in PROMPT]
    assert len(set(ids)) == len(set(PROMPT))  # distinct characters get distinct ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == PROMPT  # no spaces inserted between characters
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == PROMPT
    assert {tok.pad_token_id, tok.eos_token_id, tok.unk_token_id} == {0, 1, 2}


def test_saved_policy_round_trips_tokenizer_and_logits(tmp_path):
    model, tok = build_tiny(TINY)
    ids = tok(PROMPT)["input_ids"]
    before = _logits(model, ids)
    save_policy(model, tok, tmp_path / "p")
    loaded, tok2 = load_policy(tmp_path / "p")
    # transformers 5 reloads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer (byte-level BPE over the
    # saved vocab); on the task alphabet it must behave exactly like the char tokenizer that was saved.
    assert tok2(PROMPT)["input_ids"] == ids
    assert tok2.decode(ids) == PROMPT
    assert tok2(PROMPT_CHARS)["input_ids"] == tok(PROMPT_CHARS)["input_ids"]
    assert [tok2.convert_ids_to_tokens(i) for i in range(len(tok))] == [
        tok.convert_ids_to_tokens(i) for i in range(len(tok))
    ]
    assert tok2.decode([*ids, tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == PROMPT
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert len(tok2) == len(tok)
    torch.testing.assert_close(_logits(loaded, ids), before, atol=0, rtol=0)


def test_build_tiny_is_deterministic_in_seed():
    a, tok = build_tiny(TINY)
    b, _ = build_tiny(TINY)
    c, _ = build_tiny(TINY.model_copy(update={"seed": 1}))
    ids = tok(PROMPT)["input_ids"]
    torch.testing.assert_close(_logits(a, ids), _logits(b, ids), atol=0, rtol=0)
    assert not torch.allclose(_logits(a, ids), _logits(c, ids))


def test_lora_trains_only_adapters_and_saves_merged(tmp_path):
    torch.manual_seed(0)
    base, tok = build_tiny(TINY)
    n_base = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraSpec(r=4, alpha=8))
    assert attach_lora(base, None) is base  # no LoRA configured: train all weights
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in named.items() if "lora_" not in n)
    assert sum(p.numel() for p in trainable_parameters(model)) < n_base / 4
    # lora_B starts at zero (adapter is a no-op); perturb it so merging actually changes the weights
    with torch.no_grad():
        for n, p in named.items():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = tok(PROMPT)["input_ids"]
    peft_logits = _logits(model, ids)
    plain_logits = _logits(build_tiny(TINY)[0], ids)
    assert not torch.allclose(peft_logits, plain_logits, atol=1e-3)

    out = save_policy(model, tok, tmp_path / "merged")
    files = {p.name for p in out.iterdir()}
    assert "config.json" in files and "model.safetensors" in files
    assert not any(f.startswith("adapter_") for f in files)  # a full checkpoint, not a PEFT adapter
    loaded, _ = load_policy(out)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    assert sum(p.numel() for p in loaded.parameters()) == n_base
    torch.testing.assert_close(_logits(loaded, ids), peft_logits, atol=1e-5, rtol=1e-5)
