"""The transformers backend: batched `generate` with sampling, stop strings and logprobs."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

from rloop.rollout import Completion, PromptResult, SamplingParams


class _StopOnStrings(StoppingCriteria):
    """Ends a sequence once its generated text contains a stop string.

    transformers' own `stop_strings` needs a tokenizer whose vocabulary can spell its probe text
    ("abcdef"); the built-in character tokenizer cannot, so match on decoded text instead. Only the
    tail is decoded: a stop string completed at this step lies within its last len(stop) tokens.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int):
        self.tok, self.stops, self.start = tokenizer, stops, prompt_width
        self.window = max(len(s) for s in stops) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.window) :]
        texts = self.tok.batch_decode(tail.tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class HFEngine:
    """Samples from an in-memory transformers model (shared with the trainer, so syncing is free).

    `batch_size` bounds how many sequences (prompts x n) go through generate() at once.
    """

    def __init__(self, model, tokenizer, batch_size: int = 256, add_special_tokens: bool = True):
        self.model, self.tok = model, tokenizer
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens

    def update_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[PromptResult]:
        results = [
            PromptResult(p, self.tok(p, add_special_tokens=self.add_special_tokens)["input_ids"]) for p in prompts
        ]
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

    def _generate_chunk(self, chunk: list[PromptResult], params: SamplingParams) -> None:
        dev = next(self.model.parameters()).device
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        # Left-pad prompts so every sequence's generation starts at the same column.
        width = max(len(r.prompt_token_ids) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, r in enumerate(chunk):
            ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            attn[row, width - len(r.prompt_token_ids) :] = 1
        out = self.model.generate(
            input_ids=ids.to(dev),
            attention_mask=attn.to(dev),
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n,
            pad_token_id=pad,
            eos_token_id=eos,
            stopping_criteria=[_StopOnStrings(self.tok, params.stop, width)] if params.stop else None,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, width:].cpu()  # [len(chunk)*n, T]
        # Sampling logprobs under the same temperature the sampler used. [B, T, V] -> [B, T]
        logits = torch.stack(out.logits, dim=1).float().cpu() / params.temperature
        lp = torch.log_softmax(logits, dim=-1).gather(-1, new[:, : logits.shape[1]].unsqueeze(-1)).squeeze(-1)
        for j in range(new.shape[0]):
            r = chunk[j // params.n]
            r.completions.append(self._completion(new[j].tolist(), lp[j].tolist(), params))

    def _completion(self, tokens: list[int], logprobs: list[float], params: SamplingParams) -> Completion:
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        finish = "length"
        keep = len(tokens)
        for t, tid in enumerate(tokens):
            if tid == eos:
                keep, finish = t + 1, "stop"
                break
            # Padding after a stop string ended this sequence. A pad the model itself sampled (before
            # any stop string) is an ordinary token: keep it, or text and logprobs would be cut short.
            if tid == pad and pad != eos and params.stop:
                so_far = self.tok.decode(tokens[:t], skip_special_tokens=True)
                if any(s in so_far for s in params.stop):
                    keep, finish = t, "stop"
                    break
        tokens, logprobs = tokens[:keep], logprobs[:keep]
        text = self.tok.decode([t for t in tokens if t != eos], skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Completion(text, tokens, logprobs, finish)
