"""Conditions: new list each time, transition time kept while the status holds."""

from __future__ import annotations

import copy

import pytest

from rloop_operator.conditions import get_condition, is_true, set_condition

T0, T1 = "2026-11-25T10:00:00Z", "2026-11-25T11:00:00Z"


def test_new_condition_is_appended_with_now():
    out = set_condition([], "Ready", "False", "Running", "1/9 stages committed", T0, 3)
    assert out == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Running",
            "message": "1/9 stages committed",
            "lastTransitionTime": T0,
            "observedGeneration": 3,
        }
    ]


def test_same_status_keeps_the_transition_time_but_updates_the_rest():
    first = set_condition([], "Ready", "False", "Running", "1/9", T0, 1)
    frozen = copy.deepcopy(first)
    second = set_condition(first, "Ready", "False", "Running", "2/9", T1, 2)
    assert first == frozen  # input untouched
    assert second == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Running",
            "message": "2/9",
            "lastTransitionTime": T0,
            "observedGeneration": 2,
        }
    ]


def test_status_change_moves_the_transition_time():
    first = set_condition([], "Succeeded", "False", "Running", "", T0, 1)
    second = set_condition(first, "Succeeded", "True", "Succeeded", "done", T1, 1)
    assert get_condition(second, "Succeeded")["lastTransitionTime"] == T1
    assert is_true(second, "Succeeded") and not is_true(first, "Succeeded")


def test_position_is_kept_other_conditions_untouched_and_duplicates_dropped():
    conds = [
        {"type": "Ready", "status": "False", "reason": "a", "message": "", "lastTransitionTime": T0},
        {"type": "Failed", "status": "False", "reason": "b", "message": "", "lastTransitionTime": T0},
        {"type": "Ready", "status": "True", "reason": "dup", "message": "", "lastTransitionTime": T0},
    ]
    out = set_condition(conds, "Ready", "False", "c", "m", T1, None)
    assert [c["type"] for c in out] == ["Ready", "Failed"]
    assert out[0] == {
        "type": "Ready",
        "status": "False",
        "reason": "c",
        "message": "m",
        "lastTransitionTime": T0,
    }
    assert out[1] == conds[1] and out[1] is not conds[1]


def test_missing_transition_time_is_filled_in():
    out = set_condition([{"type": "Ready", "status": "True"}], "Ready", "True", "r", "", T1, 1)
    assert out[0]["lastTransitionTime"] == T1


def test_get_condition():
    conds = set_condition(None, "Suspended", "True", "Suspended", "", T0, 1)
    assert get_condition(conds, "Suspended")["status"] == "True"
    assert get_condition(conds, "Ready") is None and get_condition(None, "Ready") is None
    assert not is_true(conds, "Ready")


def test_bad_status_is_rejected():
    with pytest.raises(ValueError):
        set_condition([], "Ready", "yes", "r", "", T0, 1)
