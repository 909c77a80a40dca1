"""Rollout engines behind one interface: prompts in, n sampled completions each out.

`hf` (transformers `generate`, CPU and GPU) is built in. A vLLM backend implements the same
`RolloutEngine` protocol (generate + update_weights) so stages don't change when it is swapped in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """What to sample: n completions per prompt, up to max_tokens each."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    """One sampled response: text (stop string and EOS stripped), its token ids (EOS included when
    the model emitted it, so training teaches the model to stop), and their sampling logprobs."""

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


def make_engine(name: str, model, tokenizer, **kwargs) -> RolloutEngine:
    if name == "hf":
        from rloop.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; available: 'hf'")
