"""rloop.store against a real S3 API (SeaweedFS with enforced authentication, see tests/s3harness.py)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from rloop.store import MANIFEST, CorruptArtifact, RunStore, StoreError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def s3env(seaweedfs, monkeypatch, tmp_path):
    """The store's environment pointed at the test SeaweedFS, and a private download cache."""
    for k in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path / "cache"))
    return seaweedfs


def _run_name() -> str:
    return "r-" + uuid.uuid4().hex[:10]


def _raw_s3(server):
    """An s3fs client of its own (not the store's), to tamper with objects behind the store's back."""
    import s3fs

    return s3fs.S3FileSystem(
        key=server.access_key,
        secret=server.secret_key,
        endpoint_url=server.endpoint,
        client_kwargs={"region_name": "us-east-1"},
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def _policy_dir(root: Path) -> Path:
    d = root / "policy"
    (d / "shards").mkdir(parents=True)
    (d / "config.json").write_text('{"hidden": 8}')
    (d / "shards" / "model-0.bin").write_bytes(bytes(range(256)) * 40)
    (d / "shards" / "model-1.bin").write_bytes(b"\x07" * 3001)
    return d


def test_write_commit_validate_and_download(s3env, tmp_path):
    store = RunStore(f"s3://{s3env.bucket}/runs", "default", _run_name())
    assert not store.is_local
    assert store.committed() == set()

    store.write_spec({"spec": {"iterations": 1}})
    assert store.read_spec() == {"spec": {"iterations": 1}}

    src = _policy_dir(tmp_path / "src")
    with store.stage_writer("base/init") as w:
        w.put_bytes("stats.json", b'{"ok": true}')
        w.put_dir("policy", src)
        m = w.commit({"params": 123})
    with store.stage_writer("iter-000/rl") as w:  # crashed attempt: files, no manifest
        w.put_bytes("metrics.jsonl", b"{}\n")

    # the objects really are in the bucket, manifest included
    keys = {
        o["Key"]
        for o in s3env.client().list_objects_v2(Bucket=s3env.bucket, Prefix=store.base.split("/", 1)[1])[
            "Contents"
        ]
    }
    rel = store.base.split("/", 1)[1]
    assert f"{rel}/base/init/{MANIFEST}" in keys
    assert f"{rel}/base/init/policy/shards/model-1.bin" in keys

    assert store.committed() == {"base/init"}
    assert store.committed(["base/init", "iter-000/rl"]) == {"base/init"}
    assert store.validate("base/init", deep=True) == m
    assert m.summary == {"params": 123}
    assert {f.path for f in m.files} == {
        "stats.json",
        "policy/config.json",
        "policy/shards/model-0.bin",
        "policy/shards/model-1.bin",
    }
    assert store.read_verified("base/init", "stats.json") == b'{"ok": true}'

    local = store.local_dir("base/init", "policy")
    cache = tmp_path / "cache"
    assert cache in local.parents
    assert (local / ".complete").exists()
    downloaded = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.name != ".complete")
    original = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    assert downloaded == original
    for name in original:
        if (src / name).is_file():
            assert (local / name).read_bytes() == (src / name).read_bytes(), name
    # served from the cache the second time
    assert store.local_dir("base/init", "policy") == local


def test_corrupted_object_of_same_size_is_caught_by_deep_validation(s3env, tmp_path):
    store = RunStore(f"s3://{s3env.bucket}/runs", "default", _run_name())
    src = _policy_dir(tmp_path / "src")
    with store.stage_writer("iter-000/rft") as w:
        w.put_dir("policy", src)
        w.put_bytes("stats.json", b"{}")
        w.commit()
    assert store.validate("iter-000/rft", deep=True)

    target = store.path("iter-000/rft/policy/shards/model-0.bin")
    raw = _raw_s3(s3env)
    original = raw.cat_file(target)
    tampered = bytes([original[0] ^ 0xFF]) + original[1:]
    raw.pipe_file(target, tampered)
    assert raw.size(target) == len(original)
    assert hashlib.sha256(raw.cat_file(target)).digest() != hashlib.sha256(original).digest()

    assert store.is_committed("iter-000/rft", deep=False)  # sizes still agree
    assert store.committed() == {"iter-000/rft"}
    with pytest.raises(CorruptArtifact, match=r"iter-000/rft/policy/shards/model-0\.bin: sha256 mismatch"):
        store.validate("iter-000/rft", deep=True)
    with pytest.raises(CorruptArtifact, match="model-0.bin"):
        store.local_dir("iter-000/rft", "policy")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("model-0.bin"))


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_are_a_store_error_naming_the_fix(s3env, monkeypatch, wrong):
    uri = f"s3://{s3env.bucket}/runs"
    name = _run_name()
    good = RunStore(uri, "default", name)
    good.write_spec({"x": 1})  # a client with the right credentials exists (and is cached) first

    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3env.secret_key[::-1])
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-" + uuid.uuid4().hex[:8])
    bad = RunStore(uri, "default", name)
    assert bad.fs is not good.fs

    for op in (
        lambda: bad.exists("spec.json"),
        lambda: bad.read_spec(),
        lambda: bad.committed(),
        lambda: bad.write_spec({"x": 2}),
    ):
        with pytest.raises(StoreError) as exc:
            op()
        msg = str(exc.value)
        assert not isinstance(exc.value, CorruptArtifact)
        assert "credentials" in msg, msg
        assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg, msg
        assert s3env.secret_key not in msg and s3env.secret_key[::-1] not in msg

    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID"), bad.stage_writer("base/init") as w:
        w.put_bytes("a.bin", b"a")

    # the right credentials still work afterwards, and nothing was written with the wrong ones
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3env.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3env.secret_key)
    again = RunStore(uri, "default", name)
    assert again.read_spec() == {"x": 1}
    assert not again.exists("base/init/a.bin")


def test_missing_bucket_is_a_store_error_naming_the_bucket(s3env):
    bucket = "rloop-missing-" + uuid.uuid4().hex[:8]
    store = RunStore(f"s3://{bucket}/runs", "default", _run_name())

    with pytest.raises(StoreError, match=rf"bucket of s3://{bucket}/runs/\S+ does not exist") as exc:
        store.write_spec({"x": 1})
    assert not isinstance(exc.value, CorruptArtifact)
    with (
        pytest.raises(StoreError, match=rf"bucket of s3://{bucket}/\S+ does not exist"),
        store.stage_writer("base/init") as w,
    ):
        w.put_bytes("a.bin", b"a")
    # and it was not silently created (uploads do not auto-create buckets)
    names = {b["Name"] for b in s3env.client().list_buckets()["Buckets"]}
    assert bucket not in names and s3env.bucket in names
