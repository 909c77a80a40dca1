"""Rollout engines side by side: tokens/s of `vllm` (rloop.rollout.vllm) against `hf` (transformers
generate, the peer) on the same model, prompts and sampling, plus the seconds one weight sync costs.

    make vllm-venv smollm2
    .venv-vllm/bin/python benchmarks/rollout_engines.py                 # 64 prompts x 8 samples x 128 tokens
    .venv-vllm/bin/python benchmarks/rollout_engines.py --prompts 16 --repeats 2

Workload: the first `--prompts` GSM8K questions of tests/data/gsm8k/train-sample.jsonl through SmolLM2's
chat template, `--samples` samples each at T = 0.7, top-p 1, up to `--max-tokens` tokens (EOS ends a
response early, so each engine is credited with the tokens it actually generated). Each measurement runs
in a fresh process of its own (vLLM's CPU backend binds threads and memory for the whole process, which
would slow an hf engine beside it), on the same fp32 weights and torch threads; repeats alternate hf,
vllm, hf, vllm, ... so a slow patch of the machine hits both. A one-prompt warm-up runs before the timed
call; start-up is reported apart. Each figure is min / median / max over the repeats. hf generates
`--hf-batch` sequences per generate() call (64: on 2 cores faster per token than 256).

Sync: `update_weights` after a perturbation of the weights, as the RL stage does after every optimizer
step: a full fine-tune pushes every tensor into the running engine; LoRA (r = 8 on q/v) saves the adapter
and hot-loads it. hf shares the trainer's module, so its sync is free by construction (shown as 0).
Ends with one line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "tests" / "data" / "gsm8k" / "train-sample.jsonl"


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float], digits: int = 1) -> str:
    low, mid, high = spread(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def timed_generate(engine, prompts: list[str], params) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(c.token_ids) for r in results for c in r.completions)


def perturb(model, seed: int) -> None:
    """A small random step on every weight (what an optimizer step does to the tensors a sync moves)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-4)


def prompts_and_model(args):
    from rloop.data import Example
    from rloop.policy import load_policy
    from rloop.prompts import PromptFormat

    questions = [json.loads(line)["question"] for line in DATA.read_text().splitlines()][: args.prompts]
    if len(questions) < args.prompts:
        sys.exit(f"--prompts {args.prompts}: {DATA.name} has {len(questions)} questions")
    model, tok = load_policy(args.model, "float32")
    fmt_ = PromptFormat.for_model(tok, chat_template=True)
    prompts = [fmt_.render(Example(id=str(i), prompt=q, answer="")) for i, q in enumerate(questions)]
    return model, tok, fmt_, prompts


