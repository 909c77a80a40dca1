"""URI secrets (userinfo, presigned queries, fragments) are redacted in every text a stage or the store
prints or reports: stage logs, crash tracebacks, termination messages, store errors and retry warnings."""

from __future__ import annotations

import json

import pytest

from rloop.contracts import EXIT_INVALID_INPUT, STORE_RETRY_ENV
from rloop.plan import Stage
from rloop.redact import is_redacted, redact_uris
from rloop.stages import run_stage
from rloop.stages.common import InputError, StageContext
from rloop.store import RunStore, StoreUnavailable

SIGNATURE = "d1e5e4f0c0ffee"
SECRET = "wJalrXUtnFEMI/K7MDENG"
PRESIGNED = f"https://bucket.s3.amazonaws.com/train.jsonl?X-Amz-Credential=AKIAEX%2F1&X-Amz-Signature={SIGNATURE}"
USERINFO = f"s3://AKIAEX:{SECRET}@minio:9000/bucket/x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://k:s@host/p?X-Amz-Signature=abc", "s3://***@host/p?***"),
        (f"read {PRESIGNED} failed", "read https://bucket.s3.amazonaws.com/train.jsonl?*** failed"),
        # An AWS secret key may hold '/': the userinfo does not end at the first one.
        (USERINFO, "s3://***@minio:9000/bucket/x"),
        ("https://u:p@ss@host:9000/a", "https://***@host:9000/a"),
        ("https://token@host/a#access_token=t", "https://***@host/a#***"),
        (f"'{PRESIGNED}'", "'https://bucket.s3.amazonaws.com/train.jsonl?***'"),
        (f'{{"url": "{USERINFO}"}}', '{"url": "s3://***@minio:9000/bucket/x"}'),
        ("two: s3://a:b@c/d and http://e:f@g/h", "two: s3://***@c/d and http://***@g/h"),
    ],
)
def test_userinfo_queries_and_fragments_are_redacted(text: str, expected: str) -> None:
    assert redact_uris(text) == expected
    assert redact_uris(expected) == expected  # idempotent: redacting twice changes nothing


@pytest.mark.parametrize(
    "text",
    ["s3://bucket/runs/team/demo/iter-000/rl", "http://minio:9000/bucket", "/data/runs?2026 (a local path)",
     "no URI here: a@b, x?y", "s3://bucket/p/file@v2"],
)
def test_text_without_uri_secrets_is_unchanged(text: str) -> None:
    assert redact_uris(text) == text and is_redacted(text.split(" ")[0])


def test_a_failed_stage_logs_and_reports_no_uri_secrets(tmp_path, monkeypatch, capsys) -> None:
    def fail(run_uri: str, stage: Stage):
        raise InputError(f"data.train.path: {PRESIGNED}: 403 Forbidden (endpoint {USERINFO})")

    monkeypatch.setattr(StageContext, "open", staticmethod(fail))
    message = tmp_path / "termination-log"
    monkeypatch.setenv("RLOOP_TERMINATION_LOG", str(message))
    assert run_stage(str(tmp_path / "store" / "ns" / "run"), Stage("init")) == EXIT_INVALID_INPUT
    log = capsys.readouterr().err
    reported = json.loads(message.read_text())["message"]
    for text in (log, reported):
        assert "train.jsonl?***" in text and "s3://***@minio:9000/bucket/x" in text
        assert SIGNATURE not in text and SECRET not in text


def test_a_crash_traceback_has_no_uri_secrets(tmp_path, monkeypatch, capsys) -> None:
    """With FallbackToLogsOnError, a crashed stage's log tail becomes its termination message."""

    def crash(run_uri: str, stage: Stage):
        raise RuntimeError(f"GET {PRESIGNED} timed out")

    monkeypatch.setattr(StageContext, "open", staticmethod(crash))
    assert run_stage(str(tmp_path / "store" / "ns" / "run"), Stage("init")) == 1
    log = capsys.readouterr().err
    assert "RuntimeError: GET https://bucket.s3.amazonaws.com/train.jsonl?*** timed out" in log
    assert SIGNATURE not in log


def test_store_retry_warnings_and_errors_have_no_uri_secrets(monkeypatch, capsys) -> None:
    pytest.importorskip("s3fs")
    monkeypatch.setenv(STORE_RETRY_ENV, "0.2")
    store = RunStore("s3://bucket/runs", "ns", "run")  # no request is made until a call

    def unreachable():
        raise ConnectionError(f"Could not connect to the endpoint URL: {USERINFO}?X-Amz-Signature={SIGNATURE}")

    with pytest.raises(StoreUnavailable) as err:
        store.call(unreachable)
    warning = capsys.readouterr().err
    assert "retrying" in warning
    for text in (warning, str(err.value)):
        assert "s3://***@minio:9000/bucket/x?***" in text
        assert SECRET not in text and SIGNATURE not in text
