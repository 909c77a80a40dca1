"""The RLoopRun model: algorithm defaults, error messages that name the field and the fix, round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rloop.manifests import load_run
from rloop.spec import RLoopRun, SpecError, parse_run, parse_spec
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
    assert msg.startswith("spec.loop.rl.overlongBuffer:")
    assert "overlongBuffer (16)" in msg and "maxResponseTokens (16)" in msg
    assert "overlongBuffer: 4" in msg


def test_float16_is_rejected_with_the_fix() -> None:
    msg = error(doc({"model": {"dtype": "float16"}}))
    assert msg.startswith("spec.model.dtype:")
    assert "loss scaling" in msg and "'bfloat16'" in msg


def test_mini_batches_beyond_the_responses_per_step() -> None:
    msg = error(doc({"loop": {"rl": {"promptsPerStep": 2, "samplesPerPrompt": 2, "miniBatches": 8}}}))
    assert msg.startswith("spec.loop.rl.miniBatches:") and "miniBatches (8)" in msg and "= 4" in msg


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


def _real_model_doc(**spec: Any) -> dict[str, Any]:
    base = {"model": {"base": "/models/x"}, "verifier": {"name": "math"},
            "data": {"train": {"path": "/data/train.jsonl"}}}
    return {"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "metadata": {"name": "demo"},
            "spec": deep_merge(base, spec)}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"storage": {"uri": "s3://AKIAEXAMPLE:wJalr/XUtnFEMI/K7MDENG@bucket/runs"}}, "spec.storage.uri"),
        ({"model": {"base": "s3://AKIAEXAMPLE:wJalr@models/smollm2"}}, "spec.model.base"),
        ({"data": {"eval": [{"name": "heldout", "path": "https://user:wJalr@example.com/test.jsonl"}]}},
         "spec.data.eval.0.path"),
    ],
)
def test_credentials_are_rejected_in_every_uri_field_and_never_echoed(spec, field) -> None:
    """A secret key may hold '/', which defeated the old check (it stopped at the first '/')."""
    msg = error(_real_model_doc(**spec))
    assert msg.startswith(f"{field}:") and "must not embed credentials" in msg and "\n" not in msg
    assert "wJalr" not in msg


def test_an_s3_uri_with_host_and_port_names_the_endpoint_variable() -> None:
    msg = error(doc({"storage": {"uri": "s3://minio:9000/bucket"}}))
    assert msg.startswith("spec.storage.uri:") and "AWS_ENDPOINT_URL" in msg


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
    assert msg.startswith("spec.model.tiny.heads:") and "hiddenSize" in msg


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
    with pytest.raises(SpecError, match="the file is empty"):
        load_run(path)


# ----------------------------------------------------------------------- strict, like the API server
def test_python_code_still_builds_models_by_field_name() -> None:
    from rloop.spec import FilterSpec, RLSpec, TinyModel

    assert RLSpec(prompts_per_step=4, samples_per_prompt=2).prompts_per_step == 4
    assert TinyModel(hidden_size=32, layers=2, heads=2).hidden_size == 32
    assert FilterSpec(max_pass_rate=1).max_pass_rate == 1.0  # an int where a float goes


def test_manifests_are_read_by_camel_case_name_only() -> None:
    msg = error(doc({"loop": {"rl": {"prompts_per_step": 4}}}))
    assert msg.startswith("spec.loop.rl.prompts_per_step: unknown field")
    assert "write promptsPerStep" in msg


def test_a_typo_gets_a_suggestion() -> None:
    assert "did you mean samplesPerPrompt?" in error(doc({"loop": {"rl": {"samplesPerPromt": 4}}}))


@pytest.mark.parametrize(
    "patch, field, hint",
    [
        ({"loop": {"rl": {"lr": "3e-4"}}}, "spec.loop.rl.lr", "without quotes"),
        ({"loop": {"rl": {"steps": "4"}}}, "spec.loop.rl.steps", "without quotes"),
        ({"suspend": "yes"}, "spec.suspend", "true or false"),
        ({"loop": {"eval": {"evalBase": 0}}}, "spec.loop.eval.evalBase", "true or false"),
        ({"loop": {"iterations": 2.0}}, "spec.loop.iterations", "not a whole number"),
        ({"queueName": 7}, "spec.queueName", "quote it"),
        ({"loop": {"rl": {"seed": 2**63}}}, "spec.loop.rl.seed", "64-bit"),
        ({"loop": {"rl": {"lr": float("nan")}}}, "spec.loop.rl.lr", "finite"),
    ],
)
def test_strict_types(patch: dict[str, Any], field: str, hint: str) -> None:
    msg = error(doc(patch))
    assert msg.startswith(f"{field}:") and hint in msg


def test_a_float_field_takes_an_int() -> None:
    assert make({"loop": {"rl": {"lr": 1, "temperature": 2}}}).spec.loop.rl.lr == 1.0


def test_int64_bounds() -> None:
    tol = {"key": "k", "operator": "Exists", "effect": "NoExecute"}
    ok = make({"resources": {"default": {"tolerations": [tol | {"tolerationSeconds": 2**63 - 1}]}}})
    assert ok.spec.resources.default.tolerations[0].toleration_seconds == 2**63 - 1
    msg = error(doc({"resources": {"default": {"tolerations": [tol | {"tolerationSeconds": -(2**63) - 1}]}}}))
    assert "tolerations.0.tolerationSeconds" in msg


@pytest.mark.parametrize(
    "template, ok",
    [("Q: {prompt}\nA:", True), ("{{json}} {prompt}", True), ("{prompt} }", False), ("{question} {prompt}", False),
     ("{prompt!r}", False), ("{prompt:>999999999}", False), ("{{prompt}}", False), ("{prompt} {0}", False)],
)
def test_prompt_template_placeholders(template: str, ok: bool) -> None:
    if ok:
        assert make({"data": {"promptTemplate": template}}).spec.data.prompt_template.format(prompt="p")
    else:
        assert error(doc({"data": {"promptTemplate": template}})).startswith("spec.data.promptTemplate:")


def test_clip_high_below_clip_low() -> None:
    msg = error(doc({"loop": {"rl": {"clipLow": 0.2, "clipHigh": 0.1}}}))
    assert msg.startswith("spec.loop.rl.clipHigh:") and "clipLow (0.2)" in msg and ">= 0.2" in msg
    assert make({"loop": {"rl": {"clipLow": 0.2, "clipHigh": 0.2}}}).spec.loop.rl.clip_high == 0.2


@pytest.mark.parametrize("k_list, field", [([0, 1], "kList.0"), ([1, -4], "kList.1"), ([1, 2, 2], "kList:")])
def test_k_list_entries(k_list: list[int], field: str) -> None:
    assert f"spec.loop.eval.{field}" in error(doc({"loop": {"eval": {"kList": k_list}}}))


def test_kubernetes_names_are_checked() -> None:
    assert error(doc({"storage": {"secretRef": {"name": "S3_Creds"}}})).startswith("spec.storage.secretRef.name:")
    assert error(doc({"queueName": "a" * 64})).startswith("spec.queueName:")
    msg = error(doc({"resources": {"rl": {"nodeSelector": {"example.com/gpu": "a b"}}}}))
    assert msg.startswith("spec.resources.rl.nodeSelector:") and "nodeSelector value" in msg
    assert error(doc({"resources": {"rl": {"image": "rloop trainer"}}})).startswith("spec.resources.rl.image:")


@pytest.mark.parametrize(
    "image",
    ["rloop/trainer:0.1.0", "localhost:5000/a/b", "ghcr.io/org/x:v1", "busybox", "r.example.com/a@sha256:" + "0" * 64,
     "[::1]:5000/a:latest", "Registry.Example.com/team/img:TAG"],
)
def test_good_images(image: str) -> None:
    assert make({"resources": {"default": {"image": image}}}).spec.resources.default.image == image


def test_many_problems_are_capped() -> None:
    from rloop.spec import MAX_PROBLEMS

    msg = error(doc({"loop": {"rl": {f"bogus{i}": 1 for i in range(50)}}}))
    lines = msg.splitlines()
    assert len(lines) == MAX_PROBLEMS + 1 and lines[-1] == f"... and {50 - MAX_PROBLEMS} more problems"


def test_messages_are_printable_single_lines() -> None:
    from rloop.spec import clean_line

    assert clean_line("a\x1b[31mred\x00\u202eevil\nnext\tline") == "a [31mred evil next line"
    assert len(clean_line("x" * 1000, 50)) == 50
    msg = error(doc({"loop": {"rl": {"bad\x1b]0;pwned\x07key": 1}}}))
    assert "\x1b" not in msg and "\x07" not in msg


# -------------------------------------------------------------------------------------- YAML reading
@pytest.mark.parametrize(
    "text, value",
    [("3e-4", 3e-4), ("1e3", 1000.0), ("1.5", 1.5), (".5", 0.5), ("010", 8), ("0x10", 16), ("1_000", 1000),
     ("2024-01-01", "2024-01-01"), ("1:30", "1:30"), ("yes", True), ("~", None), ("'3e-4'", "3e-4")],
)
def test_scalars_resolve_as_kubectl_reads_them(text: str, value: Any) -> None:
    from rloop.manifests import load_yaml

    assert load_yaml(f"a: {text}\n") == {"a": value}


def test_unquoted_exponent_numbers_are_numbers_in_a_manifest(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "metadata: {name: demo}\nspec:\n  model: {base: 'builtin:tiny'}\n  data: {train: {synthetic: {}}}\n"
        "  loop: {rl: {lr: 3e-4}}\n"
    )
    assert load_run(path).spec.loop.rl.lr == 3e-4


@pytest.mark.parametrize(
    "text, problem",
    [("a: &x 1\nb: *x\n", "alias *x"), ("a: 1\na: 2\n", "repeats the key 'a'"), ("a: 1\n---\nb: 2\n", "more than one"),
     ("? [a]\n: 1\n", "key that is a list"), ("a: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32"),
     ("a: !!python/name:os.system\n", "could not determine a constructor")],
)
def test_yaml_traps_are_refused(text: str, problem: str) -> None:
    from rloop.manifests import load_yaml

    with pytest.raises(SpecError, match="^<manifest>: ") as info:
        load_yaml(text)
    assert problem in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ warnings
def test_settings_the_mode_ignores_are_warned_about() -> None:
    from rloop.spec import spec_warnings

    spec = make({"mode": "rl", "loop": {"rft": {"epochs": 3}, "filter": {"dedup": False}}}).spec
    assert [w.split(":")[0] for w in spec_warnings(spec)] == ["spec.loop.filter", "spec.loop.rft"]
    assert spec_warnings(make().spec) == [] and spec_warnings(make({"mode": "rl"}).spec) == []
    pool = make({"loop": {"pool": {"checkpointEvery": 5}}}).spec
    assert spec_warnings(pool) == ["spec.loop.pool.checkpointEvery: ignored unless loop.pool.source is checkpoints"]


def test_shipped_examples_give_no_warnings() -> None:
    from rloop.spec import spec_warnings

    for path in sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")):
        assert spec_warnings(load_run(path).spec) == [], path.name


def test_validate_prints_warnings_and_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from rloop.cli import main

    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(doc({"mode": "rl", "loop": {"rft": {"epochs": 3}}})))
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "rloop: warning: spec.loop.rft: ignored in mode rl (only the rl and eval stages run); remove it, "
        "or set mode: rloop\n"
    )
    assert '"mode": "rl"' in captured.out


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"data": {"eval": [{"name": "heldout\n", "synthetic": {}}]}}, "spec.data.eval.0.name"),
        ({"resources": {"rl": {"memory": "16Gi\n"}}}, "spec.resources.rl.memory"),
        ({"storage": {"secretRef": {"name": "s3\n"}}}, "spec.storage.secretRef.name"),
    ],
)
def test_a_trailing_newline_is_not_part_of_a_name(patch: dict[str, Any], field: str) -> None:
    assert error(doc(patch)).startswith(f"{field}:")


# ----------------------------------------------------------------------------------- distributed
def test_distributed_defaults_and_nodes_on_training_stages() -> None:
    run = parse_run(_real_model_doc(resources={"rl": {"gpus": 8, "nodes": 2}, "rft": {"nodes": 4}}))
    assert run.spec.loop.distributed.zero_stage == 2 and run.spec.loop.distributed.timeout_seconds == 900
    assert (run.spec.resources.rl.nodes, run.spec.resources.rft.nodes) == (2, 4)


@pytest.mark.parametrize("kind", ["default", "eval", "rollout", "init", "verify"])
def test_nodes_only_on_rl_and_rft(kind) -> None:
    msg = error(_real_model_doc(resources={kind: {"nodes": 2}}))
    assert msg.startswith(f"spec.resources.{kind}.nodes:") and "resources.rl.nodes" in msg


@pytest.mark.parametrize(("distributed", "field", "fix"), [
    ({"zeroStage": 2, "offloadParams": True}, "offloadParams", "zeroStage: 3"),
    ({"zeroStage": 0, "offloadOptimizer": True}, "offloadOptimizer", "zeroStage: 2"),
    ({"zeroStage": 4}, "zeroStage", "3"),
])
def test_bad_distributed_settings_name_the_field(distributed, field, fix) -> None:
    msg = error(_real_model_doc(loop={"distributed": distributed}))
    assert msg.startswith(f"spec.loop.distributed.{field}:") and fix in msg


def test_lora_with_zero3_is_refused_with_the_fix() -> None:
    msg = error(_real_model_doc(model={"base": "/models/x", "lora": {"r": 8}}, loop={"distributed": {"zeroStage": 3}}))
    assert msg.startswith("spec.loop.distributed.zeroStage:") and "zeroStage 2" in msg
