"""One training step on one GPU: the RL update and the RFT step of a ~0.5B Qwen2 in bf16, plain torch (the
peer) against DeepSpeed ZeRO-2, as seconds per optimizer step, tokens/s, MFU and peak memory.

    .venv/bin/python benchmarks/gpu_step.py                      # one H200: ~0.5B, bf16, 128 x 1024 tokens
    .venv/bin/python benchmarks/gpu_step.py --micro-batch 8 --steps 3 --phases rl
    .venv/bin/python benchmarks/gpu_step.py --smoke              # tiny model on CPU (< 1 min on 2 cores)

Model: a random-init Qwen2 shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151936, tied embeddings: 494.0M parameters), built from `Qwen2Config`
(no hub download), sdpa attention, seeded so every variant starts from the same weights.

Workload (fixed synthetic data, the same in every variant): 16 prompts x 8 samples, each 256 prompt +
768 response tokens of uniform random ids (1024-token sequences, no padding, 131,072 tokens per step).
- RL update: `RLTrainer._update` (the trainer's update phase, one optimizer step: miniBatches 1,
  updateEpochs 1, so on-policy with no old-logprob pass; no KL, so no reference pass) on the groups that
  `RLTrainer._sample` built once from a scripted rollout engine returning the fixed completions with
  fixed random rewards: no generation, verification or weight sync is timed.
- RFT step: `sft_train` on the same 128 (prompt, response) pairs as fixed pairs, one batch of all 128
  per optimizer step.
Both accumulate over micro-batches of `--micro-batch` sequences (16).

Variants, each in a fresh process of its own (clean peak memory, one process group per process):
- `torch` (the peer): what a one-process stage runs. fp32 master weights on the GPU, forwards under bf16
  autocast (`compute_dtype="bfloat16"`), `TorchOptimizer` (torch AdamW, clip to norm 1).
- `zero2`: `DeepSpeedOptimizer` built directly from `deepspeed_config(DistributedSpec(zero_stage=2), ...,
  dtype="bfloat16")` and `World()` (`make_optimizer` takes DeepSpeed only for several processes or
  offload): DeepSpeed holds bf16 weights with fp32 master weights and AdamW state in its optimizer, in a
  one-process group (nccl on GPU, gloo on CPU; MASTER_ADDR 127.0.0.1 and a free port). The RL trainer is
  built as usual and its optimizer swapped for this one before the first step.

Timing: `--warmup` steps (2) first, excluded; then `--steps` (5) timed steps, each bracketed by
`torch.cuda.synchronize()`: around one `_update` call (RL), between consecutive `on_step` callbacks of
one `sft_train` call (RFT). Figures are median (min-max) over the timed steps. Peak memory is
`torch.cuda.max_memory_allocated()` since the model landed on the device (weights included); on CPU
the process's peak RSS. tokens/s counts every token of the batch (prompt + response).

MFU = model FLOPs per step / seconds per step / 989e12 (H200 dense bf16 peak, `--peak-tflops`), with
model FLOPs per step = 6 x (P_body x T + P_head x T_resp): 2 FLOPs per parameter per token forward
and 4 backward, P_body the parameters outside the embedding matrix (357.9M), P_head its 136.1M
(tied LM head, applied to response positions only by `forward_logprobs`), T the batch's tokens, T_resp
its response tokens. Not credited: attention scores (PaLM's 12 x layers x hidden x sequence FLOPs per
token: +10% at sequence 1024, half that with the causal mask), the chunked LM head's recompute in
backward, the RL update's extra no-grad head pass for the entropy metric, and gradient-checkpointing
recompute; so MFU is a conservative model-FLOPs figure. On CPU it is n/a.

Agreement: after the same warm-up + timed steps from the same weights on the same data, each variant
reports the response NLL of its batch under its trained weights (`mean_nll`), and the table shows
|torch - zero2|. In float32 the two agree to float rounding (the CPU smoke: 0); in bf16 they differ by
bf16 rounding (the smoke in bf16 on CPU: ~1e-3): torch's autocast keeps fp32 weights and a fp32 residual stream, ZeRO-2's module holds
bf16 weights. The RL loss itself is ~0 by construction (ratio 1, group-centred advantages), so it is
shown but not compared.

Ends with one line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("torch", "zero2")
PHASES = ("rl", "rft")
PAD_ID = 0
# Qwen2.5-0.5B's shape (random weights): 494.0M parameters with tied embeddings.
FULL = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2}
SMOKE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def model_shape(args) -> dict:
    return SMOKE if args.smoke else FULL


def apply_smoke(args) -> None:
    """--smoke: the tiny shape and a batch of 8 sequences of 64 tokens, unless given explicitly."""
    if not args.smoke:
        return
    smoke = {"prompts": 2, "samples": 4, "prompt_tokens": 16, "response_tokens": 48, "micro_batch": 4,
             "warmup": 1, "steps": 3, "lr": 1e-3}
    for key, value in smoke.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ------------------------------------------------------------------------------------------ worker
def synthetic_data(args, vocab: int) -> tuple[list[list[int]], list[list[list[int]]], list[list[float]]]:
    """Prompt ids [P][prompt_tokens], response ids [P][S][response_tokens], rewards [P][S]: uniform random,
    seeded, the same in every process."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(1, vocab, (args.prompts, args.prompt_tokens), generator=gen)
    responses = torch.randint(1, vocab, (args.prompts, args.samples, args.response_tokens), generator=gen)
    rewards = torch.rand((args.prompts, args.samples), generator=gen)
    return prompts.tolist(), responses.tolist(), rewards.tolist()


