"""`rloop.models.import_model` and `rloop import-model` on the real SmolLM2-135M-Instruct weights.

The GGUF is loaded once per session (fixture smollm2_gguf, ~35 s on 2 cores); everything else reuses it
or the cached converted directory (fixture smollm2_dir).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rloop import models
from rloop.cli import main
from tests.real_weights.conftest import chat_input_ids

pytestmark = [pytest.mark.real_weights, pytest.mark.timeout(600)]

SMOLLM2_PARAMS = 134_515_008  # 134.5M; embeddings tied to the LM head, stored once
CHAT_ONE_USER = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _max_logit_diff(a, b, ids) -> float:
    return (a(ids).logits - b(ids).logits).abs().max().item()


def test_import_from_packaged_gguf_matches_gguf_logits(smollm2_gguf, smollm2_gguf_path, smollm2_dir, tmp_path,
                                                       monkeypatch):
    gguf_model, gguf_tok = smollm2_gguf
    # import_model on the packaged GGUF path, with the load served by the session's GGUF load (the same
    # load_source call import_model makes), so the 35 s GGUF parse happens once per session.
    calls = []

    def load_source(src, *, gguf_file=None, dtype="float32"):
        calls.append((src, gguf_file, dtype))
        return gguf_model, gguf_tok

    monkeypatch.setattr(models, "load_source", load_source)
    out = models.import_model(smollm2_gguf_path, tmp_path / "smollm2")
    assert calls == [(smollm2_gguf_path.parent / smollm2_gguf_path.name, None, "float32")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"], "temporary directories were left behind"
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]

    ids = chat_input_ids(gguf_tok)
    for path in (out, smollm2_dir):  # this import, and the cached one other tests use
        model, tok = _load(path)
        assert torch.equal(chat_input_ids(tok), ids)
        assert _max_logit_diff(model, gguf_model, ids) <= 1e-3
        del model


def test_tokenizer_generation_config_and_size(smollm2, smollm2_dir):
    model, tok = smollm2
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert tok("x")["input_ids"] == [104], "SmolLM2 adds no BOS token to plain text"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == CHAT_ONE_USER
    assert tok.model_max_length == model.config.max_position_embeddings == 8192

    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)
    assert not gen.do_sample
    assert model.config.pad_token_id == 2 and getattr(model.config, "quantization_config", None) is None

    n = sum(p.numel() for p in model.parameters())
    assert n == models.count_parameters(smollm2_dir) == SMOLLM2_PARAMS
    assert abs(n - 134.5e6) < 0.1e6

    ids = chat_input_ids(tok, "What is 2 + 3?")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "5" in text, text


def test_cli_imports_a_local_hf_directory(smollm2_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "copy"
    assert main(["import-model", str(smollm2_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{SMOLLM2_PARAMS:,} parameters" in printed
    a, b = load_file(smollm2_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 2

    # an existing, non-empty OUT is refused (exit 2), and nothing is touched
    assert main(["import-model", str(smollm2_dir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    def rloop(*args):
        r = subprocess.run([sys.executable, "-m", "rloop", "import-model", *map(str, args)],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr.strip()

    missing = tmp_path / "no-such-model"
    rc, err = rloop(missing, tmp_path / "out")
    assert rc == 2 and str(missing) in err and len(err.splitlines()) == 1, err
    (tmp_path / "empty").mkdir()
    rc, err = rloop(tmp_path / "empty", tmp_path / "out")
    assert rc == 2 and "config.json" in err and len(err.splitlines()) == 1, err
    (tmp_path / "notgguf.gguf").write_text("hello")
    rc, err = rloop(tmp_path / "notgguf.gguf", tmp_path / "out")
    assert rc == 2 and "not a GGUF file" in err, err
    rc, err = rloop(tmp_path, tmp_path / "out", "--gguf-file", "absent.gguf")
    assert rc == 2 and "absent.gguf" in err, err
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    rc, err = rloop(tmp_path / "config-only", tmp_path / "out")
    assert rc == 2 and "config-only" in err and "tokenizer" in err and len(err.splitlines()) == 1, err
    rc, err = rloop("--smollm2", tmp_path / "out", "extra-src")
    assert rc == 2 and "--smollm2 OUT" in err, err
    assert not (tmp_path / "out").exists()


def test_interrupted_save_leaves_no_directory(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", interrupted)  # after the weights were written
    with pytest.raises(KeyboardInterrupt):
        models.save_plain(model, tok, tmp_path / "policy")
    assert list(tmp_path.iterdir()) == []


def test_source_errors_name_the_argument(tmp_path):
    with pytest.raises(models.ModelSourceError, match="src .*does not exist"):
        models.resolve_source(tmp_path / "nope")
    (tmp_path / "a.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "b.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(models.ModelSourceError, match="several GGUF files.*gguf_file"):
        models.resolve_source(tmp_path)
    assert models.resolve_source(tmp_path, "b.gguf") == (tmp_path.resolve(), "b.gguf")
    assert models.resolve_source(tmp_path / "a.gguf") == (tmp_path.resolve(), "a.gguf")
    with pytest.raises(models.ModelSourceError, match="gguf_file='b.gguf' given with src"):
        models.resolve_source(tmp_path / "a.gguf", "b.gguf")
    with pytest.raises(models.ModelImportError, match="dtype='float16'"):
        models.import_model(tmp_path / "a.gguf", tmp_path / "out", dtype="float16")
    assert issubclass(models.ModelImportError, ValueError)


def test_module_import_stays_light():
    code = "import sys, rloop.models, rloop.cli; print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"
