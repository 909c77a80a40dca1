"""Job names and labels: deterministic, DNS-1123, hashed past 63 characters, reversible labels."""

from __future__ import annotations

import re

import pytest

from rloop.plan import Stage, all_stages
from rloop.spec import parse_spec
from rloop_operator.naming import (
    LABEL_ATTEMPT,
    LABEL_ITERATION,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    LABEL_STAGE,
    MAX_NAME,
    job_labels,
    job_name,
    label_value,
    parse_job_labels,
    run_selector,
    stage_label,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def test_short_names_spell_run_iteration_kind_set_attempt():
    assert job_name("tiny", Stage("init"), 0) == "tiny-b-init-a0"
    assert job_name("tiny", Stage("eval", None, "heldout"), 1) == "tiny-b-eval-heldout-a1"
    assert job_name("tiny", Stage("rl", 0), 0) == "tiny-i0-rl-a0"
    assert job_name("tiny", Stage("eval", 12, "aime"), 3) == "tiny-i12-eval-aime-a3"


def test_exactly_63_characters_is_kept_verbatim():
    tail = "-i0-rl-a0"
    run = "r" * (MAX_NAME - len(tail))
    name = job_name(run, Stage("rl", 0), 0)
    assert name == run + tail
    assert len(name) == MAX_NAME


@pytest.mark.parametrize("attempt", [0, 7, 123])
def test_long_names_are_hashed_and_still_end_with_the_attempt(attempt):
    run = "a-very-long-run-name-that-somebody-typed-without-thinking-twice"
    stage = Stage("eval", 101, "some-held-out-set-name")
    name = job_name(run, stage, attempt)
    assert len(name) <= MAX_NAME
    assert DNS_LABEL.match(name)
    assert name.endswith(f"-a{attempt}")
    assert re.search(r"-[0-9a-f]{8}-a\d+$", name)
    assert name.startswith("a-very-long-run-name")
    assert job_name(run, stage, attempt) == name  # deterministic


def test_one_over_the_limit_is_hashed():
    tail = "-i0-rl-a0"
    run = "r" * (MAX_NAME - len(tail) + 1)
    name = job_name(run, Stage("rl", 0), 0)
    assert len(name) <= MAX_NAME and name.endswith("-a0") and name != run + tail


def test_distinct_attempts_stages_and_runs_give_distinct_names():
    long_run = "x" * 60
    names = {job_name(long_run, Stage("rl", k), a) for k in range(5) for a in range(30)}
    assert len(names) == 150
    assert job_name(long_run + "1", Stage("rl", 0), 0) != job_name(long_run + "2", Stage("rl", 0), 0)


def test_characters_a_label_cannot_hold_are_replaced_and_hashed():
    dotted, dashed = job_name("My.Run", Stage("rl", 0), 0), job_name("my-run", Stage("rl", 0), 0)
    assert DNS_LABEL.match(dotted)
    assert dashed == "my-run-i0-rl-a0"
    assert dotted != dashed  # no collision after sanitising


def test_negative_attempt_is_a_bug():
    with pytest.raises(ValueError):
        job_name("tiny", Stage("rl", 0), -1)


def test_labels():
    labels = job_labels("tiny", Stage("eval", 2, "heldout"), 1)
    assert labels == {
        LABEL_RUN: "tiny",
        LABEL_STAGE: "iter-002.eval.heldout",
        LABEL_ITERATION: "2",
        LABEL_ATTEMPT: "1",
        LABEL_MANAGED_BY: "rloop-operator",
    }
    assert job_labels("tiny", Stage("init"), 0)[LABEL_ITERATION] == "base"
    assert stage_label(Stage("eval", None, "heldout")) == "base.eval.heldout"
    assert run_selector("tiny") == "rloop.dev/run=tiny,app.kubernetes.io/managed-by=rloop-operator"


def test_labels_round_trip_for_every_stage_of_a_run():
    spec = parse_spec(
        {
            "model": {"base": "builtin:tiny"},
            "data": {
                "train": {"synthetic": {}},
                "eval": [{"name": "a", "synthetic": {}}, {"name": "b-2", "synthetic": {}}],
            },
            "loop": {"iterations": 3, "pool": {"source": "checkpoints"}},
        }
    )
    for stage in all_stages(spec):
        labels = job_labels("run", stage, 4)
        assert all(LABEL_VALUE.match(v) and len(v) <= MAX_NAME for v in labels.values())
        assert parse_job_labels(labels) == (stage, 4)


@pytest.mark.parametrize(
    "labels",
    [
        None,
        {},
        {LABEL_STAGE: "iter-000.rl"},
        {LABEL_STAGE: "nonsense", LABEL_ATTEMPT: "0"},
        {LABEL_STAGE: "iter-000.rl", LABEL_ATTEMPT: "x"},
        {LABEL_STAGE: "iter-000.rl", LABEL_ATTEMPT: "-1"},
    ],
)
def test_foreign_labels_are_not_ours(labels):
    assert parse_job_labels(labels) is None


def test_long_run_names_become_valid_label_values():
    run = "r" + ".x" * 100
    value = label_value(run)
    assert len(value) <= MAX_NAME and LABEL_VALUE.match(value)
    assert label_value(run) == value and label_value(run + "y") != value
    assert label_value("tiny") == "tiny"
