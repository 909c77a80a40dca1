"""One RL trainer step pair and one RFT run on fixed data, written to a file: run once as a single
process (plain torch) and under torchrun with several processes (DeepSpeed ZeRO); the test compares.

Usage: python equivalence_worker.py OUT.pt ZERO_STAGE [offload]   (under torchrun: the same arguments)
`offload`: optimizer state (and with ZeRO-3 the parameters) offloaded to host memory.

The rollout engine is scripted (fixed completions per prompt, whatever the process or seed), so every
process count trains on exactly the same data: what differs is only how the update is spread.
"""

from __future__ import annotations

import hashlib
import sys

import torch

from rloop.data.synthetic import make_split
from rloop.policy import build_tiny
from rloop.rollout import Completion, PromptResult, SamplingParams
from rloop.spec import DistributedSpec, RLSpec, TinyModel
from rloop.train.distributed import close_world, init_world, make_optimizer
from rloop.train.rl import RLTrainer
from rloop.train.sft import mean_nll, sft_train

EXAMPLES = make_split("train", 8, seed=0)


class ScriptedEngine:
    """n fixed completions per prompt, derived from the prompt text alone."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts: list[str], params: SamplingParams) -> list[PromptResult]:
        out = []
        vocab = len(self.tok)
        for prompt in prompts:
            ids = self.tok(prompt)["input_ids"]
            result = PromptResult(prompt, ids)
            for i in range(params.n):
                digest = hashlib.sha256(f"{prompt}/{i}".encode()).digest()
                length = 1 + digest[0] % params.max_tokens
                tokens = [3 + b % (vocab - 3) for b in digest[1 : 1 + length]]
                result.completions.append(Completion(self.tok.decode(tokens), tokens, [-1.0] * length, "length"))
            out.append(result)
        return out

    def update_weights(self, model) -> None:  # the scripted samples never change
        pass

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


def score(texts, examples):
    """Dense rewards; every sample of the first prompt is unscorable, so the processes hold different
    row counts (and one of them runs idle passes)."""
    first = EXAMPLES[0].prompt
    return [None if e.prompt == first else sum(ch.isdigit() for ch in t) / max(len(t), 1)
            for t, e in zip(texts, examples, strict=True)]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def main(out_path: str, zero_stage: int, offload: bool = False) -> None:
    dist_cfg = DistributedSpec(zero_stage=zero_stage, timeout_seconds=120, offload_optimizer=offload,
                               offload_params=offload and zero_stage == 3)
    world = init_world(dist_cfg.timeout_seconds)
    torch.manual_seed(0)
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=2, heads=2, seed=0))
    cfg = RLSpec(prompts_per_step=4, samples_per_prompt=4, max_response_tokens=6, update_epochs=2,
                 micro_batch_size=3, kl_coef=0.05, lr=1e-2)
    rl_start = flat(model)
    trainer = RLTrainer(model, tok, ScriptedEngine(tok), cfg, score, world=world, distributed=dist_cfg)
    rl_losses = []
    for step in range(2):
        out = trainer.step(step, EXAMPLES[4 * step : 4 * step + 4], lambda e: e.prompt)
        rl_losses.append([out.metrics[k] for k in ("loss", "grad_norm", "entropy", "kl", "trained_responses")])
    with trainer.optimizer.full_parameters():
        rl_params = flat(model)

    torch.manual_seed(1)
    model, tok = build_tiny(TinyModel(hidden_size=32, layers=2, heads=2, seed=1))
    pairs = [(tok(e.prompt)["input_ids"], tok(e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
             for e in make_split("train", 7, seed=3)]
    sft_start = flat(model)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0, max_grad_norm=1.0, world=world,
                               distributed=dist_cfg)
    sft_losses: list[float] = []
    sft_train(model, pairs, pad_id=tok.pad_token_id, steps=3, batch_size=5, lr=1e-2, micro_batch_size=2,
              optimizer=optimizer, world=world, on_step=lambda s, loss: sft_losses.append(loss))
    with optimizer.full_parameters():
        sft_params = flat(model)
    with optimizer.main_model() as whole:  # as the rft stage does: rank 0 alone measures the trained model
        nll_after = mean_nll(whole, pairs, pad_id=tok.pad_token_id) if world.is_main else None
    if world.is_main:
        torch.save({"world": world.size, "rl_metrics": rl_losses, "rl_params": rl_params, "rl_start": rl_start,
                    "sft_start": sft_start,
                    "sft_losses": sft_losses, "sft_params": sft_params,
                    "sft_nll_after": nll_after}, out_path)
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), offload=sys.argv[3:] == ["offload"])
