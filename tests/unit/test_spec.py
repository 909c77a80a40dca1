"""The RLoopRun model: algorithm defaults, error messages that name the field and the fix, round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rloop.spec import RLoopRun, SpecError, load_run, parse_run, parse_spec
from tests.helpers import deep_merge

BASE_SPEC: dict[str, Any] = {
    "model": {"base": "builtin:tiny"},
    "data": {
        "train": {"synthetic": {"size": 32}},
        "eval": [{"name": "heldout", "synthetic": {"split": "heldout", "size": 16}}],
    },
}


def doc(spec_patch: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "rloop.dev/v1alpha1",
        "kind": "RLoopRun",
        "metadata": {"name": "demo"},
        "spec": deep_merge(BASE_SPEC, spec_patch or {}),
    }


def make(spec_patch: dict[str, Any] | None = None) -> RLoopRun:
    return parse_run(doc(spec_patch))


def error(document: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_run(document)
    return str(info.value)


# --------------------------------------------------------------------------------------- defaults
def test_minimal_manifest_defaults() -> None:
    run = make()
    assert run.metadata.name == "demo" and run.metadata.namespace == "default"
    assert run.spec.mode == "rloop"
    assert run.spec.loop.iterations == 3
    assert run.spec.verifier.name == "subset_sum"
    assert run.spec.loop.eval.k_list == [1, 4, 8, 16]
    assert run.spec.model.lora is None


def test_grpo_defaults() -> None:
    rl = make({"loop": {"rl": {"algorithm": "grpo", "clipLow": 0.15}}}).spec.loop.rl
    assert rl.clip_high == rl.clip_low == 0.15
    assert rl.loss_agg == "seq_mean_token_mean"
    assert rl.dynamic_sampling is False


def test_dapo_defaults() -> None:
    rl = make({"loop": {"rl": {"algorithm": "dapo"}}}).spec.loop.rl
    assert rl.clip_high == 0.28
    assert rl.loss_agg == "token_mean"
    assert rl.dynamic_sampling is True


def test_dr_grpo_defaults() -> None:
    rl = make({"loop": {"rl": {"algorithm": "dr_grpo"}}}).spec.loop.rl
    assert rl.loss_agg == "seq_mean_token_sum_norm"
    assert rl.clip_high == rl.clip_low
    assert rl.dynamic_sampling is False


def test_explicit_fields_override_algorithm_defaults() -> None:
    rl = make(
        {
            "loop": {
                "rl": {
                    "algorithm": "dapo",
                    "clipHigh": 0.4,
                    "lossAgg": "seq_mean_token_mean",
                    "dynamicSampling": False,
                }
            }
        }
    ).spec.loop.rl
    assert (rl.clip_high, rl.loss_agg, rl.dynamic_sampling) == (0.4, "seq_mean_token_mean", False)


# ----------------------------------------------------------------------------------------- errors
def test_unknown_field() -> None:
    msg = error(doc({"loop": {"rl": {"clipLo": 0.2}}}))
    assert "spec.loop.rl.clipLo" in msg
    assert "unknown field" in msg and "camelCase" in msg


def test_clip_low_out_of_range() -> None:
    msg = error(doc({"loop": {"rl": {"clipLow": 1.5}}}))
    assert msg.startswith("spec.loop.rl.clipLow:")
    assert "less than 1" in msg


def test_k_larger_than_samples_per_prompt() -> None:
    msg = error(doc({"loop": {"eval": {"kList": [1, 32]}}}))
    assert "kList" in msg and "k=[32]" in msg
    assert "samplesPerPrompt" in msg and "raise samplesPerPrompt or drop those k" in msg


def test_overlong_buffer_not_below_max_response_tokens() -> None:
    msg = error(doc({"loop": {"rl": {"maxResponseTokens": 16, "overlongBuffer": 16}}}))
    assert msg.startswith("spec.loop.rl:")
    assert "overlongBuffer (16)" in msg and "maxResponseTokens (16)" in msg
    assert "overlongBuffer: 4" in msg


def test_float16_is_rejected_with_the_fix() -> None:
    msg = error(doc({"model": {"dtype": "float16"}}))
    assert msg.startswith("spec.model.dtype:")
    assert "loss scaling" in msg and "'bfloat16'" in msg


def test_mini_batches_beyond_the_responses_per_step() -> None:
    msg = error(doc({"loop": {"rl": {"promptsPerStep": 2, "samplesPerPrompt": 2, "miniBatches": 8}}}))
    assert msg.startswith("spec.loop.rl:") and "miniBatches (8)" in msg and "= 4" in msg


def test_update_knobs_have_on_policy_defaults() -> None:
    rl = make().spec.loop.rl
    assert (rl.mini_batches, rl.update_epochs, rl.micro_batch_size, rl.dynamic_sampling_max_rounds) == (1, 1, None, 3)
    spec = make().spec
    assert spec.loop.filter.include_truncated is False and spec.model.gradient_checkpointing is False
    assert spec.loop.rft.micro_batch_size is None


def test_builtin_tiny_needs_synthetic_train_set() -> None:
    msg = error(doc({"data": {"train": {"synthetic": None, "path": "train.jsonl"}}}))
    assert "model.base 'builtin:tiny'" in msg
    assert "data.train.synthetic" in msg and "set model.base to a real model" in msg


def test_builtin_tiny_needs_subset_sum_verifier() -> None:
    msg = error(doc({"verifier": {"name": "math"}}))
    assert "verifier.name 'subset_sum'" in msg


def test_real_model_with_file_data_is_fine() -> None:
    run = make(
        {"model": {"base": "s3://models/qwen"}, "data": {"train": {"synthetic": None, "path": "t.jsonl"}}}
    )
    assert run.spec.data.train.path == "t.jsonl"


def test_unknown_builtin_model() -> None:
    msg = error(doc({"model": {"base": "builtin:huge"}}))
    assert msg.startswith("spec.model.base:") and "'builtin:tiny'" in msg


def test_duplicate_eval_names() -> None:
    d = doc()
    d["spec"]["data"]["eval"].append({"name": "heldout", "synthetic": {"split": "heldout"}})
    msg = error(d)
    assert msg.startswith("spec.data.eval:")
    assert "['heldout']" in msg and "give each set its own name" in msg


def test_bad_eval_name() -> None:
    msg = error(doc({"data": {"eval": [{"name": "Held_Out", "synthetic": {}}]}}))
    assert msg.startswith("spec.data.eval.0.name:")
    assert "DNS label" in msg and "lowercase" in msg


def test_storage_uri_with_credentials() -> None:
    msg = error(doc({"storage": {"uri": "s3://AKIA:secret@minio:9000/bucket"}}))
    assert msg.startswith("spec.storage.uri:")
    assert "credentials" in msg and "storage.secretRef" in msg


def test_storage_uri_without_credentials_is_fine() -> None:
    assert make({"storage": {"uri": "s3://bucket/prefix"}}).spec.storage.uri == "s3://bucket/prefix"


@pytest.mark.parametrize("quantity", ["16GB", "lots", "1.5.2Gi"])
def test_bad_memory_quantity(quantity: str) -> None:
    msg = error(doc({"resources": {"rl": {"memory": quantity}}}))
    assert msg.startswith("spec.resources.rl.memory:")
    assert "not a Kubernetes quantity" in msg and "16Gi" in msg


@pytest.mark.parametrize("quantity", ["16Gi", "500m", "4", "1.5"])
def test_good_quantities(quantity: str) -> None:
    assert (
        make({"resources": {"default": {"cpu": quantity, "memory": quantity}}}).spec.resources.default.cpu
        == quantity
    )


@pytest.mark.parametrize("train", [{"path": "t.jsonl", "synthetic": {}}, {}], ids=["both", "neither"])
def test_dataset_needs_exactly_one_source(train: dict[str, Any]) -> None:
    d = doc()
    d["spec"]["data"]["train"] = train
    msg = error(d)
    assert "spec.data.train:" in msg
    assert "exactly one of `path`" in msg and "`synthetic`" in msg


def test_missing_model() -> None:
    d = doc()
    del d["spec"]["model"]
    assert error(d) == "spec.model: required field is missing"


def test_heads_must_divide_hidden_size() -> None:
    msg = error(doc({"model": {"tiny": {"hiddenSize": 130, "heads": 4}}}))
    assert msg.startswith("spec.model.tiny:") and "hiddenSize" in msg


def test_prompt_template_needs_placeholder() -> None:
    msg = error(doc({"data": {"promptTemplate": "Q: {question}"}}))
    assert msg.startswith("spec.data.promptTemplate:") and "{prompt}" in msg


def test_several_problems_are_reported_together() -> None:
    msg = error(doc({"loop": {"rl": {"clipLow": 2, "steps": 0}}, "storage": {"uri": "s3://a:b@h/x"}}))
    lines = msg.splitlines()
    assert any(line.startswith("spec.loop.rl.clipLow:") for line in lines)
    assert any(line.startswith("spec.loop.rl.steps:") for line in lines)
    assert any(line.startswith("spec.storage.uri:") for line in lines)


def test_not_a_mapping() -> None:
    with pytest.raises(SpecError, match="must be a mapping"):
        parse_run(["not", "a", "dict"])  # type: ignore[arg-type]


def test_parse_spec_prefixes_paths() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"base": "builtin:tiny"}, "data": {"train": {"synthetic": {}}}, "bogus": 1})
    assert str(info.value).startswith("spec.bogus: unknown field")


# ------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "patch",
    [
        {},
        {"loop": {"rl": {"algorithm": "dapo", "overlongBuffer": 2}, "pool": {"source": "checkpoints"}}},
        {
            "mode": "rl",
            "model": {"lora": {"r": 8}},
            "storage": {"uri": "s3://bucket/runs", "secretRef": {"name": "s3-creds"}},
            "resources": {
                "default": {"image": "rloop:dev", "memory": "8Gi", "nodeSelector": {"gpu": "h100"}},
                "rl": {
                    "gpus": 1,
                    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
            "queueName": "team-a",
        },
    ],
    ids=["minimal", "dapo-checkpoints", "rl-operator"],
)
def test_to_wire_round_trip(patch: dict[str, Any]) -> None:
    run = make(patch)
    wire = run.to_wire()
    again = parse_run(wire)
    assert again == run
    assert again.to_wire() == wire
    assert "clipHigh" in wire["spec"]["loop"]["rl"]  # resolved defaults are written out
    assert all("_" not in key for key in wire["spec"]["loop"]["rl"])  # camelCase on the wire


def test_spec_to_wire_round_trip() -> None:
    spec = make().spec
    assert parse_spec(spec.to_wire()) == spec


# ------------------------------------------------------------------------------------------- files
def test_load_run_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "apiVersion: rloop.dev/v1alpha1\nkind: RLoopRun\nmetadata:\n  name: demo\nspec:\n"
        "  model:\n    base: builtin:tiny\n  data:\n    train:\n      synthetic: {}\n"
    )
    expected = doc()
    expected["spec"]["data"] = {"train": {"synthetic": {}}}
    assert load_run(path) == parse_run(expected)


def test_load_run_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_run(tmp_path / "absent.yaml")


def test_load_run_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [unclosed\n  model: {\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_run(path)


def test_load_run_invalid_manifest(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: rloop.dev/v1alpha1\nkind: RLoopRun\nmetadata: {name: Demo}\nspec: {}\n")
    with pytest.raises(SpecError) as info:
        load_run(path)
    msg = str(info.value)
    assert "metadata.name:" in msg and "DNS label" in msg
    assert "spec.model: required field is missing" in msg
    assert "spec.data: required field is missing" in msg


def test_empty_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_run(path)
