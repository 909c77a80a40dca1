"""Tests for rloop.store on a local directory: commit manifests, validation, the writer, reading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rloop.store import MANIFEST, CorruptArtifact, Manifest, RunStore, StoreError, open_fs


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(str(tmp_path / "runs"), "default", "r1")


def _commit(store: RunStore, stage_id: str, files: dict[str, bytes], summary: dict | None = None) -> Manifest:
    with store.stage_writer(stage_id) as w:
        for rel, data in files.items():
            w.put_bytes(rel, data)
        return w.commit(summary)


def _file(store: RunStore, stage_id: str, rel: str) -> Path:
    return Path(store.path(f"{stage_id}/{rel}"))


# --------------------------------------------------------------------------- manifests


def test_commit_writes_a_manifest_that_round_trips(store):
    m = _commit(
        store, "iter-000/verify", {"stats.json": b'{"n": 3}', "expert.parquet": b"PAR1xx"}, {"kept": 3}
    )
    assert _file(store, "iter-000/verify", MANIFEST).exists()

    read = store.read_manifest("iter-000/verify")
    assert read == m
    assert read.stage == "iter-000/verify"
    assert read.summary == {"kept": 3}
    assert [f.path for f in read.files] == ["expert.parquet", "stats.json"]  # sorted
    stats = next(f for f in read.files if f.path == "stats.json")
    assert stats.size == len(b'{"n": 3}')
    assert stats.sha256 == hashlib.sha256(b'{"n": 3}').hexdigest()
    assert Manifest.from_json(m.to_json(), "x") == m
    assert store.validate("iter-000/verify", deep=True) == m


def test_committed_lists_only_committed_stages(store):
    _commit(store, "base/init", {"policy/weights.bin": b"w" * 100})
    _commit(store, "base/eval/test", {"metrics.json": b"{}"})
    # a stage that wrote files but crashed before its manifest
    with store.stage_writer("iter-000/rl") as w:
        w.put_bytes("metrics.jsonl", b'{"step": 1}\n')
    assert _file(store, "iter-000/rl", "metrics.jsonl").exists()

    assert store.committed() == {"base/init", "base/eval/test"}
    assert store.committed(["base/init", "iter-000/rl"]) == {"base/init"}
    assert not store.is_committed("iter-000/rl")
    with pytest.raises(CorruptArtifact, match="has not committed"):
        store.validate("iter-000/rl")


def test_committed_on_a_fresh_run_is_empty(store):
    assert store.committed() == set()
    assert not store.is_committed("base/init")


def test_truncated_file_is_not_committed(store):
    _commit(store, "iter-000/rft", {"policy/model.bin": b"0123456789" * 10})
    p = _file(store, "iter-000/rft", "policy/model.bin")
    p.write_bytes(p.read_bytes()[:50])

    assert not store.is_committed("iter-000/rft")
    assert store.committed() == set()
    with pytest.raises(CorruptArtifact, match=r"policy/model\.bin: size 50 != 100"):
        store.validate("iter-000/rft", deep=False)


def test_missing_listed_file_is_not_committed(store):
    _commit(store, "iter-000/rft", {"policy/model.bin": b"abc", "policy/config.json": b"{}"})
    _file(store, "iter-000/rft", "policy/config.json").unlink()
    assert not store.is_committed("iter-000/rft")
    with pytest.raises(CorruptArtifact, match=r"policy/config\.json: listed in _COMMIT\.json but missing"):
        store.validate("iter-000/rft")


def test_flipped_byte_same_size_is_caught_only_by_deep_validation(store):
    _commit(store, "iter-000/verify", {"expert.parquet": b"PAR1" + bytes(range(64)), "stats.json": b"{}"})
    p = _file(store, "iter-000/verify", "expert.parquet")
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))

    assert store.is_committed("iter-000/verify", deep=False)  # sizes still match
    assert not store.is_committed("iter-000/verify", deep=True)
    with pytest.raises(CorruptArtifact, match=r"iter-000/verify/expert\.parquet: sha256 mismatch") as exc:
        store.validate("iter-000/verify", deep=True)
    assert "stats.json" not in str(exc.value)
    # readers validate deeply by default
    with pytest.raises(CorruptArtifact, match="expert.parquet"):
        store.read_verified("iter-000/verify", "stats.json")


def test_manifest_for_another_stage_is_rejected(store):
    _commit(store, "iter-000/verify", {"stats.json": b"{}"})
    # copy the verify manifest into the rft stage, as a misplaced/forged commit
    text = _file(store, "iter-000/verify", MANIFEST).read_text()
    store.write_text(f"iter-000/rft/{MANIFEST}", text)

    assert not store.is_committed("iter-000/rft")
    assert store.committed() == {"iter-000/verify"}
    with pytest.raises(CorruptArtifact, match=r"manifest is for stage 'iter-000/verify', not 'iter-000/rft'"):
        store.read_manifest("iter-000/rft")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json {",
        "[]",
        '{"stage": "base/init"}',
        '{"stage": "base/init", "version": 1, "files": [{"path": 1}]}',
    ],
)
def test_garbage_manifest_is_corrupt(store, text):
    store.write_text(f"base/init/{MANIFEST}", text)
    with pytest.raises(CorruptArtifact, match="unreadable commit manifest"):
        store.read_manifest("base/init")
    assert not store.is_committed("base/init")
    assert store.committed() == set()


# --------------------------------------------------------------------------- writing


def test_stage_writer_wipes_a_previous_partial_attempt(store):
    with store.stage_writer("iter-000/rl") as w:
        w.put_bytes("checkpoints/step-1/model.bin", b"old")
        w.put_bytes("stale.txt", b"leftover")
    assert _file(store, "iter-000/rl", "stale.txt").exists()

    with store.stage_writer("iter-000/rl") as w:
        assert not Path(store.path("iter-000/rl")).exists()
        w.put_bytes("final/model.bin", b"new")
        m = w.commit()

    assert not _file(store, "iter-000/rl", "stale.txt").exists()
    assert not _file(store, "iter-000/rl", "checkpoints").exists()
    assert [f.path for f in m.files] == ["final/model.bin"]
    assert store.committed() == {"iter-000/rl"}


def test_stage_writer_wipes_a_previous_commit_too(store):
    _commit(store, "base/init", {"a.bin": b"a"})
    with store.stage_writer("base/init") as w:
        assert not store.is_committed("base/init")
        w.put_bytes("b.bin", b"b")
    assert not store.is_committed("base/init")  # new attempt never committed


def test_put_json_put_file_put_dir(store, tmp_path):
    src = tmp_path / "policy"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    single = tmp_path / "single.txt"
    single.write_text("hello")

    with store.stage_writer("base/init") as w:
        w.put_json("meta.json", {"b": 2, "a": 1})
        w.put_file("notes/single.txt", single)
        w.put_dir("policy", src)
        m = w.commit()

    assert {f.path for f in m.files} == {
        "meta.json",
        "notes/single.txt",
        "policy/config.json",
        "policy/sub/weights.bin",
    }
    assert json.loads(_file(store, "base/init", "meta.json").read_text()) == {"a": 1, "b": 2}
    entry = next(f for f in m.files if f.path == "policy/sub/weights.bin")
    assert entry.size == 2000 and entry.sha256 == hashlib.sha256(b"\x00\x01" * 1000).hexdigest()
    assert store.validate("base/init", deep=True) == m


# --------------------------------------------------------------------------- reading


def test_local_dir_returns_the_stage_directory_for_local_stores(store, tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    (src / "model.bin").write_bytes(b"m" * 10)
    with store.stage_writer("iter-000/rl") as w:
        w.put_dir("checkpoints/step-2", src)
        w.put_bytes("metrics.jsonl", b"{}\n")
        w.commit()

    d = store.local_dir("iter-000/rl", "checkpoints/step-2")
    assert store.is_local
    assert d == Path(store.path("iter-000/rl/checkpoints/step-2"))
    assert (d / "model.bin").read_bytes() == b"m" * 10
    with pytest.raises(CorruptArtifact, match="lists nothing under checkpoints/step-9/"):
        store.local_dir("iter-000/rl", "checkpoints/step-9")


def test_read_verified_reads_listed_files_and_refuses_others(store):
    _commit(store, "iter-000/rl", {"metrics.jsonl": b'{"step": 1}\n'})
    assert store.read_verified("iter-000/rl", "metrics.jsonl") == b'{"step": 1}\n'

    # a file that exists on disk but was never committed
    _file(store, "iter-000/rl", "extra.txt").write_bytes(b"sneaky")
    with pytest.raises(CorruptArtifact, match="extra.txt is not in its commit manifest"):
        store.read_verified("iter-000/rl", "extra.txt")
    with pytest.raises(CorruptArtifact, match="has not committed"):
        store.read_verified("iter-000/rft", "metrics.jsonl")
    # same size, other bytes: caught on read
    _file(store, "iter-000/rl", "metrics.jsonl").write_bytes(b'{"step": 2}\n')
    with pytest.raises(CorruptArtifact, match="corrupt"):
        store.read_verified("iter-000/rl", "metrics.jsonl")


# --------------------------------------------------------------------------- URIs and spec


def test_unsupported_uri_scheme_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match=r"gs://x.*only local paths and s3:// URIs"):
        RunStore("gs://x", "default", "r1")
    with pytest.raises(StoreError):
        open_fs("http://example.com/runs")


def test_file_uri_and_from_uri(tmp_path):
    fs, root = open_fs(f"file://{tmp_path}/runs")
    assert root == f"{tmp_path}/runs"
    s = RunStore.from_uri(f"{tmp_path}/runs/team-a/r7")
    assert s.base == f"{tmp_path}/runs/team-a/r7"
    assert s.uri == f"{tmp_path}/runs/team-a/r7"
    assert s.is_local


def test_spec_round_trip(store):
    spec = {
        "apiVersion": "rloop.dev/v1",
        "kind": "RLoopRun",
        "spec": {"iterations": 2, "model": {"name": "tiny"}},
    }
    assert not store.exists("spec.json")
    store.write_spec(spec)
    assert store.exists("spec.json")
    assert store.read_spec() == spec


def test_missing_spec_is_a_store_error(store):
    with pytest.raises(StoreError, match=r"no spec\.json") as exc:
        store.read_spec()
    assert not isinstance(exc.value, CorruptArtifact)
