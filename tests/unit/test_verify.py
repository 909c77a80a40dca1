"""Tests for rloop.verify: built-in verifiers, the registry and pooled batch scoring."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest

from rloop.data import load_examples
from rloop.data.synthetic import make_split
from rloop.verify import get_verifier, score_batch, score_exact, score_math, scorers, shutdown_pool

GSM8K_TEST_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "test-sample.jsonl"


@pytest.fixture(scope="module", autouse=True)
def _stop_pool_after_module():
    """Leave no worker processes behind once this module's tests are done."""
    yield
    shutdown_pool()


def _pool_job(kind: str, value: float, sleep_s: float = 0.0) -> float | None:
    """A stand-in worker job (runs in the spawned pool) that can sleep, raise or kill its process."""
    if kind == "crash":
        os._exit(3)
    if kind == "raise":
        raise RuntimeError("boom")
    time.sleep(sleep_s)
    return value


# --------------------------------------------------------------------------- registry and cheap verifiers


def test_unknown_verifier_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown verifier 'nope'.*'exact'.*'math'.*'subset_sum'"):
        get_verifier("nope")
    with pytest.raises(ValueError):
        score_batch("nope", ["x"], ["x"])


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        ("Paris", "Paris", 1.0),
        ("  Paris \n", "Paris", 1.0),
        ("Paris.", "Paris", 1.0),
        ("New   York", "New York", 1.0),
        ("new york", "New York", 0.0),
        ("Paris, France", "Paris", 0.0),
        ("", "Paris", 0.0),
    ],
)
def test_exact_verifier(response, truth, expected):
    assert score_exact(response, truth) == expected
    assert get_verifier("exact")(response, truth, id="ignored-row-field") == expected


def test_subset_sum_verifier_reads_digits_from_rows():
    example = make_split("train", 1, seed=0)[0]
    row = dataclasses.asdict(example)  # digits/target live in row["extra"]
    verifier = get_verifier("subset_sum")
    assert verifier(example.answer, example.answer, **row) == 1.0
    assert verifier("81", "81", prompt="38152/09:") == 1.0
    assert verifier("81", "81", digits="38152", target=9) == 1.0
    assert verifier("81", "81") is None


def test_score_batch_inline_verifiers():
    assert score_batch("exact", ["a", "b."], ["a", "b"]) == [1.0, 1.0]
    rows = [{"prompt": "38152/09:"}, {"prompt": "38152/09:"}, {}]
    assert score_batch("subset_sum", ["18", "55", "18"], ["81"] * 3, rows) == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="equal lengths"):
        score_batch("exact", ["a"], ["a", "b"])


# --------------------------------------------------------------------------- math verifier


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is 72", 1.0),
        ("The answer is 72.", 1.0),
        ("\\boxed{72}", 1.0),
        ("So she sold 48+24 = 72 clips.", 1.0),  # math-verify takes the last number
        ("#### 72", 1.0),
        ("71", 0.0),
        ("The answer is 71", 0.0),
        ("I do not know", 0.0),
        ("", 0.0),
    ],
)
def test_math_verifier_on_gsm8k_style_gold(response, expected):
    # A bare-number gold needs no $...$ wrapping: parse("72") gives [72, "72"].
    assert score_math(response, "72") == expected


def test_math_verifier_thousands_separator_in_response():
    assert score_math("The answer is 1,000", "1000") == 1.0


def test_math_verifier_unparsable_gold_is_unscorable():
    assert score_math("72", "") is None
    assert score_math("72", "no number here") is None


def test_math_verifier_refuses_non_main_threads():
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_capture(lambda: score_math("72", "72"))))
    thread.start()
    thread.join()
    assert isinstance(errors[0], RuntimeError)


def _capture(fn):
    try:
        fn()
    except Exception as exc:  # the test inspects the exception type
        return exc
    return None


def test_score_batch_math_over_gsm8k_sample_uses_the_pool():
    examples = load_examples(str(GSM8K_TEST_SAMPLE), limit=20)
    truths = [e.answer for e in examples]
    # Even rows answer correctly in prose, odd rows are off by one.
    responses = [
        f"Let me think. The answer is {t}." if i % 2 == 0 else f"The answer is \\boxed{{{int(t) + 1}}}"
        for i, t in enumerate(truths)
    ]
    scores = score_batch("math", responses, truths, workers=2)
    assert scores == [1.0 if i % 2 == 0 else 0.0 for i in range(20)]
    assert all(isinstance(s, float) for s in scores)
    assert scorers._pool is not None  # created lazily and kept for the next call


def test_score_batch_math_pathological_inputs_are_bounded_and_unscorable():
    responses = [
        "\\boxed{9^{9^{9^{9}}}}",  # the comparison would evaluate a gigantic power
        "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",  # parsing explodes
        "\\boxed{72}",
    ]
    start = time.monotonic()
    scores = score_batch("math", responses, ["72"] * 3, timeout_s=2.0)
    assert time.monotonic() - start < 8.0
    assert scores == [None, None, 1.0]


# --------------------------------------------------------------------------- pool watchdog


def test_pool_kills_overdue_jobs_and_finishes_the_rest():
    jobs = [("ok", 1.0, 30.0), ("ok", 2.0), ("ok", 3.0), ("ok", 4.0)]
    start = time.monotonic()
    results = scorers._run_pooled(_pool_job, jobs, timeout_s=1.0, workers=2)
    assert time.monotonic() - start < 10.0  # far below the 30 s the first job wanted
    assert results == [None, 2.0, 3.0, 4.0]


def test_pool_survives_crashing_and_raising_jobs():
    jobs = [("crash", 1.0), ("ok", 2.0), ("raise", 3.0), ("ok", 4.0)]
    results = scorers._run_pooled(_pool_job, jobs, timeout_s=5.0, workers=2)
    assert results[0] is None and results[2] is None
    assert results[1] == 2.0 and results[3] == 4.0
    # The pool was rebuilt and still works for the real verifier.
    assert score_batch("math", ["\\boxed{72}"], ["72"]) == [1.0]


def test_shutdown_pool_is_idempotent_and_pool_restarts():
    shutdown_pool()
    shutdown_pool()
    assert scorers._pool is None
    assert score_batch("math", ["72"], ["72"]) == [1.0]


def test_pool_recovers_when_its_workers_died_between_calls():
    assert score_batch("math", ["72"], ["72"]) == [1.0]
    for process in list(scorers._pool._processes.values()):
        process.kill()
        process.join()
    assert score_batch("math", ["\\boxed{72}", "71"], ["72", "72"]) == [1.0, 0.0]
