"""How a stage gets its run's manifest on Kubernetes: a file (the operator's downward-API volume) whose
sha256 the pod's env pins; the 0.1 operator's RLOOP_RUN_MANIFEST env variable is still read."""

from __future__ import annotations

import hashlib
import json

import pytest

from rloop.spec import parse_run
from rloop.stages.common import InputError, _snapshot_spec_from_env
from rloop.store import RunStore
from tests.helpers import small_doc


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(str(tmp_path / "store"), "team", "demo")


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    """Write `doc` where the operator's volume would, with its digest in the env as the Job sets it."""

    def write(doc: dict, *, digest_of: dict | None = None) -> None:
        path = tmp_path / "manifest.json"
        path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
        pinned = json.dumps(digest_of or doc, sort_keys=True, separators=(",", ":"))
        monkeypatch.setenv("RLOOP_RUN_MANIFEST_FILE", str(path))
        monkeypatch.setenv("RLOOP_RUN_MANIFEST_SHA256", hashlib.sha256(pinned.encode()).hexdigest())

    monkeypatch.delenv("RLOOP_RUN_MANIFEST", raising=False)
    return write


def _doc(**spec) -> dict:
    doc = small_doc("demo", iterations=1)
    doc["metadata"]["namespace"] = "team"
    doc["spec"].update(spec)
    return doc


def test_the_first_stage_snapshots_the_file_and_later_ones_check_it(store, manifest) -> None:
    doc = _doc()
    manifest(doc)
    _snapshot_spec_from_env(store)
    assert parse_run(store.read_spec()) == parse_run(doc)
    manifest(_doc(mode="rl"))
    with pytest.raises(InputError, match=r"spec\.mode differs from the spec that made the results"):
        _snapshot_spec_from_env(store)


def test_a_file_that_is_not_the_one_the_operator_made_is_refused(store, manifest) -> None:
    """Pod annotations (so the projected file) can be edited after the Job was made; its env cannot."""
    manifest(_doc(mode="rl"), digest_of=_doc())
    with pytest.raises(InputError, match="its sha256 differs from RLOOP_RUN_MANIFEST_SHA256"):
        _snapshot_spec_from_env(store)
    assert not store.exists("spec.json")


def test_an_unreadable_or_oversized_file_is_invalid_input(store, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUN_MANIFEST_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(InputError, match="RLOOP_RUN_MANIFEST_FILE=.*missing.json: cannot be read"):
        _snapshot_spec_from_env(store)
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (2 << 20))
    monkeypatch.setenv("RLOOP_RUN_MANIFEST_FILE", str(huge))
    with pytest.raises(InputError, match="larger than"):
        _snapshot_spec_from_env(store)


def test_the_old_operators_env_variable_is_still_read(store, monkeypatch) -> None:
    monkeypatch.delenv("RLOOP_RUN_MANIFEST_FILE", raising=False)
    doc = _doc()
    monkeypatch.setenv("RLOOP_RUN_MANIFEST", json.dumps(doc))
    _snapshot_spec_from_env(store)
    assert parse_run(store.read_spec()) == parse_run(doc)


def test_without_either_the_stage_uses_the_snapshot_rloop_run_wrote(store, monkeypatch) -> None:
    for name in ("RLOOP_RUN_MANIFEST_FILE", "RLOOP_RUN_MANIFEST"):
        monkeypatch.delenv(name, raising=False)
    _snapshot_spec_from_env(store)
    assert not store.exists("spec.json")
