"""Verifiable rewards: score model responses against ground truths."""

from rloop.verify.scorers import (
    VERIFIERS,
    Verifier,
    get_verifier,
    register_verifier,
    score_batch,
    score_exact,
    score_math,
    shutdown_pool,
)

__all__ = [
    "VERIFIERS",
    "Verifier",
    "get_verifier",
    "register_verifier",
    "score_batch",
    "score_exact",
    "score_math",
    "shutdown_pool",
]
