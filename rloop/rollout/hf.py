"""The transformers backend: batched `generate` with explicit sampling parameters, stop strings and
sampling logprobs.

What the sampler does must be exactly the policy the trainer scores:
- every sampling parameter is explicit: the model's `generation_config` (repetition penalty, top-k,
  min-p, ... a hub model may ship) is never inherited;
- EOS is every id the tokenizer and the model's generation config name (Llama-3 has two);
- where each sequence ends is tracked while generating, so padding after a stop string or after EOS
  (pad == eos for many tokenizers) is never read as a sampled token;
- sampling logprobs are those of softmax(logits / T) at each step, computed on the fly for the
  chosen token only (no [B, T, V] logits kept).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from rloop.rollout import Completion, PromptResult, SamplingParams


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and all of generation_config's."""
    ids: list[int] = []
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for tid in source if isinstance(source, list | tuple) else [source]:
            if tid is not None and int(tid) not in ids:
                ids.append(int(tid))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config names none; set one")
    return ids


class _SampledLogprobs(LogitsProcessor):
    """Records log softmax(logits / T) of each sampled token.

    transformers runs user processors on the raw logits, before its temperature/top-p warpers; the
    token chosen at step t is only known at step t+1 (the last column of input_ids), so one step's
    [B, V] distribution is held at a time. `finish(sequences)` picks the last step's token.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # [B, V] log-probs of the step whose token is not chosen yet
        self.picked: list[torch.Tensor] = []  # per step: [B]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.picked.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] sampling logprobs aligned with the T generated tokens."""
        steps = new_tokens.shape[1]
        if len(self.picked) < steps and self.pending is not None:
            self.picked.append(self.pending.gather(-1, new_tokens[:, steps - 1 :steps]).squeeze(-1))
        self.pending = None
        if not self.picked:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.picked[:steps], dim=1).cpu()


class _EndTracker(StoppingCriteria):
    """Notes, per sequence, how many tokens it really generated and why it ended.

    A sequence ends at its first EOS id (kept: the model sampled it, and training on it teaches the
    model to stop) or at the token that completes a stop string (transformers' own `stop_strings`
    needs a vocabulary that can spell its probe text, which the built-in character tokenizer cannot,
    so the match is on decoded text; only the tail that a new stop string can lie in is decoded).
    Everything generated after that is padding.
    """

    def __init__(self, tokenizer, eos_ids: list[int], stops: tuple[str, ...], prompt_width: int, rows: int):
        self.tok, self.eos, self.stops, self.start = tokenizer, set(eos_ids), stops, prompt_width
        self.window = (max(len(s) for s in stops) + 4) if stops else 0
        self.length: list[int | None] = [None] * rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.start
        last = input_ids[:, -1].tolist()
        open_rows = [i for i, n in enumerate(self.length) if n is None]
        for i in open_rows:
            if last[i] in self.eos:
                self.length[i] = produced
        if self.stops:
            open_rows = [i for i in open_rows if self.length[i] is None]
            if open_rows:
                tails = input_ids[open_rows, max(self.start, input_ids.shape[1] - self.window) :].tolist()
                for i, text in zip(open_rows, self.tok.batch_decode(tails, skip_special_tokens=True), strict=True):
                    if any(s in text for s in self.stops):
                        self.length[i] = produced
        return torch.tensor([n is not None for n in self.length], device=input_ids.device)


class HFEngine:
    """Samples from an in-memory transformers model (shared with the trainer, so syncing is free).

    `encode` turns a rendered prompt into ids (`rloop.prompts.PromptFormat.encode`; default: the
    tokenizer with special tokens). `batch_size` bounds how many sequences (prompts x n) go through
    generate() at once. `autocast` is the trainer's forward context (bf16 autocast over fp32 master
    weights), so sampler and trainer run the same numerics.
    """

    def __init__(self, model, tokenizer, *, encode: Callable[[str], list[int]] | None = None,
                 batch_size: int = 256, autocast: Callable[[], object] | None = None):
        self.model, self.tok = model, tokenizer
        self.encode = encode or (lambda text: list(tokenizer(text)["input_ids"]))
        self.batch_size = batch_size
        self.autocast = autocast or nullcontext
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def update_weights(self, model) -> None:
        self.model = model

    def sleep(self) -> None:
        """Nothing to free: the engine is the trainer's own module."""

    def close(self) -> None:
        """Nothing to stop."""

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[PromptResult]:
        results = [PromptResult(p, self.encode(p)) for p in prompts]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        per_chunk = max(1, self.batch_size // params.n)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(results), per_chunk):
                self._generate_chunk(results[i : i + per_chunk], params)
        finally:
            self.model.train(was_training)
        return results

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        """The sampling parameters, explicitly. generate() fills unset fields from the model's
        generation_config, which is swapped for an empty one during the call (see _generate_chunk)."""
        return GenerationConfig(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
            max_new_tokens=params.max_tokens, num_return_sequences=params.n, pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids, return_dict_in_generate=True,
        )

    def _generate_chunk(self, chunk: list[PromptResult], params: SamplingParams) -> None:
        dev = next(self.model.parameters()).device
        # Left-pad prompts so every sequence's generation starts at the same column.
        width = max(len(r.prompt_token_ids) for r in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, r in enumerate(chunk):
            ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            attn[row, width - len(r.prompt_token_ids) :] = 1
        logprobs = _SampledLogprobs(params.temperature)
        ends = _EndTracker(self.tok, self.eos_ids, params.stop, width, len(chunk) * params.n)
        inherited, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            with self.autocast():
                out = self.model.generate(
                    input_ids=ids.to(dev), attention_mask=attn.to(dev), generation_config=self._generation_config(params),
                    logits_processor=[logprobs], stopping_criteria=[ends],
                )
        finally:
            self.model.generation_config = inherited
        new = out.sequences[:, width:].cpu()  # [len(chunk)*n, T]
        lp = logprobs.finish(new)
        for j in range(new.shape[0]):
            n_tokens = ends.length[j]
            finish = "length" if n_tokens is None else "stop"
            n_tokens = new.shape[1] if n_tokens is None else n_tokens
            chunk[j // params.n].completions.append(
                self._completion(new[j, :n_tokens].tolist(), lp[j, :n_tokens].tolist(), finish, params)
            )

    def _completion(self, tokens: list[int], logprobs: list[float], finish: str, params: SamplingParams) -> Completion:
        text = self.tok.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text = text[: text.index(s)]
        return Completion(text, tokens, logprobs, finish)  # type: ignore[arg-type]
