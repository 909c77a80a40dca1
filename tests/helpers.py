"""Small helpers shared by test modules (importable as `tests.helpers`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `patch` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread, and do not oversubscribe a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_doc(name: str, *, mode: str = "rloop", iterations: int = 2, eval_base: bool = True) -> dict:
    """examples/tiny.yaml shrunk so that a whole run is seconds per stage."""
    doc = yaml.safe_load(TINY.read_text())
    doc["metadata"]["name"] = name
    s = doc["spec"]
    s["mode"] = mode
    s["model"]["tiny"].update(hiddenSize=64, layers=2, warmupSteps=40)
    s["data"]["train"]["synthetic"]["size"] = 32
    s["data"]["eval"] = s["data"]["eval"][:1]  # the shifted held-out set only: fewer stages to wait for
    s["data"]["eval"][0]["synthetic"]["size"] = 16
    s["data"]["eval"][0]["samplesPerPrompt"] = 4
    s["loop"]["iterations"] = iterations
    s["loop"]["rl"].update(steps=4, promptsPerStep=4, samplesPerPrompt=4)
    s["loop"]["rft"]["maxSteps"] = 4
    s["loop"]["eval"]["kList"] = [1, 2, 4]
    s["loop"]["eval"]["evalBase"] = eval_base
    return doc


def base_env(cache: Path) -> dict[str, str]:
    """Quiet, single-threaded, offline stage subprocesses with no ambient S3/RLOOP settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "RLOOP_"))}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONUNBUFFERED="1",
        RLOOP_CACHE=str(cache),
    )
    return env
