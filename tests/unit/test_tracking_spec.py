"""spec.tracking: off by default, credentials refused with the fix named, mutable mid-run, in the CRD;
and the pure parts of rloop.tracking (global step, flattening, W&B ids)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from rloop.crd import immutable_paths
from rloop.plan import Stage
from rloop.spec import SpecError, immutable_changes, parse_run, parse_spec
from rloop.tracking import (
    NO_TRACKING,
    StageTracker,
    flatten,
    global_step,
    spec_params,
    split_summary,
    summary_step,
    wandb_run_id,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "model": {"base": "builtin:tiny"},
    "data": {"train": {"synthetic": {}}, "eval": [{"name": "heldout", "synthetic": {"split": "heldout"}}]},
}


def spec_with(tracking: dict):
    doc = copy.deepcopy(BASE)
    doc["tracking"] = tracking
    return parse_spec(doc)


def error_of(tracking: dict) -> str:
    with pytest.raises(SpecError) as e:
        spec_with(tracking)
    return str(e.value)


def test_every_tracker_is_off_by_default_and_opens_as_a_no_op():
    spec = parse_spec(copy.deepcopy(BASE))
    assert spec.tracking.mlflow is None and spec.tracking.tensorboard is None and spec.tracking.wandb is None
    assert spec.to_wire()["tracking"] == {}
    run = parse_run({"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "metadata": {"name": "x"},
                     "spec": copy.deepcopy(BASE)})
    tracker = StageTracker.open(run, Stage("rl", 0), "/tmp/nowhere/default/x")
    assert tracker.sinks == [] and NO_TRACKING.sinks == []


def test_sections_and_their_defaults():
    t = spec_with({"mlflow": {"uri": "http://mlflow.mlflow:5000"}, "tensorboard": {},
                   "wandb": {"project": "rl", "entity": "team"}}).tracking
    assert t.mlflow.experiment == "rloop" and t.mlflow.secret_ref is None
    assert t.tensorboard.enabled is True
    assert t.wandb.mode == "online" and t.wandb.entity == "team"
    assert spec_with({"tensorboard": {"enabled": False}}).tracking.tensorboard.enabled is False


@pytest.mark.parametrize("uri", ["http://alice:s3cret@mlflow:5000", "https://token@mlflow.example", "https://a:b@h/x"])
def test_a_credential_in_the_mlflow_uri_is_refused_naming_the_field_and_the_fix(uri):
    msg = error_of({"mlflow": {"uri": uri}})
    assert "spec.tracking.mlflow.uri" in msg and "must not embed credentials" in msg
    assert "tracking.mlflow.secretRef" in msg and "MLFLOW_TRACKING_USERNAME" in msg and "MLFLOW_TRACKING_PASSWORD" in msg
    assert "s3cret" not in msg and "token@" not in msg  # the value is never echoed


def test_a_token_in_the_mlflow_uri_query_is_refused():
    msg = error_of({"mlflow": {"uri": "https://mlflow.example/?token=abc"}})
    assert "spec.tracking.mlflow.uri" in msg and "query string" in msg and "abc" not in msg


@pytest.mark.parametrize(("tracker", "section", "key"), [
    ("wandb", {"project": "p", "apiKey": "x"}, "WANDB_API_KEY"),
    ("mlflow", {"uri": "http://m", "password": "x"}, "MLFLOW_TRACKING_PASSWORD"),
])
def test_a_credential_field_in_the_spec_says_where_it_goes_instead(tracker, section, key):
    msg = error_of({tracker: section})
    assert f"spec.tracking.{tracker}." in msg and "credentials never go in the spec" in msg
    assert f"tracking.{tracker}.secretRef" in msg and key in msg


def test_bad_values_are_named():
    assert "spec.tracking.wandb.mode" in error_of({"wandb": {"project": "p", "mode": "cloud"}})
    assert "spec.tracking.wandb.project" in error_of({"wandb": {}})
    assert "spec.tracking.mlflow.uri" in error_of({"mlflow": {"experiment": "e"}})
    assert "spec.tracking.mlflow.secretRef.name" in error_of({"mlflow": {"uri": "http://m", "secretRef": {"name": "Bad_Name"}}})
    assert "spec.tracking.neptune" in error_of({"neptune": {}})


def test_tracking_may_change_mid_run_and_the_crd_has_no_rule_against_it():
    before = parse_spec(copy.deepcopy(BASE))
    after = spec_with({"mlflow": {"uri": "http://m:5000"}, "tensorboard": {}})
    assert immutable_changes(before, after) == []
    assert not any(p == "tracking" or p.startswith("tracking.") for p in immutable_paths())


def test_the_generated_crd_has_the_tracking_schema():
    crd = yaml.safe_load((ROOT / "crds/rlooprun.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    tracking = spec["properties"]["tracking"]["properties"]
    assert set(tracking) == {"mlflow", "tensorboard", "wandb"}
    assert tracking["mlflow"]["required"] == ["uri"] and tracking["wandb"]["required"] == ["project"]
    assert tracking["wandb"]["properties"]["mode"]["enum"] == ["online", "offline"]
    assert set(tracking["mlflow"]["properties"]) == {"uri", "experiment", "secretRef"}


def test_global_step_is_monotonic_over_iterations():
    assert [global_step(60, k, s) for k in (0, 1) for s in (0, 59)] == [0, 59, 60, 119]
    assert global_step(60, None, 3) == 3
    assert summary_step(60, None) == 0 and summary_step(60, 0) == 60 and summary_step(60, 2) == 180


def test_summaries_flatten_into_numbers_and_texts():
    values, texts = split_summary({"avg_at_n": 0.25, "pass_at_k": {"1": 0.2, "4": 0.5}, "policy": "iter-000/rft/policy",
                                   "forgetting_rate": None, "nll": float("nan"), "steps": 4})
    assert values == {"summary/avg_at_n": 0.25, "summary/pass_at_k/1": 0.2, "summary/pass_at_k/4": 0.5,
                      "summary/steps": 4.0}
    assert texts == {"summary/policy": "iter-000/rft/policy"}
    assert flatten({"a": {"b": {"c": 1}}, "d": [1, 2]}) == {"a.b.c": 1, "d": [1, 2]}


def test_params_are_the_flattened_resolved_spec():
    run = parse_run({"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "metadata": {"name": "x"},
                     "spec": copy.deepcopy(BASE)})
    params = spec_params(run)
    assert params["loop.rl.steps"] == str(run.spec.loop.rl.steps)
    assert params["loop.eval.kList"] == "[1, 4, 8, 16]"
    assert params["model.base"] == "builtin:tiny"
    assert all(len(v) <= 6000 for v in params.values())


def test_wandb_ids_are_deterministic_valid_and_distinct():
    run = parse_run({"apiVersion": "rloop.dev/v1alpha1", "kind": "RLoopRun", "metadata": {"name": "tiny"},
                     "spec": copy.deepcopy(BASE)})
    a = wandb_run_id(run, "s3://b/runs/default/tiny", Stage("eval", 1, "heldout"))
    assert a == wandb_run_id(run, "s3://b/runs/default/tiny", Stage("eval", 1, "heldout"))
    assert a.startswith("tiny-iter-001-eval-heldout-")
    assert a != wandb_run_id(run, "s3://other/default/tiny", Stage("eval", 1, "heldout"))
    assert a != wandb_run_id(run, "s3://b/runs/default/tiny", Stage("rl", 1))
    long = wandb_run_id(run, "x", Stage("eval", 1, "a" * 63))
    assert len(long) <= 64 and all(c.isalnum() or c in "-_" for c in long)
