"""Transient store faults lose nothing: retried inside the stage, never taken for corruption; a stage
that already committed is left alone. A flaky filesystem stands in for a remote store here; the real
SeaweedFS outage test is tests/integration/test_store_faults.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from rloop.contracts import EXIT_CORRUPT_INPUT, EXIT_OK, EXIT_STORE_UNAVAILABLE, STORE_RETRY_ENV
from rloop.plan import Stage
from rloop.stages import run_stage
from rloop.stages.common import StageContext
from rloop.store import MANIFEST, CorruptArtifact, RunStore, StoreUnavailable
from tests.helpers import TINY

pytestmark = pytest.mark.faults


class FlakyFS:
    """A local filesystem that fails the first `failures` calls of the named methods: with
    ConnectionError (a store that does not answer) or FileNotFoundError (an object store's passing 404)."""

    def __init__(self, fs, methods: tuple[str, ...], failures: int, error: type[Exception] = ConnectionError):
        self._fs, self._methods, self.failures, self._error, self.calls = fs, methods, failures, error, 0

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in self._methods:
            return attr

        def flaky(*args, **kwargs):
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise self._error(f"simulated {self._error.__name__} in {name}")
            return attr(*args, **kwargs)

        return flaky


@pytest.fixture
def run_store(tmp_path: Path, monkeypatch) -> RunStore:
    monkeypatch.setenv(STORE_RETRY_ENV, "6")
    store = RunStore(str(tmp_path / "runs"), "default", "tiny")
    doc = yaml.safe_load(TINY.read_text())
    store.write_spec(doc)
    with store.stage_writer("iter-000/rl") as w:
        w.put_bytes("pool/trajectories.parquet", b"PAR1" + b"x" * 64)
        w.put_bytes("metrics.jsonl", b'{"step": 0}\n')
        w.commit({"steps": 1})
    return store


def _remote(store: RunStore, methods: tuple[str, ...], failures: int, error=ConnectionError) -> FlakyFS:
    """Make `store` behave as a remote store (retries on) over a flaky view of its files."""
    store.fs = FlakyFS(store.fs, methods, failures, error)
    return store.fs


def test_transient_errors_while_validating_an_input_are_retried_and_invalidate_nothing(run_store):
    ctx = StageContext.open(run_store.uri, Stage("verify", 0))
    flaky = _remote(ctx.store, ("size", "open"), failures=3)
    m = ctx.input_manifest("iter-000/rl")
    assert m.summary == {"steps": 1} and flaky.calls > 3
    assert Path(run_store.path(f"iter-000/rl/{MANIFEST}")).exists()


def test_a_passing_404_for_a_listed_file_is_not_corruption(run_store):
    """Before: one FileNotFoundError while validating moved the producer's good manifest aside."""
    ctx = StageContext.open(run_store.uri, Stage("verify", 0))
    flaky = _remote(ctx.store, ("size",), failures=2, error=FileNotFoundError)
    assert ctx.input_manifest("iter-000/rl").summary == {"steps": 1}
    assert Path(run_store.path(f"iter-000/rl/{MANIFEST}")).exists()
    assert not Path(run_store.path(f"iter-000/rl/{MANIFEST}.corrupt")).exists()
    assert flaky.failures == 0  # both 404s were seen and looked past


def test_a_store_down_for_the_whole_window_exits_unavailable_and_keeps_every_manifest(run_store, monkeypatch):
    monkeypatch.setenv(STORE_RETRY_ENV, "2")
    ctx = StageContext.open(run_store.uri, Stage("verify", 0))
    _remote(ctx.store, ("size", "open", "exists"), failures=10**6)
    with pytest.raises(StoreUnavailable, match=f"still failing after 2s of retries; {STORE_RETRY_ENV}"):
        ctx.input_manifest("iter-000/rl")
    assert Path(run_store.path(f"iter-000/rl/{MANIFEST}")).exists()


def test_stage_exit_code_for_an_unavailable_store(run_store, monkeypatch):
    monkeypatch.setenv(STORE_RETRY_ENV, "1")
    real_open = StageContext.open

    def open_then_break(uri, stage):
        ctx = real_open(uri, stage)
        _remote(ctx.store, ("size", "open", "exists", "glob"), failures=10**6)
        return ctx

    monkeypatch.setattr(StageContext, "open", staticmethod(open_then_break))
    assert run_stage(run_store.uri, Stage("verify", 0)) == EXIT_STORE_UNAVAILABLE
    assert Path(run_store.path(f"iter-000/rl/{MANIFEST}")).exists()


def test_proven_corruption_is_still_invalidated(run_store):
    Path(run_store.path("iter-000/rl/metrics.jsonl")).write_bytes(b'{"step": 9}\n')  # same size, other bytes
    assert run_stage(run_store.uri, Stage("verify", 0)) == EXIT_CORRUPT_INPUT
    assert Path(run_store.path(f"iter-000/rl/{MANIFEST}.corrupt")).exists()
    with pytest.raises(CorruptArtifact):
        run_store.validate("iter-000/rl")


def test_a_committed_stage_exits_0_without_touching_its_output(run_store, tmp_path, monkeypatch):
    """A re-run of a committed stage (its Job was deleted, a runner restarted) must not wipe and redo it:
    later stages may already have consumed its output."""
    with run_store.stage_writer("iter-000/verify") as w:
        w.put_bytes("expert.parquet", b"PAR1experts")
        w.put_json("stats.json", {"expert_trajectories": 1})
        before = w.commit({"expert_trajectories": 1})
    message = tmp_path / "termination-log"
    monkeypatch.setenv("RLOOP_TERMINATION_LOG", str(message))
    # the pool is not even a parquet file: running the stage for real would fail
    assert run_stage(run_store.uri, Stage("verify", 0)) == EXIT_OK
    assert run_store.validate("iter-000/verify") == before
    reported = json.loads(message.read_text())
    digest = hashlib.sha256(before.to_json().encode()).hexdigest()
    assert reported == {"stage": "iter-000/verify", "expert_trajectories": 1, "already_committed": True,
                        "manifest_sha256": digest}
