"""The object store: a run's directory tree on a local path or S3, and commit manifests.

Layout (DESIGN §3.3), relative to `<root>/<namespace>/<run>/`:

    spec.json                  resolved spec snapshot
    base/init/{policy/, _COMMIT.json}
    base/eval/<set>/{samples.parquet, metrics.json, _COMMIT.json}
    iter-000/rl/{pool/, checkpoints/, final/, metrics.jsonl, _COMMIT.json}
    iter-000/verify/{expert.parquet, stats.json, _COMMIT.json}
    iter-000/rft/{policy/, _COMMIT.json}
    iter-000/eval/<set>/...

A stage is done iff its `_COMMIT.json` exists and validates (every listed file present with the
listed size, and — when reading inputs — the listed sha256). The manifest is written last, so a
crashed attempt leaves none; a new attempt wipes the directory first. Nothing reads a stage's
files except through a validated manifest, so partial output is never trained on.

Credentials come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL), which the operator fills from the Secret named in `storage.secretRef`.

Faults: every operation on a remote store retries transient errors (connection refused, timeouts,
5xx) with capped exponential backoff for `RLOOP_STORE_RETRY_SECONDS` (default 120 s), then raises
`StoreUnavailable`. A file that a manifest lists but the store does not show is looked for again over
the same window before it counts as missing. Only proof — a size or sha256 that differs from the
manifest, an unreadable manifest, a file still missing after the window — makes an artifact corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from rloop.contracts import STORE_RETRY_DEFAULT_SECONDS, STORE_RETRY_ENV
from rloop.redact import redact_uris

MANIFEST = "_COMMIT.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """The store cannot be reached or used (bad URI, credentials, permissions)."""


class CorruptArtifact(StoreError):
    """A stage's output does not match its commit manifest (or has none)."""


class NotCommitted(CorruptArtifact):
    """A stage has no commit manifest yet (never finished, or its manifest was invalidated)."""


class MissingArtifact(CorruptArtifact):
    """A file its manifest lists is not in the store (still missing after the retry window)."""


class StoreUnavailable(StoreError):
    """The store did not answer (or answered with transient errors) through the whole retry window.
    Nothing is invalidated over it: the stage exits EXIT_STORE_UNAVAILABLE and is retried later."""


def retry_window_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(STORE_RETRY_ENV, STORE_RETRY_DEFAULT_SECONDS)))
    except ValueError:
        return STORE_RETRY_DEFAULT_SECONDS


def _s3_options() -> dict[str, Any]:
    """s3fs options from the environment only: credentials never come from the spec."""
    opts: dict[str, Any] = {}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    # Written objects must be readable right after the manifest: no listing cache.
    opts["use_listings_cache"] = False
    return opts


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path without protocol) for a local path or s3:// URI."""
    if uri.startswith("s3://"):
        try:
            import s3fs  # noqa: F401  (optional extra)
        except ImportError as err:
            raise StoreError("storage.uri is s3:// but s3fs is not installed: pip install 'rloop[s3]'") from err
        fs = fsspec.filesystem("s3", **_s3_options())
        return fs, uri.removeprefix("s3://").rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"storage.uri {redact_uris(uri)!r}: only local paths and s3:// URIs are supported")
    path = os.path.abspath(uri.removeprefix("file://"))
    return fsspec.filesystem("file", auto_mkdir=True), path


