"""The CRD's CEL transition rules block exactly the edits the stages would refuse (issue 9, item 6).

The rules are evaluated with cel-python, as the API server evaluates them on an update (`self` is the
new spec, `oldSelf` the stored one). Every leaf of a fully resolved spec is edited in turn: the rules
must reject the edit exactly when `rloop.spec.immutable_wire_changes` (what a stage checks against the
store's spec.json) reports it, so the cluster and the stages never disagree about what may change.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import pytest

from rloop.crd import build_crd, immutable_paths
from rloop.manifests import load_run
from rloop.spec import MUTABLE_FIELDS, immutable_wire_changes

ROOT = Path(__file__).resolve().parents[2]


def _spec_rules() -> list[tuple[Any, str]]:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    env = celpy.Environment()
    return [(env.program(env.compile(r["rule"])), r["message"]) for r in schema["x-kubernetes-validations"]]


RULES = _spec_rules()


def rejected(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Messages of the rules an update from `old` to `new` fails."""
    bound = {"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}
    out = []
    for program, message in RULES:
        result = program.evaluate(bound)
        assert isinstance(result, celpy.celtypes.BoolType), f"{message}: rule errored: {result}"
        if not result:
            out.append(message)
    return out


def _leaves(doc: Any, path: str = "") -> list[str]:
    if isinstance(doc, dict):
        return [leaf for k, v in doc.items() for leaf in _leaves(v, f"{path}.{k}" if path else k)]
    return [path]


def _edit(doc: dict[str, Any], path: str) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = new
    for key in parents:
        node = node[key]
    value = node[last]
    if isinstance(value, bool):
        node[last] = not value
    elif isinstance(value, int | float):
        node[last] = value + 1
    elif isinstance(value, str):
        node[last] = value + "x"
    elif isinstance(value, list):
        node[last] = [*value, value[-1]] if value else [{"name": "extra"}]
    else:
        node[last] = "set"
    return new


def _mutable(path: str) -> bool:
    return any(path == m or path.startswith(m + ".") for m in MUTABLE_FIELDS)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """A spec with every section present (defaults resolved), plus the mutable sections set."""
    spec = load_run(ROOT / "examples" / "gsm8k-smollm2.yaml").spec.to_wire()
    spec.setdefault("storage", {})["secretRef"] = {"name": "store-creds"}
    spec["storage"]["uri"] = "s3://bucket/runs"
    spec["queueName"] = "team-a"
    spec.setdefault("resources", {}).setdefault("default", {})["gpus"] = 1
    return spec


def test_the_rules_accept_an_unchanged_spec(resolved: dict[str, Any]) -> None:
    assert rejected(resolved, copy.deepcopy(resolved)) == []


def test_every_leaf_edit_is_rejected_exactly_when_the_stages_would_refuse_it(resolved: dict[str, Any]) -> None:
    leaves = _leaves(resolved)
    assert len(leaves) > 60, "the resolved spec should reach into every section"
    checked_mutable = checked_immutable = 0
    for path in leaves:
        new = _edit(resolved, path)
        stage_refuses = immutable_wire_changes(resolved, new) != []
        cluster_refuses = rejected(resolved, new) != []
        assert stage_refuses == (not _mutable(path)), path
        assert cluster_refuses == stage_refuses, f"{path}: CEL {cluster_refuses}, stages {stage_refuses}"
        checked_mutable += _mutable(path)
        checked_immutable += not _mutable(path)
    assert checked_mutable >= 5 and checked_immutable >= 50


@pytest.mark.parametrize("path", [p for p in immutable_paths() if p != "mode"])
def test_adding_or_removing_an_immutable_section_is_rejected(resolved: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    without = copy.deepcopy(resolved)
    node = without
    for key in parents:
        node = node[key]
    node.pop(last, None)
    message = f"spec.{path} is immutable"
    assert any(m.startswith(message) for m in rejected(resolved, without)), "removing it"
    assert any(m.startswith(message) for m in rejected(without, resolved)), "adding it"


def test_the_edit_named_in_the_issue_is_rejected_and_its_revert_accepted(resolved: dict[str, Any]) -> None:
    edited = copy.deepcopy(resolved)
    edited["verifier"]["name"] = "subset_sum"
    assert rejected(resolved, edited) == [
        "spec.verifier is immutable once the run exists (the store holds results made with the old "
        "value); revert the edit, or create a new RLoopRun with another metadata.name"
    ]
    assert rejected(resolved, copy.deepcopy(resolved)) == []


def test_mode_unset_means_rloop(resolved: dict[str, Any]) -> None:
    unset = {k: v for k, v in resolved.items() if k != "mode"}
    assert rejected({**unset, "mode": "rloop"}, unset) == []
    assert rejected(unset, {**unset, "mode": "rloop"}) == []
    assert rejected(unset, {**unset, "mode": "rl"}) != []
    assert rejected({**unset, "mode": "rl"}, {**unset, "mode": "rloop"}) != []


def test_growing_iterations_and_changing_resources_are_accepted(resolved: dict[str, Any]) -> None:
    new = copy.deepcopy(resolved)
    new["loop"]["iterations"] += 2
    new["resources"]["default"]["gpus"] = 8
    new["retry"] = {"limit": 10}
    new["suspend"] = True
    assert rejected(resolved, new) == []
