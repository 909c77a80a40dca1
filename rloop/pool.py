"""Trajectory rows: the one place that builds a pool row and decides what counts as correct.

The RL stage (every trajectory of every step), the checkpoint-rollout stage and evaluation all write
rows built here, so the verify stage, RFT and the report read one schema. Rows carry the exact prompt
and response token ids that were sampled: RFT trains on those ids, never on re-tokenized text.

Light on purpose (no torch): the report and the verify stage import it.
"""

from __future__ import annotations

from typing import Any

# Columns RFT needs from an expert row; a pool written without them cannot be trained on exactly.
TOKEN_COLUMNS = ("prompt_token_ids", "response_token_ids")


def is_correct(score: float | None) -> bool:
    """A verifier score of 1.0 (or more) is a success; None (unscorable) never is."""
    return score is not None and score >= 1.0


def trajectory_row(example, prompt_text: str, prompt_token_ids: list[int], completion, score: float | None,
                   **extra: Any) -> dict[str, Any]:
    """One sampled response as a pool/eval row.

    `example` is an `rloop.data.Example`, `completion` an `rloop.rollout.Completion`; `extra` adds
    stage-specific columns (step, reward, sample, checkpoint).
    """
    return {
        "prompt_id": example.id,
        "prompt": prompt_text,
        "response": completion.text,
        "score": score,
        "correct": is_correct(score),
        "response_tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "ground_truth": example.answer,
        "prompt_token_ids": list(prompt_token_ids),
        "response_token_ids": list(completion.token_ids),
        **extra,
    }
