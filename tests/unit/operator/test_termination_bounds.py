"""Hostile pod termination messages: bounded in size and depth, control characters stripped before a
failure detail reaches status or Events, and nothing in them can make a reconcile pass raise."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from rloop_operator.jobs import (
    DETAIL_MAX,
    MESSAGE_MAX,
    parse_termination_message,
    termination_messages,
    view_job,
)
from rloop_operator.reconcile import Observed, reconcile
from tests.helpers import small_doc

T0 = "2026-01-01T00:00:00Z"
NOW = datetime(2026, 1, 1, 0, 10, tzinfo=UTC)


def _spec() -> dict[str, Any]:
    doc = small_doc("demo", iterations=1, eval_base=False)
    doc["spec"]["storage"] = {"uri": "s3://b/p"}
    return doc["spec"]


def _job(state: str) -> dict[str, Any]:
    """The init Job the operator creates for a new run, then finished in `state`."""
    actions = reconcile(Observed("demo", "team", "uid-1", 1, _spec(), {}, [], {}, NOW), default_image="i:1")
    job = copy.deepcopy(actions.create_jobs[0])
    job["metadata"] |= {"uid": "job-uid", "resourceVersion": "7", "creationTimestamp": T0}
    cond = "Complete" if state == "Succeeded" else "Failed"
    job["status"] = {
        "succeeded" if state == "Succeeded" else "failed": 1,
        "conditions": [{"type": cond, "status": "True", "lastTransitionTime": T0}],
    }
    return job


def _pod(job: str, message: str) -> dict[str, Any]:
    terminated = {"message": message, "startedAt": T0}
    return {
        "metadata": {"labels": {"batch.kubernetes.io/job-name": job}},
        "status": {"containerStatuses": [{"name": "stage", "state": {"terminated": terminated}}]},
    }


UNPRINTABLE = ["\x00", "\x07", "\x1b", "\x7f", "\u202e", "\u2066", "\u200b", "\r", "\n", "\t"]


# ------------------------------------------------------------------------------------ size, depth
def test_messages_are_cut_to_the_kubelets_limit() -> None:
    huge = "x" * (10 * MESSAGE_MAX)
    assert termination_messages([_pod("j", huge)], "stage") == {"j": "x" * MESSAGE_MAX}


@pytest.mark.parametrize(
    "text",
    [
        "[" * 3000 + "]" * 3000,  # json recurses: RecursionError, not a summary
        '{"a": ' * 2000 + "1" + "}" * 2000,
        json.dumps({"a": {"b": {"c": {"d": {"e": 1}}}}}),  # deeper than a summary is
        json.dumps({"message": "m" * MESSAGE_MAX}),  # longer than any kubelet passes on
        '{"a": 1',
        "[1, 2]",
        "NaN",
    ],
    ids=["deep-list", "deep-object", "depth-5", "over-limit", "truncated", "not-an-object", "constant"],
)
def test_hostile_json_is_no_summary(text: str) -> None:
    assert parse_termination_message(text) is None


def test_a_real_summary_still_parses_and_huge_integers_become_floats() -> None:
    summary = {"stage": "iter-000/eval/heldout", "avg_at_n": 0.5, "pass_at_k": {"1": 0.5, "4": 0.75}}
    assert parse_termination_message(json.dumps(summary)) == summary
    parsed = parse_termination_message('{"avg_at_n": ' + "9" * 400 + ', "n": 3}')
    assert parsed == {"avg_at_n": float("inf"), "n": 3}


# ------------------------------------------------------------------------------- clean details
@pytest.mark.parametrize("as_json", [True, False], ids=["summary-message", "log-tail"])
def test_failure_details_are_one_printable_bounded_line(as_json: bool) -> None:
    evil = "boom" + "".join(UNPRINTABLE) + "\x1b[2J\x1b]0;title\x07 spoofed\u202eelif.exe " + "y" * 1000
    text = json.dumps({"error": "InvalidInput", "message": evil}) if as_json else "log line 1\n" + evil
    view = view_job(_job("Failed"), termination_messages([_pod("x", text)], "stage")["x"])
    assert view is not None and view.detail is not None
    assert len(view.detail) <= DETAIL_MAX
    assert not any(ch in view.detail for ch in UNPRINTABLE)
    assert "spoofed elif.exe" in view.detail  # the text stays readable (a log tail's last line)


def test_a_reconcile_pass_survives_hostile_messages_and_writes_clean_status() -> None:
    spec = _spec()
    job = _job("Failed")
    name = job["metadata"]["name"]
    messages = {name: json.dumps({"error": "InvalidInput", "message": "bad\x1b[31m input\u202e\x00"})}
    actions = reconcile(
        Observed("demo", "team", "uid-1", 1, spec, {}, [job], messages, NOW), default_image="i:1"
    )
    texts = [c["message"] for c in actions.status["conditions"]]
    texts += [h.get("message", "") for h in actions.status["history"]]
    texts += [e[2] for e in actions.events]
    assert any("bad [31m input" in t for t in texts)
    assert not any(ch in t for t in texts for ch in UNPRINTABLE)

    # Summaries of succeeded stages with absurd numbers: no metric, no exception.
    ok = _job("Succeeded")
    for text in ('{"train_reward_last10pct": ' + "9" * 400 + "}", "[" * 3000, '{"a": ' * 1500 + "}" * 1500):
        obs = Observed("demo", "team", "uid-1", 1, spec, {}, [ok], {ok["metadata"]["name"]: text}, NOW)
        reconcile(obs, default_image="i:1")
