"""Kubernetes-style conditions as plain camelCase dicts (what the status subresource stores).

`lastTransitionTime` changes only when a condition's status changes (API conventions): a reconcile
pass that finds nothing new then writes back an equal list, so "status changed?" is plain equality.
"""

from __future__ import annotations

from typing import Any

CONDITION_TYPES = ("Ready", "Progressing", "Succeeded", "Failed", "Suspended")
"""Every RLoopRun status carries all five, always True or False."""


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    """The condition of that type, or None."""
    for c in conditions or []:
        if isinstance(c, dict) and c.get("type") == type_:
            return c
    return None


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    c = get_condition(conditions, type_)
    return c is not None and c.get("status") == "True"


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type: str,  # the API field's name, though it shadows the builtin
    status: str,
    reason: str,
    message: str,
    now: str,
    observed_generation: int | None,
) -> list[dict[str, Any]]:
    """A new list with the condition of `type` set; the input is not modified.

    The condition keeps its position (or is appended); its lastTransitionTime is kept when `status` is
    unchanged and becomes `now` when it changes or the condition is new."""
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    old = get_condition(conditions, type)
    keep_time = old is not None and old.get("status") == status and old.get("lastTransitionTime")
    new: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"] if keep_time else now,
    }
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    out: list[dict[str, Any]] = []
    replaced = False
    for c in conditions or []:
        if isinstance(c, dict) and c.get("type") == type:
            if not replaced:
                out.append(new)
                replaced = True
            continue  # a duplicate of the type (hand-edited status) is dropped
        out.append(dict(c) if isinstance(c, dict) else c)
    if not replaced:
        out.append(new)
    return out
