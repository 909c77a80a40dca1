"""Policies on disk and in memory: the built-in tiny model, loading, saving, LoRA.

Every policy in the store is a plain `save_pretrained` directory (model + tokenizer), so any stage,
transformers or vLLM can load it. LoRA adapters are merged before saving (a policy is always a
full checkpoint); the RL/RFT stages attach fresh adapters to it when `model.lora` is set.

Precision: `model.dtype: bfloat16` trains with fp32 master weights under bf16 autocast (AdamW on
bf16 weights rounds small updates to zero: at lr 1e-6 nothing would change) and stores policies in
bf16; inference-only stages load bf16 weights directly. float16 is not offered: it needs loss scaling.
"""

from __future__ import annotations

import contextlib
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
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def load_policy(path: str | Path, dtype: str = "float32", *, training: bool = False):
    """(model, tokenizer) from a save_pretrained directory, on the default device, in train mode.

    training=True keeps fp32 master weights whatever `dtype` is (run forwards under `autocast(dtype)`);
    otherwise the weights are loaded in `dtype`.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the stage's own bar is the one users read
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:  # many causal LMs ship without a pad token
        tok.pad_token = tok.eos_token
    weights = torch.float32 if training else _DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=weights).to(device())
    return model, tok


def autocast(dtype: str, dev: torch.device | None = None):
    """A factory of the forward-pass context for `dtype`: bf16 autocast, or nothing for float32.
    Trainer and HF engine both run under it, so sampler and trainer compute the same numbers."""
    if dtype == "float32":
        return contextlib.nullcontext
    device_type = (dev or device()).type
    return lambda: torch.autocast(device_type=device_type, dtype=_DTYPES[dtype])


def prepare_for_training(model, lora: LoraSpec | None, gradient_checkpointing: bool = False):
    """LoRA adapters when configured, and activation (gradient) checkpointing when asked: recompute each
    layer's activations in backward instead of keeping them, trading ~30% compute for memory."""
    if gradient_checkpointing:
        # Only active in train mode: the engine's generate (eval mode) keeps its KV cache.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return attach_lora(model, lora)


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


def save_policy(model, tokenizer, out_dir: str | Path, dtype: str | None = None) -> Path:
    """save_pretrained a full checkpoint (LoRA merged) with its tokenizer, in `dtype` (default: as held).

    Training keeps fp32 master weights; a bf16 policy is stored in bf16 without touching them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    target = _DTYPES[dtype] if dtype else None
    if target is not None and any(p.dtype != target for p in model.parameters()):
        weights = model.state_dict()
        tied = {k for k, src in getattr(model, "all_tied_weights_keys", {}).items()
                if k in weights and src in weights and weights[k].data_ptr() == weights[src].data_ptr()}
        state = {k: v.to(target) for k, v in weights.items() if k not in tied}  # tied copies are re-tied on load
        held, model.config.dtype = model.config.dtype, target
        try:
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
        finally:
            model.config.dtype = held
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
