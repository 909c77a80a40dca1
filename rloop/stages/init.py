"""`init`: materialise the base policy P_0 at `base/init/policy`.

`builtin:tiny` builds the tiny model and warms it up with SFT on synthetic pairs; the result is
deterministic from its settings, so it is cached under `<store>/_cache/` and reused by every run
with the same settings (the vanilla-RL baseline and the RLoop run start from the same P_0).
A path or URI is loaded with `from_pretrained` and saved into the run, so the run is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from rloop.progress import Progress
from rloop.stages.common import InputError, StageContext

BUILD_SOURCES = ("rloop/stages/init.py", "rloop/policy.py", "rloop/data/synthetic.py", "rloop/train/sft.py")
"""The code that builds and warms up the tiny model: its bytes are part of the cache key."""


def build_fingerprint(root: Path = Path(__file__).resolve().parents[2], sources=BUILD_SOURCES) -> str:
    """sha256 over the code that makes a warmed-up tiny model. A cached model built by other code (an
    older rloop whose warm-up data or initialisation differed) is then never mistaken for this one's."""
    h = hashlib.sha256()
    for rel in sources:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _tiny_cache_key(ctx: StageContext) -> str:
    cfg = ctx.spec.model.tiny.to_wire()
    key = json.dumps({"tiny": cfg, "code": build_fingerprint()}, sort_keys=True)
    return "tiny-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def build_warm_tiny(cfg, out_dir: Path, progress: bool = True) -> dict:
    """Random-init tiny model + SFT warm-up on fresh synthetic pairs every step; saved to out_dir."""
    from rloop.data.synthetic import warmup_pairs
    from rloop.policy import build_tiny, save_policy
    from rloop.train.sft import encode_pairs, sft_train

    model, tok = build_tiny(cfg)
    bar = Progress(cfg.warmup_steps, "warm-up", enabled=progress)

    def batch(step: int):
        return encode_pairs(tok, warmup_pairs(cfg.warmup_batch_size, seed=cfg.seed * 1_000_003 + step))

    def tick(step: int, loss: float) -> None:
        bar.update(1, loss=loss)

    res = sft_train(model, batch, pad_id=tok.pad_token_id, steps=cfg.warmup_steps, batch_size=cfg.warmup_batch_size,
                    lr=cfg.warmup_lr, seed=cfg.seed, on_step=tick)
    bar.close()
    save_policy(model, tok, out_dir)
    return {"warmup_first_loss": res.first_loss, "warmup_last_loss": res.last_loss,
            "parameters": sum(p.numel() for p in model.parameters())}


def run(ctx: StageContext) -> dict:
    from rloop.policy import load_policy, save_policy
    from rloop.store import RunStore

    base = ctx.spec.model.base
    with ctx.store.stage_writer(ctx.stage.id) as w, tempfile.TemporaryDirectory() as tmp:
        if base == "builtin:tiny":
            cache = RunStore(ctx.store.root_uri, "_cache", _tiny_cache_key(ctx))
            if cache.is_committed("base/init", deep=True):
                m = cache.validate("base/init", deep=False)
                w.put_dir("policy", cache.local_dir("base/init", "policy", manifest=m))
                summary = {**m.summary, "cache": "hit"}
            else:
                summary = build_warm_tiny(ctx.spec.model.tiny, Path(tmp) / "policy")
                with cache.stage_writer("base/init") as cw:
                    cw.put_dir("policy", Path(tmp) / "policy")
                    cw.commit(summary)
                w.put_dir("policy", Path(tmp) / "policy")
                summary = {**summary, "cache": "miss"}
        else:
            src = Path(base)
            if base.startswith("s3://"):
                import fsspec

                fs, _ = fsspec.core.url_to_fs(base)
                fs.get(base.rstrip("/") + "/", str(Path(tmp) / "src"), recursive=True)
                src = Path(tmp) / "src"
            if not (src / "config.json").exists():
                raise InputError(
                    f"model.base {base!r}: no config.json there; point it at a save_pretrained directory "
                    "(model + tokenizer) or use 'builtin:tiny'"
                )
            model, tok = load_policy(src, ctx.spec.model.dtype)
            save_policy(model, tok, Path(tmp) / "policy", ctx.spec.model.dtype)
            w.put_dir("policy", Path(tmp) / "policy")
            summary = {"parameters": sum(p.numel() for p in model.parameters())}
        ctx.commit(w, summary)
    return summary
