"""`rollout`: fresh samples on the train prompts from every checkpoint the RL stage saved
(the pool variant `loop.pool.source: checkpoints`). Output rows have the pool's columns."""

from __future__ import annotations

from rloop.pool import trajectory_row
from rloop.progress import Progress
from rloop.stages.common import InputError, StageContext, load_dataset, make_scorer, parquet_bytes


def rollout_engine(ctx: StageContext, model, tok, fmt, *, model_path=None, lora: bool = False,
                   colocated: bool = False):
    """The rollout engine (`loop.rollout.engine`) sampling from `model`, encoding prompts with `fmt`, in the
    run's precision. vllm starts from `model_path`, the directory `model` was loaded from (for LoRA, the
    base the adapters sit on: `lora` enables adapter hot-loading with rank model.lora.r). `colocated`: the
    engine shares the GPU with a trainer (the rl stage), so sleep mode applies (`loop.rollout.vllm.sleepMode`);
    a stage that only samples has nothing to make room for."""
    from rloop.policy import autocast
    from rloop.rollout import make_engine

    ro = ctx.spec.loop.rollout
    if ro.engine == "hf":
        return make_engine("hf", model, tok, encode=fmt.encode, autocast=autocast(ctx.spec.model.dtype))
    if model_path is None:
        raise ValueError("the vllm rollout engine needs the policy directory the model was loaded from")
    v = ro.vllm
    return make_engine("vllm", model, tok, model_path=model_path, encode=fmt.encode, dtype=ctx.spec.model.dtype,
                       gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_gib=v.kv_cache_gib,
                       max_model_len=v.max_model_len, enforce_eager=v.enforce_eager,
                       tensor_parallel_size=1 if colocated else v.tensor_parallel_size,
                       sleep_mode=v.sleep_mode if colocated else False,
                       lora_rank=ctx.spec.model.lora.r if lora and ctx.spec.model.lora is not None else None)


def sample_and_score(ctx: StageContext, model, tok, examples, *, n: int, temperature: float, top_p: float,
                     max_tokens: int, seed: int, desc: str, model_path=None, engine=None) -> list[dict]:
    """n scored samples per example, as `rloop.pool.trajectory_row`s with a `sample` index. `engine`: one
    already sampling from `model` (else one is started)."""
    from rloop.rollout import SamplingParams

    fmt = ctx.prompt_format(tok)
    own_engine = engine is None
    if own_engine:
        engine = rollout_engine(ctx, model, tok, fmt, model_path=model_path)
    score = make_scorer(ctx.spec)
    rows: list[dict] = []
    chunk = max(1, 256 // n)
    bar = Progress(len(examples), desc, unit="prompt")
    try:
        for i in range(0, len(examples), chunk):
            batch = examples[i : i + chunk]
            results = engine.generate([fmt.render(e) for e in batch], SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=tuple(ctx.spec.loop.rl.stop),
                seed=seed + i))
            flat = [(e, r, j, c) for e, r in zip(batch, results, strict=True) for j, c in enumerate(r.completions)]
            scores = score([c.text for *_, c in flat], [e for e, *_ in flat])
            rows += [trajectory_row(e, r.prompt, r.prompt_token_ids, c, s, sample=j)
                     for (e, r, j, c), s in zip(flat, scores, strict=True)]
            bar.update(len(batch))
    finally:
        bar.close()
        if own_engine:
            engine.close()
    return rows


def run(ctx: StageContext) -> dict:
    from rloop.policy import load_policy

    spec, k = ctx.spec, ctx.iteration
    rl_id = f"iter-{k:03d}/rl"
    m = ctx.input_manifest(rl_id)
    steps = sorted({f.path.split("/")[1] for f in m.files if f.path.startswith("checkpoints/")})
    if not steps:
        raise InputError(f"{rl_id} saved no checkpoints; loop.pool.source=checkpoints needs loop.pool.checkpointEvery")
    train = load_dataset(spec.data.train, "data.train")
    rows: list[dict] = []
    # One engine for all checkpoints, each one's weights pushed into it: a vLLM engine per checkpoint would
    # pay its start-up every time. The in-process push needs the engine in this process, so an engine
    # spanning several GPUs (its workers are processes of their own) is stopped and started per checkpoint.
    push = spec.loop.rollout.engine == "hf" or spec.loop.rollout.vllm.tensor_parallel_size == 1
    engine = None
    try:
        for ck in steps:
            ck_dir = ctx.store.local_dir(rl_id, f"checkpoints/{ck}", manifest=m)
            model, tok = load_policy(ck_dir, spec.model.dtype)
            if engine is not None and push:
                engine.update_weights(model)
            else:
                if engine is not None:
                    engine.close()
                engine = rollout_engine(ctx, model, tok, ctx.prompt_format(tok), model_path=ck_dir)
            step = int(ck.removeprefix("step-"))
            for r in sample_and_score(ctx, model, tok, train, n=spec.loop.pool.samples_per_prompt, engine=engine,
                                      temperature=spec.loop.rl.temperature, top_p=spec.loop.rl.top_p,
                                      max_tokens=spec.loop.rl.max_response_tokens, seed=spec.loop.rl.seed + step,
                                      desc=f"iter {k} rollout {ck}"):
                rows.append({**r, "step": step, "checkpoint": ck})
    finally:
        if engine is not None:
            engine.close()
    summary = {"checkpoints": len(steps), "samples": len(rows),
               "pass_rate": sum(r["correct"] for r in rows) / len(rows)}
    with ctx.store.stage_writer(ctx.stage.id) as w:
        w.put_bytes("samples.parquet", parquet_bytes(rows))
        ctx.commit(w, summary)
    return summary