class ScriptedEngine:
    """The rollout engine of a benchmark: the fixed completions of each prompt, whatever the sampling
    parameters (n must match), with the completion's reward as its text."""

    def __init__(self, prompt_ids: dict[str, list[int]], completions: dict[str, list[tuple[list[int], float]]]):
        self.prompt_ids, self.completions = prompt_ids, completions

    def generate(self, prompts, params):
        from rloop.rollout import Completion, PromptResult

        out = []
        for prompt in prompts:
            fixed = self.completions[prompt]
            if params.n != len(fixed):
                raise ValueError(f"asked for {params.n} samples, scripted {len(fixed)}")
            result = PromptResult(prompt, list(self.prompt_ids[prompt]))
            for ids, reward in fixed:
                result.completions.append(Completion(repr(reward), list(ids), [-1.0] * len(ids), "length"))
            out.append(result)
        return out

    def update_weights(self, model) -> None:
        pass

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


def score_from_text(texts, examples):
    return [float(t) for t in texts]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_one_process_group(dev) -> None:
    """DeepSpeed needs torch.distributed even for one process: a group of one on this host."""
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=600))


def build_model(args, dev):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rloop.policy import prepare_for_training

    seq = args.prompt_tokens + args.response_tokens
    config = Qwen2Config(**model_shape(args), max_position_embeddings=max(seq, 2048), tie_word_embeddings=True,
                         attn_implementation="sdpa", pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)  # fp32, on CPU: the same weights in every process
    assert next(model.parameters()).dtype == torch.float32
    model = prepare_for_training(model, None, args.gradient_checkpointing)
    model.train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return model.to(dev), checksum