def worker(args) -> dict:
    """One measurement in this process: `hf` or `vllm` generation (vllm: then `--syncs` full syncs), or
    `vllm-lora` (LoRA hot-load syncs only)."""
    import torch

    from rloop.policy import attach_lora
    from rloop.rollout import SamplingParams, make_engine
    from rloop.spec import LoraSpec

    model, tok, fmt_, prompts = prompts_and_model(args)
    out: dict = {"threads": torch.get_num_threads(), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    lora = args.worker == "vllm-lora"
    if lora:
        model = attach_lora(model, LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    t0 = time.perf_counter()
    if args.worker == "hf":
        engine = make_engine("hf", model, tok, encode=fmt_.encode, batch_size=args.hf_batch)
    else:
        engine = make_engine("vllm", model, tok, model_path=args.model, encode=fmt_.encode, dtype="float32",
                             max_model_len=1024, lora_rank=8 if lora else None)
    out["start_s"] = time.perf_counter() - t0
    if lora:
        syncs = []
        for i in range(args.syncs):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.add_(1e-3 * (i + 1))
            engine.update_weights(model)
            syncs.append(engine.last_sync_s)
        engine.close()
        return out | {"sync_s": syncs}
    engine.generate(prompts[:1], SamplingParams(n=1, max_tokens=4, seed=0))  # warm-up
    params = SamplingParams(n=args.samples, temperature=0.7, top_p=1.0, max_tokens=args.max_tokens, seed=0)
    seconds, tokens = timed_generate(engine, prompts, params)
    out |= {"seconds": seconds, "tokens": tokens}
    if args.worker == "vllm":
        syncs = []
        for i in range(args.syncs):
            perturb(model, seed=i)
            engine.update_weights(model)
            syncs.append(engine.last_sync_s)
        out["sync_s"] = syncs
    engine.close()
    return out


def run_worker(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--prompts", str(args.prompts),
           "--samples", str(args.samples), "--max-tokens", str(args.max_tokens), "--syncs", str(args.syncs),
           "--hf-batch", str(args.hf_batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("WORKER ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("WORKER "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"),
                        help="a save_pretrained directory (make smollm2 writes the default)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=5, help="weight syncs measured per vllm process")
    parser.add_argument("--hf-batch", type=int, default=64, help="sequences per hf generate() call")
    parser.add_argument("--worker", choices=["hf", "vllm", "vllm-lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"--model {args.model}: no config.json there; run `make smollm2` or pass a model directory")
    if args.worker:
        print("WORKER " + json.dumps(worker(args)), flush=True)
        return

    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for repeat in range(args.repeats):
        for name in ("hf", "vllm"):
            r = run_worker(args, name)
            runs[name].append(r)
            print(f"repeat {repeat} {name}: {r['tokens']} tokens in {r['seconds']:.1f} s = "
                  f"{r['tokens'] / r['seconds']:.1f} tokens/s (start-up {r['start_s']:.1f} s)", file=sys.stderr, flush=True)
    lora = run_worker(args, "vllm-lora")

    tokens_per_s = {name: [r["tokens"] / r["seconds"] for r in rs] for name, rs in runs.items()}
    full_sync = [s for r in runs["vllm"] for s in r["sync_s"]]
    hf_mid, vllm_mid = statistics.median(tokens_per_s["hf"]), statistics.median(tokens_per_s["vllm"])
    first = runs["hf"][0]
    print(f"\nRollout engines: SmolLM2-135M ({first['params_m']:.1f}M params, fp32), {args.prompts} prompts x "
          f"{args.samples} samples x <= {args.max_tokens} tokens, T 0.7, {first['threads']} torch threads, "
          f"{args.repeats} alternated repeats, hf {args.hf_batch} sequences per generate()\n")
    print("| engine | tokens/s median (min-max) | vs hf | tokens per repeat | weight sync s median (min-max) "
          "| start-up s median |")
    print("|---|---|---|---|---|---|")
    print(f"| hf (peer) | {fmt(tokens_per_s['hf'])} | 1.00x | {int(statistics.median(r['tokens'] for r in runs['hf']))} "
          f"| 0 (shares the trainer's module) | {statistics.median(r['start_s'] for r in runs['hf']):.1f} |")
    print(f"| vllm, full fine-tune | {fmt(tokens_per_s['vllm'])} | {vllm_mid / hf_mid:.2f}x "
          f"| {int(statistics.median(r['tokens'] for r in runs['vllm']))} | {fmt(full_sync, 2)} "
          f"| {statistics.median(r['start_s'] for r in runs['vllm']):.1f} |")
    print(f"| vllm, LoRA r=8 (q, v) | - | - | - | {fmt(lora['sync_s'], 2)} | {lora['start_s']:.1f} |")
    print(f"\nRESULT hf_tokens_per_s={hf_mid:.1f} vllm_tokens_per_s={vllm_mid:.1f} vllm_vs_hf={vllm_mid / hf_mid:.2f} "
          f"sync_full_s={statistics.median(full_sync):.3f} sync_lora_s={statistics.median(lora['sync_s']):.3f} "
          f"prompts={args.prompts} samples={args.samples} max_tokens={args.max_tokens} repeats={args.repeats}")


if __name__ == "__main__":
    main()