def _explain(err: Exception, uri: str, remote: bool | None = None) -> StoreError:
    """Turn botocore/s3fs errors into a message that says what to fix (without URI secrets: botocore
    quotes endpoint URLs, and a presigned URL's query is a credential)."""
    text, uri = redact_uris(f"{type(err).__name__}: {err}"), redact_uris(uri)
    # s3fs turns 403s into PermissionError carrying only the server's message (no error code).
    denied = isinstance(err, PermissionError) and uri.startswith("s3://")
    codes = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403")
    codes += ("NoCredentialsError",)
    if denied or any(s in text for s in codes):
        return StoreError(
            f"the store {uri} rejected the credentials ({text.splitlines()[0][:200]}); set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY (on Kubernetes: the Secret named by spec.storage.secretRef)"
        )
    if "NoSuchBucket" in text or "specified bucket does not exist" in text:
        return StoreError(f"the bucket of {uri} does not exist; create it or fix spec.storage.uri")
    if uri.startswith("s3://") if remote is None else remote:  # network, timeouts, 5xx: worth another try
        return StoreUnavailable(f"store {uri}: {text[:300]}")
    return StoreError(f"store {uri}: {text[:300]}")


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    """`_COMMIT.json`: what a stage wrote, proven by size and hash, plus its summary metrics."""

    stage: str
    files: list[FileEntry]
    summary: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "stage": self.stage,
                "created": self.created,
                "summary": self.summary,
                "files": [vars(f) for f in self.files],
            },
            indent=1,
            sort_keys=True,
        )

    @property
    def digest(self) -> str:
        """sha256 of the manifest as written (stages report it; the operator records it in status)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            d = json.loads(text)
            files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in d["files"]]
            return cls(str(d["stage"]), files, dict(d.get("summary", {})), float(d.get("created", 0)), int(d["version"]))
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptArtifact(f"{where}: unreadable commit manifest ({err})") from None


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


class RunStore:
    """One run's directory: `<root>/<namespace>/<name>`."""

    def __init__(self, root_uri: str, namespace: str, name: str):
        self.fs, root = open_fs(root_uri)
        self.root_uri = root_uri.rstrip("/")
        self.base = f"{root}/{namespace}/{name}"
        self.uri = f"{self.root_uri}/{namespace}/{name}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @classmethod
    def from_uri(cls, run_uri: str) -> RunStore:
        """From a full run URI `<root>/<namespace>/<name>` (what stage commands receive)."""
        root, namespace, name = run_uri.rstrip("/").rsplit("/", 2)
        return cls(root, namespace, name)

    # ------------------------------------------------------------------------------ raw access
    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}".rstrip("/")

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the store, transient errors retried (remote stores) for the retry window.
        FileNotFoundError passes through untouched; everything else becomes a StoreError."""
        deadline = time.monotonic() + (0.0 if self.is_local else retry_window_seconds())
        delay, warned = 0.5, False
        while True:
            try:
                return fn(*args, **kwargs)
            except FileNotFoundError as err:
                if "bucket does not exist" in str(err):  # s3fs reports NoSuchBucket as a missing file
                    raise _explain(err, self.uri, remote=not self.is_local) from None
                raise
            except StoreError:
                raise
            except Exception as err:  # botocore/aiohttp errors share no useful base class
                explained = _explain(err, self.uri, remote=not self.is_local)
                remaining = deadline - time.monotonic()
                if not isinstance(explained, StoreUnavailable) or remaining <= 0:
                    if isinstance(explained, StoreUnavailable) and not self.is_local:
                        explained = StoreUnavailable(f"{explained} (still failing after {retry_window_seconds():.0f}s "
                                                     f"of retries; {STORE_RETRY_ENV} sets the window)")
                    raise explained from None
                if not warned:
                    print(f"rloop: store {redact_uris(self.uri)} unavailable ({str(explained)[:160]}); retrying for up to "
                          f"{remaining:.0f}s", file=sys.stderr)
                    warned = True
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 10.0)

    def _look_for(self, fn, *args):
        """fn(*args) where FileNotFoundError may be an object store's passing 404: looked for again until
        the retry window closes (remote stores), then FileNotFoundError."""
        deadline = time.monotonic() + (0.0 if self.is_local else retry_window_seconds())
        while True:
            try:
                return self.call(fn, *args)
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def exists(self, rel: str) -> bool:
        return self.call(self.fs.exists, self.path(rel))

    def _read(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def read_text(self, rel: str) -> str:
        return self.call(self._read, self.path(rel)).decode()

    def write_text(self, rel: str, text: str) -> None:
        self.call(self._write, self.path(rel), text.encode())

    def move(self, rel: str, to_rel: str) -> None:
        self.call(self.fs.mv, self.path(rel), self.path(to_rel))

    # ------------------------------------------------------------------------------ spec snapshot
    def write_spec(self, manifest: dict[str, Any]) -> None:
        self.write_text("spec.json", json.dumps(manifest, indent=1, sort_keys=True))

    def read_spec(self) -> dict[str, Any]:
        try:
            return json.loads(self.read_text("spec.json"))
        except FileNotFoundError:
            raise StoreError(f"{self.uri}: no spec.json; start the run with `rloop run FILE`") from None

    # ------------------------------------------------------------------------------ manifests
    def read_manifest(self, stage_id: str, *, look_again: bool = False) -> Manifest:
        """The stage's manifest. look_again: a missing manifest is looked for over the retry window
        (for inputs, which a consumer knows were committed; a planner asks without it)."""
        where = f"{self.uri}/{stage_id}/{MANIFEST}"
        try:
            read = self._look_for if look_again else self.call
            text = read(self._read, self.path(f"{stage_id}/{MANIFEST}")).decode()
        except FileNotFoundError:
            raise NotCommitted(f"{where}: missing; stage {stage_id} has not committed") from None
        m = Manifest.from_json(text, where)
        if m.stage != stage_id:
            raise CorruptArtifact(f"{where}: manifest is for stage {m.stage!r}, not {stage_id!r}")
        return m

    def validate(self, stage_id: str, *, deep: bool = True, look_again: bool = False) -> Manifest:
        """The stage's manifest if every file matches it (size always, sha256 when deep).

        Transient store errors are retried (StoreUnavailable when they persist); a listed file is
        looked for again over the retry window before it is MissingArtifact."""
        m = self.read_manifest(stage_id, look_again=look_again)
        for f in m.files:
            p = self.path(f"{stage_id}/{f.path}")
            try:
                size = self._look_for(self.fs.size, p)
            except FileNotFoundError:
                raise MissingArtifact(f"{self.uri}/{stage_id}/{f.path}: listed in {MANIFEST} but missing") from None
            if size != f.size:
                raise CorruptArtifact(
                    f"{self.uri}/{stage_id}/{f.path}: size {size} != {f.size} in {MANIFEST} (truncated or rewritten)"
                )
            if deep:
                digest = self.call(self._sha256, p)
                if digest != f.sha256:
                    raise CorruptArtifact(f"{self.uri}/{stage_id}/{f.path}: sha256 mismatch with {MANIFEST} (corrupt)")
        return m

    def _sha256(self, path: str) -> str:
        with self.fs.open(path, "rb") as fh:
            return _sha256_stream(fh)

    def is_committed(self, stage_id: str, *, deep: bool = False) -> bool:
        try:
            self.validate(stage_id, deep=deep)
            return True
        except CorruptArtifact:
            return False

    def committed(self, candidates: list[str] | None = None) -> set[str]:
        """Ids of committed stages (manifest present and sizes match)."""
        return set(self.committed_manifests(candidates))

    def committed_manifests(self, candidates: list[str] | None = None) -> dict[str, Manifest]:
        """The validated (sizes, not hashes) manifest of every committed stage, by id: for readers that
        want the summaries too, with each manifest read once."""
        try:
            found = self.call(self.fs.glob, f"{self.base}/**/{MANIFEST}")
        except FileNotFoundError:
            return {}
        ids = {p.removeprefix(self.base + "/").rsplit("/", 1)[0] for p in found}
        if candidates is not None:
            ids &= set(candidates)
        out = {}
        for stage_id in sorted(ids):
            try:
                out[stage_id] = self.validate(stage_id, deep=False)
            except CorruptArtifact:
                continue
        return out

    # ------------------------------------------------------------------------------ writing
    @contextmanager
    def stage_writer(self, stage_id: str) -> Iterator[StageWriter]:
        """Start a fresh attempt: wipe partial output, yield a writer; commit happens via `commit()`."""
        d = self.path(stage_id)
        if self.call(self.fs.exists, d):
            self.call(self.fs.rm, d, recursive=True)
        yield StageWriter(self, stage_id)

    # ------------------------------------------------------------------------------ reading
    def local_dir(self, stage_id: str, rel: str, *, manifest: Manifest | None = None) -> Path:
        """A local directory holding `<stage>/<rel>/` after deep validation (download when remote)."""
        m = manifest or self.validate(stage_id, deep=True)
        prefix = rel.rstrip("/") + "/"
        entries = [f for f in m.files if f.path.startswith(prefix)]
        if not entries:
            raise CorruptArtifact(f"{self.uri}/{stage_id}: manifest lists nothing under {rel}/")
        if self.is_local:
            return Path(self.path(f"{stage_id}/{rel}"))
        digest = hashlib.sha256(m.to_json().encode()).hexdigest()[:16]
        dest = Path(os.environ.get("RLOOP_CACHE", Path(tempfile.gettempdir()) / "rloop-cache")) / digest / rel
        if not (dest / ".complete").exists():
            tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            for f in entries:
                target = tmp / f.path[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.call(self.fs.get, self.path(f"{stage_id}/{f.path}"), str(target))
            (tmp / ".complete").write_text("")
            _move_into_place(tmp, dest)
        return dest

    def read_verified(self, stage_id: str, rel: str, manifest: Manifest | None = None) -> bytes:
        """The bytes of one committed file, checked against the manifest (size and sha256)."""
        m = manifest or self.validate(stage_id, deep=True)
        entry = next((f for f in m.files if f.path == rel), None)
        if entry is None:
            raise CorruptArtifact(f"{self.uri}/{stage_id}: {rel} is not in its commit manifest")
        try:
            data = self._look_for(self._read, self.path(f"{stage_id}/{rel}"))
        except FileNotFoundError:
            raise MissingArtifact(f"{self.uri}/{stage_id}/{rel}: listed in {MANIFEST} but missing") from None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise CorruptArtifact(f"{self.uri}/{stage_id}/{rel}: differs from {MANIFEST} (corrupt)")
        return data


class StageWriter:
    """Writes files of one stage attempt, hashing as it goes; `commit()` writes the manifest last."""

    def __init__(self, store: RunStore, stage_id: str):
        self.store, self.stage_id = store, stage_id
        self.files: dict[str, FileEntry] = {}

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.store.call(self.store._write, self.store.path(f"{self.stage_id}/{rel}"), data)
        self.files[rel] = FileEntry(rel, len(data), hashlib.sha256(data).hexdigest())

    def put_json(self, rel: str, obj: Any) -> None:
        self.put_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def put_file(self, rel: str, local: str | Path) -> None:
        local = Path(local)
        with open(local, "rb") as fh:
            digest = _sha256_stream(fh)
        self.store.call(self.store.fs.put_file, str(local), self.store.path(f"{self.stage_id}/{rel}"))
        self.files[rel] = FileEntry(rel, local.stat().st_size, digest)

    def put_dir(self, rel: str, local_dir: str | Path) -> None:
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                self.put_file(f"{rel}/{p.relative_to(local_dir).as_posix()}", p)

    def commit(self, summary: dict[str, Any] | None = None) -> Manifest:
        m = Manifest(self.stage_id, sorted(self.files.values(), key=lambda f: f.path), summary or {}, time.time())
        self.store.write_text(f"{self.stage_id}/{MANIFEST}", m.to_json())
        return m


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename a finished download to `dest`. The workers of a multi-GPU stage download the same policy
    at once: the first rename wins and the others drop their copy (a complete `dest` is never removed)."""
    if (dest / ".complete").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover of a killed stage
    try:
        tmp.rename(dest)
    except OSError:
        if not (dest / ".complete").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