def parameter_counts(model) -> dict[str, int]:
    """Unique parameters, and those of the embedding matrix and of the LM head (one tensor when tied)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = emb is head
    body = total - emb.numel() - (0 if tied else head.numel())
    return {"params": total, "params_body": body, "params_head": head.numel(), "tied": tied}


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_memory_gib(dev) -> float:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / (1 << 30)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def make_zero2(model, dtype: str, *, lr: float, weight_decay: float, max_grad_norm: float):
    from rloop.spec import DistributedSpec
    from rloop.train.distributed import DeepSpeedOptimizer, World, deepspeed_config

    config = deepspeed_config(DistributedSpec(zero_stage=2), lr=lr, weight_decay=weight_decay,
                              max_grad_norm=max_grad_norm, dtype=dtype)
    return DeepSpeedOptimizer(model, World(), config)


def run_rl(args, model, dev, dtype: str, prompts, responses, rewards) -> dict:
    from rloop.data import Example
    from rloop.spec import RLSpec
    from rloop.train.rl import RLTrainer, _Timer

    names = [f"prompt-{i}" for i in range(args.prompts)]
    engine = ScriptedEngine(dict(zip(names, prompts, strict=True)),
                            {n: list(zip(r, w, strict=True)) for n, r, w in zip(names, responses, rewards, strict=True)})
    examples = [Example(id=str(i), prompt=n, answer="") for i, n in enumerate(names)]
    cfg = RLSpec(prompts_per_step=args.prompts, samples_per_prompt=args.samples, mini_batches=1, update_epochs=1,
                 micro_batch_size=args.micro_batch, max_response_tokens=args.response_tokens, lr=args.lr,
                 kl_coef=0.0, seed=0)

    class Tokenizer:  # all the trainer's update asks of a tokenizer
        pad_token_id = PAD_ID

    trainer = RLTrainer(model, Tokenizer(), engine, cfg, score_from_text, compute_dtype=dtype)
    if args.worker == "zero2":
        trainer.optimizer = make_zero2(model, dtype, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       max_grad_norm=cfg.max_grad_norm)
    groups = trainer._sample(0, 0, examples, lambda e: e.prompt, _Timer())
    seconds, stats = [], {}
    for _ in range(args.warmup + args.steps):
        sync(dev)
        t0 = time.perf_counter()
        stats = trainer._update(groups)
        sync(dev)
        seconds.append(time.perf_counter() - t0)
    if stats["optimizer_steps"] != 1:
        raise AssertionError(f"expected one optimizer step per update, got {stats['optimizer_steps']}")
    return {"seconds": seconds, "loss": stats["loss"], "grad_norm": stats["grad_norm"], "entropy": stats["entropy"],
            "optimizer": type(trainer.optimizer).__name__}


def run_rft(args, model, dev, dtype: str, pairs) -> dict:
    from rloop.train.distributed import TorchOptimizer, World
    from rloop.train.sft import sft_train

    weight_decay, max_grad_norm = 0.0, 1.0  # as the rft stage
    if args.worker == "zero2":
        optimizer = make_zero2(model, dtype, lr=args.lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    else:
        optimizer = TorchOptimizer(model, lr=args.lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    stamps, losses = [], []

    def on_step(step: int, loss: float) -> None:
        sync(dev)
        stamps.append(time.perf_counter())
        losses.append(loss)

    sync(dev)
    stamps.append(time.perf_counter())
    result = sft_train(model, pairs, pad_id=PAD_ID, steps=args.warmup + args.steps, batch_size=len(pairs), lr=args.lr,
                       weight_decay=weight_decay, max_grad_norm=max_grad_norm, micro_batch_size=args.micro_batch,
                       compute_dtype=dtype, on_step=on_step, optimizer=optimizer, world=World())
    seconds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"seconds": seconds, "loss": result.last_loss, "first_loss": result.first_loss,
            "optimizer": type(optimizer).__name__}


def worker(args) -> dict:
    import torch

    from rloop.train.sft import mean_nll

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    if args.worker == "zero2":
        init_one_process_group(dev)
    model, checksum = build_model(args, dev)
    counts = parameter_counts(model)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    prompts, responses, rewards = synthetic_data(args, model.config.vocab_size)
    pairs = [(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
    setup_s = time.perf_counter() - PROCESS_START  # imports, process group, model, data
    if args.phase == "rl":
        out = run_rl(args, model, dev, dtype, prompts, responses, rewards)
    else:
        out = run_rft(args, model, dev, dtype, pairs)
    peak = peak_memory_gib(dev)
    # The trained weights' response NLL on the batch (the same check in every variant).
    nll = mean_nll(model, pairs, pad_id=PAD_ID, batch_size=args.micro_batch, compute_dtype=dtype)
    out |= {"nll_after": nll, "peak_gib": peak, "setup_s": setup_s, "init_checksum": checksum, **counts,
            "tokens": sum(len(p) + len(r) for p, r in pairs), "response_tokens": sum(len(r) for _, r in pairs),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "device_type": dev.type,
            "dtype": dtype, "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "attn": model.config._attn_implementation, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.worker == "zero2":
        import deepspeed
        import torch.distributed as dist

        out["deepspeed"] = deepspeed.__version__
        dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------ parent
def run_worker(args, variant: str, phase: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", variant, "--phase", phase]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("WORKER ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-6000:]).strip()
        print(f"worker {phase}/{variant} exited {proc.returncode}:\n{tail}", file=sys.stderr, flush=True)
        return {"error": f"exit {proc.returncode}"}
    out = json.loads(lines[-1].removeprefix("WORKER "))
    out["wall_s"] = time.perf_counter() - t0
    return out


def model_flops(r: dict) -> float:
    """6 x (P_body x T + P_head x T_resp) per optimizer step (see the module docstring)."""
    return 6.0 * (r["params_body"] * r["tokens"] + r["params_head"] * r["response_tokens"])


def timed(r: dict, warmup: int) -> list[float]:
    return r["seconds"][warmup:]


def figures(r: dict, args) -> dict:
    s = statistics.median(timed(r, args.warmup))
    mfu = model_flops(r) / s / (args.peak_tflops * 1e12) if r["device_type"] == "cuda" else None
    return {"s_per_step": s, "tokens_per_s": r["tokens"] / s, "mfu": mfu, "peak_gib": r["peak_gib"],
            "loss": r["loss"], "nll": r["nll_after"], "grad_norm": r.get("grad_norm")}


def fmt_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and batch (CPU, < 1 min)")
    parser.add_argument("--prompts", type=int, default=None, help="prompt groups per step (16)")
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt (8)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (256)")
    parser.add_argument("--response-tokens", type=int, default=None, help="tokens per response (768)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward (16)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (2)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (5)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (1e-5)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--phases", default="rl,rft", help="comma-separated: rl, rft")
    parser.add_argument("--variants", default="torch,zero2", help="comma-separated: torch, zero2")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200: 989)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU is visible")
    parser.add_argument("--worker-timeout", type=float, default=900.0, help="seconds per measurement process")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_smoke(args)
    defaults = {"prompts": 16, "samples": 8, "prompt_tokens": 256, "response_tokens": 768, "micro_batch": 16,
                "warmup": 2, "steps": 5, "lr": 1e-5}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        sys.exit("--steps must be >= 1 and --warmup >= 0")
    if args.worker:
        print("WORKER " + json.dumps(worker(args)), flush=True)
        return

    phases = [p for p in args.phases.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    if not set(phases) <= set(PHASES) or not set(variants) <= set(VARIANTS) or not phases or not variants:
        sys.exit(f"--phases from {PHASES}, --variants from {VARIANTS}")
    t_all = time.perf_counter()
    runs: dict[tuple[str, str], dict] = {}
    for phase in phases:
        for variant in variants:
            r = run_worker(args, variant, phase)
            runs[phase, variant] = r
            if "error" in r:
                continue
            print(f"{phase}/{variant}: {fmt_spread(timed(r, args.warmup))} s/step over {args.steps} steps "
                  f"(warm-up {', '.join(f'{s:.2f}' for s in r['seconds'][:args.warmup]) or 'none'} s; set-up {r['setup_s']:.1f} s, "
                  f"process {r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    ok = {k: r for k, r in runs.items() if "error" not in r}
    if not ok:
        sys.exit("every measurement failed")
    first = next(iter(ok.values()))
    checksums = {r["init_checksum"] for r in ok.values()}
    if len(checksums) > 1:
        print(f"WARNING: the variants started from different weights (checksums {sorted(checksums)}): "
              "the NLL comparison means nothing", file=sys.stderr)
    shape = model_shape(args)
    seq = args.prompt_tokens + args.response_tokens
    where = "" if first["device_type"] == "cuda" else f", {first['threads']} CPU threads"
    print(f"\nGPU step: random-init Qwen2 ({first['params'] / 1e6:.1f}M parameters: hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocabulary {shape['vocab_size']}, tied), {first['dtype']} on "
          f"{first['device']}, {first['attn']} attention; {args.prompts} prompts x {args.samples} samples x "
          f"({args.prompt_tokens} + {args.response_tokens}) tokens = {first['tokens']} tokens per optimizer step, "
          f"micro-batch {args.micro_batch}{', gradient checkpointing' if args.gradient_checkpointing else ''}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; model FLOPs per step 6 x ({first['params_body'] / 1e6:.1f}M x "
          f"{first['tokens']} + {first['params_head'] / 1e6:.1f}M x {first['response_tokens']}) = "
          f"{model_flops(first) / 1e12:.1f} TFLOP; torch {first['torch']}"
          f"{', deepspeed ' + first['deepspeed'] if 'deepspeed' in first else ''}"
          f"{where}\n")
    print(f"| phase | optimizer | s/step median (min-max) | vs torch | tokens/s | MFU (of {args.peak_tflops:.0f} TFLOP/s) "
          "| peak memory GiB | loss (last step) | grad norm (last step) | NLL after | NLL vs torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    result: dict[str, str] = {}
    agree: list[str] = []
    for phase in phases:
        peer = figures(ok[phase, "torch"], args) if (phase, "torch") in ok else None
        for variant in variants:
            r = runs[phase, variant]
            label = {"torch": "torch AdamW (peer)", "zero2": "DeepSpeed ZeRO-2"}[variant]
            label += f", {r['param_dtype']} weights" if "param_dtype" in r else ""
            if "error" in r:
                print(f"| {phase} | {label} | failed: {r['error']} | - | - | - | - | - | - | - | - |")
                continue
            f = figures(r, args)
            ratio = f"{peer['s_per_step'] / f['s_per_step']:.2f}x" if peer else "-"
            mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "n/a"
            grad = f"{f['grad_norm']:.4g}" if f["grad_norm"] is not None else "-"
            diff = abs(f["nll"] - peer["nll"]) if peer else None
            diff_s = "-" if variant == "torch" or diff is None else f"{diff:.2e}"
            print(f"| {phase} | {label} | {fmt_spread(timed(r, args.warmup))} | {ratio} | {f['tokens_per_s']:,.0f} | {mfu} "
                  f"| {f['peak_gib']:.2f} | {f['loss']:.4g} | {grad} | {f['nll']:.6f} | {diff_s} |")
            key = f"{phase}_{variant}"
            result |= {f"{key}_s_per_step": f"{f['s_per_step']:.4f}", f"{key}_tokens_per_s": f"{f['tokens_per_s']:.1f}",
                       f"{key}_mfu": f"{f['mfu']:.4f}" if f["mfu"] is not None else "n/a",
                       f"{key}_peak_gib": f"{f['peak_gib']:.3f}", f"{key}_loss": f"{f['loss']:.6g}",
                       f"{key}_nll": f"{f['nll']:.8f}"}
            if variant != "torch" and peer:
                result |= {f"{phase}_{variant}_vs_torch": f"{peer['s_per_step'] / f['s_per_step']:.3f}",
                           f"{phase}_nll_abs_diff": f"{diff:.3e}"}
                agree.append(f"{phase} |NLL torch - {variant}| = {diff:.2e}")
    if agree:
        print(f"\nAfter the same {args.warmup + args.steps} steps from the same weights on the same data: "
              f"{'; '.join(agree)} ({first['dtype']}).")
    failed = [f"{p}_{v}" for (p, v), r in runs.items() if "error" in r]
    result |= {"params_m": f"{first['params'] / 1e6:.1f}", "tokens_per_step": str(first["tokens"]),
               "seq": str(seq), "micro_batch": str(args.micro_batch), "warmup": str(args.warmup),
               "steps": str(args.steps), "dtype": first["dtype"], "device": first["device_type"],
               "gpu": first["device"].replace(" ", "_") if first["device_type"] == "cuda" else "none",
               "total_s": f"{time.perf_counter() - t_all:.1f}"}
    if failed:
        result["failed"] = ",".join(failed)
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
