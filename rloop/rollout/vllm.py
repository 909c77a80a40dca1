"""The vLLM backend: `vllm.LLM` in the trainer's process, same outputs as the `hf` engine.

What it guarantees (and how it matches `rloop.rollout.hf`):
- sampling parameters are explicit: `generation_config="vllm"` stops vLLM from taking the model's
  generation_config defaults (top-k, repetition penalty, ...); EOS is every id the tokenizer and the model's
  generation config name (`hf.eos_token_ids`), passed as stop token ids;
- prompt ids come from the same `encode` (`PromptFormat.encode`) and go in as token ids, so both engines
  see the same prompt tokens;
- `token_ids` are exactly the sampled tokens: the EOS that ended a response is kept, the token that completed
  a stop string is kept (vLLM cuts only the text); `text` is decoded from them as `hf` does;
- `logprobs` are vLLM's `processed_logprobs` of the sampled token: log softmax(logits / T). vLLM applies
  top-p before it records them, so with top_p < 1 they are log-probs of the *truncated, renormalised*
  distribution (hf's are before top-p; they differ by log(nucleus mass) per token). With top_p = 1 (the
  default) the two definitions are the same, and the `vllm` tests check that against the trainer's
  `forward_logprobs`;
- seeds: prompt i gets seed + i*n, and vLLM gives its j-th sample seed + i*n + j, so every sample of a
  batch has its own stream (identical prompts in one batch do not get identical samples).

Weight sync (`update_weights`), in process, never a reload from disk:
- full fine-tune: the trainer's named parameters go through vLLM's in-place `reload_weights` (its
  layerwise reload re-runs the kernel-format processing, e.g. the CPU backend's oneDNN weight packing,
  which a bare `model.load_weights` would miss; on CPU a tied LM head is re-packed too, see
  `_refresh_cpu_embedding_kernels`), then the prefix cache is reset (its KV entries were computed with
  the old weights);
- LoRA (a peft model): the adapter is saved to a temporary directory and loaded as a new `LoRARequest`
  (a fresh id per update: vLLM caches adapters by id); nothing is merged.

Sleep mode (GPU only, `sleep_mode=True`): `sleep()` before the trainer's update frees the engine's GPU
memory, level 2 for a full fine-tune (KV cache and weights discarded: new weights are pushed anyway; vLLM
keeps the model's buffers, e.g. rotary tables, in host memory and restores them), level 1 for LoRA (the
base weights wait in host memory). `update_weights` then wakes the weights, pushes, and wakes the KV cache
last, so the update and the KV cache never hold GPU memory at the same time (verl's order).

vLLM is imported here only, lazily: `rloop.spec`, `rloop.plan` and the operator never import it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

from rloop.rollout import Completion, PromptResult, SamplingParams

_CPU_DEFAULT_KV_CACHE_GIB = 1.0
_CPU_BATCHED_TOKENS = 4096  # vLLM's CPU default token budget per scheduler step


def _prepare_environment() -> None:
    """Settings vLLM reads at import or engine start.

    - `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core runs in this process (InprocClient +
      UniProcExecutor), so the trainer's tensors reach the engine's model without serialisation.
    - `OMP_NUM_THREADS`: without it vLLM drops torch to one thread "for serving", in *this* process, which
      would also slow the trainer; it is set to the threads torch uses now.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VllmEngine:
    """Samples with a `vllm.LLM` started from `model_path` (a save_pretrained directory with the same
    weights as `model`; for LoRA, the base the adapters sit on).

    `gpu_memory_utilization` is the share of accelerator memory vLLM may take (weights + KV cache); on the
    CPU backend it would be a share of the NUMA node's RAM counted *including* this process (trainer
    included), so there the KV cache is sized explicitly instead: `kv_cache_gib` (default 1 GiB on CPU,
    unset on GPU). `lora_rank` enables LoRA hot-loading (set it to the adapters' r).
    """

    def __init__(self, model, tokenizer, *, model_path: str | os.PathLike, encode: Callable[[str], list[int]] | None = None,
                 dtype: str = "float32", gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 enforce_eager: bool = True, tensor_parallel_size: int = 1, kv_cache_gib: float | None = None,
                 lora_rank: int | None = None, seed: int = 0, sleep_mode: bool | None = None):
        from rloop.rollout.hf import eos_token_ids

        _prepare_environment()
        from vllm import LLM

        self.tok = tokenizer
        self.encode = encode or (lambda text: list(tokenizer(text)["input_ids"]))
        self.eos_ids = eos_token_ids(tokenizer, model)
        on_cpu = _on_cpu()
        if kv_cache_gib is None and on_cpu:
            kv_cache_gib = _CPU_DEFAULT_KV_CACHE_GIB
        kwargs: dict = {}
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        if on_cpu:
            # vLLM's CPU backend crashes ("CPU Generator does not use offset") when a seeded request's prompt
            # is prefilled in chunks: rolling back a partial prefill's sample rewinds the request's generator,
            # which only CUDA generators can do. Whole prompts only, then (a step's budget holds the longest).
            kwargs["enable_chunked_prefill"] = False
            if max_model_len is not None:
                kwargs["max_num_batched_tokens"] = max(max_model_len, _CPU_BATCHED_TOKENS)
        if lora_rank is not None:
            kwargs |= {"enable_lora": True, "max_lora_rank": _vllm_lora_rank(lora_rank), "max_loras": 1}
        if sleep_mode is None:
            sleep_mode = not on_cpu
        if sleep_mode and on_cpu:
            raise ValueError("loop.rollout.vllm.sleepMode: vLLM's CPU backend has no sleep mode; "
                             "leave it unset (on with CUDA, off on CPU) or set it false")
        if sleep_mode:
            kwargs["enable_sleep_mode"] = True
        t0 = time.monotonic()
        self.llm = LLM(
            model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="processed_logprobs", generation_config="vllm", **kwargs,
        )
        self.start_time_s = time.monotonic() - t0
        self.kv_cache_gib = _allocated_kv_cache_gib(self.llm)
        self.sleep_mode = sleep_mode
        self._asleep = False
        self.lora_rank = lora_rank
        self._lora = None  # the current LoRARequest
        self._lora_dir: str | None = None
        self._lora_id = 0
        self.last_sync_s = 0.0

    # ------------------------------------------------------------------------------ sampling
    def _sampling_params(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            max_tokens=params.max_tokens, stop=list(params.stop) or None, stop_token_ids=list(self.eos_ids),
            seed=seed, logprobs=0, skip_special_tokens=True,
        )

    def generate(self, prompts: list[str], params: SamplingParams) -> list[PromptResult]:
        results = [PromptResult(p, self.encode(p)) for p in prompts]
        if not results:
            return results
        if self._asleep:  # a generate() without update_weights() after sleep(): same weights, all back
            self.llm.wake_up()
            self._asleep = False
        sps = [self._sampling_params(params, None if params.seed is None else params.seed + i * params.n)
               for i in range(len(results))]
        outs = self.llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in results], sps,
                                 use_tqdm=False, lora_request=self._lora)
        for r, out in zip(results, outs, strict=True):
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], tokens, strict=True)]
                if len(lps) != len(tokens):
                    raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(tokens)} tokens")
                # vLLM: "stop" = EOS, a stop token or a stop string; "length" = max_tokens (or max_model_len).
                finish = "stop" if c.finish_reason == "stop" else "length"
                r.completions.append(Completion(self._text(tokens, params), tokens, lps, finish))  # type: ignore[arg-type]
        return results

    def _text(self, tokens: list[int], params: SamplingParams) -> str:
        text = self.tok.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text = text[: text.index(s)]
        return text

    # ------------------------------------------------------------------------------ weight sync
    def sleep(self) -> None:
        """Free the engine's GPU memory until the next `update_weights` or `generate` (no-op without sleep
        mode). Level 2 (weights too) only for a full fine-tune, whose next sync rewrites every weight."""
        if not self.sleep_mode or self._asleep:
            return
        self.llm.sleep(level=1 if self.lora_rank is not None else 2)
        self._asleep = True

    def update_weights(self, model) -> None:
        t0 = time.monotonic()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        if hasattr(model, "peft_config"):
            self._load_adapter(model)
        else:
            self._push_full(model)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.last_sync_s = time.monotonic() - t0

    def _push_full(self, model) -> None:
        if self.lora_rank is not None:
            raise ValueError("this vLLM engine was started for LoRA (lora_rank set); update it with the peft model")
        import torch

        with torch.no_grad():
            weights = ((name, p.detach()) for name, p in model.named_parameters())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            if _on_cpu():
                self.llm.apply_model(_refresh_cpu_embedding_kernels)
        self.llm.reset_prefix_cache()

    def _load_adapter(self, model) -> None:
        from vllm.lora.request import LoRARequest

        if self.lora_rank is None:
            raise ValueError("a peft model was given but the vLLM engine was started without LoRA; pass lora_rank")
        self._lora_id += 1
        new_dir = tempfile.mkdtemp(prefix=f"rloop-lora-{self._lora_id}-")
        model.save_pretrained(new_dir)
        old, old_dir = self._lora, self._lora_dir
        self._lora = LoRARequest(f"rloop-{self._lora_id}", self._lora_id, new_dir)
        self._lora_dir = new_dir
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine and hand its memory back, so that another can start in this process (the
        checkpoint rollout stage with tensorParallelSize > 1 starts one per checkpoint). Idempotent."""
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
            self._lora_dir = None
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()  # process groups of tensor parallelism, gc, the device cache


def _refresh_cpu_embedding_kernels(model) -> int:
    """Rebuild the CPU GEMM kernels of embedding-shaped layers from their current weights.

    The CPU backend computes the LM head with a oneDNN handle (or packed copy) built from the weight at
    load time. With tied embeddings (SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B) the head loads no weights of its
    own, so vLLM's in-place reload updates the shared tensor but never rebuilds the head's handle: the
    logits would keep using the old embedding matrix. Re-running the layer's weight processing fixes that
    (on GPU the head reads the weight tensor directly; nothing to do there)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    n = 0
    for m in model.modules():
        if isinstance(m, VocabParallelEmbedding) and hasattr(m.quant_method, "process_weights_after_loading"):
            m.quant_method.process_weights_after_loading(m)
            n += 1
    return n


def _allocated_kv_cache_gib(llm) -> float | None:
    """The KV cache a started engine allocated, in GiB (None when vLLM does not say); fixed for its life."""
    config = llm.llm_engine.vllm_config
    blocks = config.cache_config.num_gpu_blocks
    if not blocks:
        return None
    model = config.model_config
    per_token = 2 * model.get_num_layers(config.parallel_config) * model.get_num_kv_heads(
        config.parallel_config) * model.get_head_size() * _dtype_bytes(config.cache_config.cache_dtype, model.dtype)
    return blocks * config.cache_config.block_size * per_token / (1 << 30)


def _dtype_bytes(cache_dtype: str, model_dtype) -> int:
    """Bytes per KV element: the cache dtype, or the model's when it is "auto"."""
    if cache_dtype in ("auto", None):
        return model_dtype.itemsize
    return 1 if cache_dtype.startswith("fp8") else 2


def _vllm_lora_rank(r: int) -> int:
    """vLLM accepts a fixed set of max_lora_rank values; the smallest that holds r."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank (512)")
