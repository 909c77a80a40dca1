"""Policies on disk and in memory: the built-in tiny model, loading, saving, LoRA.

Every policy in the store is a plain `save_pretrained` directory (model + tokenizer), so any stage,
transformers or vLLM can load it. LoRA adapters are merged before saving (a policy is always a
full checkpoint); the RL/RFT stages attach fresh adapters to it when `model.lora` is set.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rloop.data.synthetic import PROMPT_CHARS
from rloop.spec import LoraSpec, TinyModel

SPECIALS = ("<pad>", "<eos>", "<unk>")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def char_tokenizer(chars: str = PROMPT_CHARS) -> PreTrainedTokenizerFast:
    """One token per character, plus pad/eos/unk; a real `tokenizers` object, so it saves and loads
    with AutoTokenizer like any hub tokenizer."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *dict.fromkeys(chars)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()  # concatenate characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_tiny(cfg: TinyModel) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Random-init Qwen2 sized by `cfg` (hidden 128 x 4 layers is ~0.66M parameters)."""
    tok = char_tokenizer()
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config), tok


def load_policy(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a save_pretrained directory, on the default device, in train mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the stage's own bar is the one users read
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:  # many causal LMs ship without a pad token
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype]).to(device())
    return model, tok


def attach_lora(model, lora: LoraSpec | None):
    """Wrap with fresh LoRA adapters (peft) when configured; otherwise train all weights."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def save_policy(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained a full checkpoint (LoRA merged) with its tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
