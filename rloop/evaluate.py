"""Evaluation metrics over sampled answers: pass@k, avg@n, forgetting, coverage, diversity.

Pure python + numpy on purpose (no torch): the operator and report tooling import this to summarise
stored results without pulling in the trainer stack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

    n samples of which c are correct; returns 1 - C(n-c, k) / C(n, k), the probability that a random
    k-subset of the n samples contains at least one correct one.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i): the binomials themselves overflow floats for
    n in the hundreds, the product form does not. n - c < k means every k-subset holds a correct
    sample, so the result is exactly 1.0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of samples n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n], got c={c}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_n(correct: Sequence[Sequence[bool | float]]) -> float:
    """avg@n: mean over prompts of the per-prompt mean correctness.

    correct: one sequence per prompt of per-sample correctness (bool or a score in [0, 1]).
    Averaging per prompt first keeps prompts with more samples from weighing more.
    """
    if len(correct) == 0:
        raise ValueError("avg_at_n needs at least one prompt")
    per_prompt = []
    for i, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"prompt {i} has no samples")
        per_prompt.append(sum(float(x) for x in samples) / len(samples))
    return sum(per_prompt) / len(per_prompt)


def pass_at_k_mean(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over prompts of pass_at_k(n, c, k); counts holds (n, c) per prompt."""
    if len(counts) == 0:
        raise ValueError("pass_at_k_mean needs at least one prompt")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def forgetting_rate(before: Mapping[str, bool], after: Mapping[str, bool]) -> float | None:
    """Share of previously solved prompts that are no longer solved.

    Over the prompt ids present in both mappings:
        forgetting_rate = #{solved before and not solved after} / #{solved before}
    Prompts only in one mapping are ignored (they cannot be compared). Returns None when no common
    prompt was solved before, since the rate is then undefined rather than 0.
    """
    common = before.keys() & after.keys()
    solved_before = [pid for pid in common if before[pid]]
    if not solved_before:
        return None
    forgotten = sum(1 for pid in solved_before if not after[pid])
    return forgotten / len(solved_before)


def coverage(solved_by_step: Mapping[str, Sequence[tuple[int, bool]]]) -> dict[str, float]:
    """How many prompts the policy has ever solved, and how many it still solves.

    solved_by_step: prompt id -> (step, correct) for every trajectory sampled for that prompt.
    returns:
        union_coverage: share of prompts with a correct trajectory at any step
        final_coverage: share of prompts with a correct trajectory at that prompt's last sampled step
    A prompt with no trajectories counts as uncovered in both. The gap between the two shows
    solutions that were found during training and later lost.
    """
    if len(solved_by_step) == 0:
        raise ValueError("coverage needs at least one prompt")
    union = final = 0
    for trajectories in solved_by_step.values():
        if not trajectories:
            continue
        union += any(ok for _, ok in trajectories)
        last_step = max(step for step, _ in trajectories)
        final += any(ok for step, ok in trajectories if step == last_step)
    total = len(solved_by_step)
    return {"union_coverage": union / total, "final_coverage": final / total}


def _char_ngrams(text: str, n: int) -> frozenset[str]:
    """Set of character n-grams of text; a text shorter than n is its own single 'gram', so that two
    identical short texts still compare as 1.0 and different ones as 0.0."""
    if len(text) < n:
        return frozenset([text])
    return frozenset(text[i : i + n] for i in range(len(text) - n + 1))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| (inputs are never both empty, see _char_ngrams)."""
    return len(a & b) / len(a | b)


def ngram_self_similarity(responses: Sequence[str], n: int = 2) -> float | None:
    """Mean pairwise Jaccard similarity of the character n-gram sets of one prompt's responses.

    1.0 means all responses share the same n-grams (e.g. identical); values near 0 mean diverse answers.
    Returns None for fewer than 2 responses (no pairs).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(responses) < 2:
        return None
    grams = [_char_ngrams(r, n) for r in responses]
    sims = [_jaccard(a, b) for a, b in combinations(grams, 2)]
    return sum(sims) / len(sims)


def mean_self_similarity(groups: Sequence[Sequence[str]], n: int = 2) -> float | None:
    """Mean of ngram_self_similarity over the groups that have a value (>= 2 responses); None if none do."""
    values = [v for v in (ngram_self_similarity(g, n) for g in groups) if v is not None]
    if not values:
        return None
    return sum(values) / len(values)


def horizon_reached(history: Sequence[float], patience: int) -> bool:
    """The adaptive RL horizon: True when the last `patience` values of `history` (validation pass@k per
    evaluation, the first taken before any RL step) brought no new best over everything before them.

    A tie is not an improvement, so a flat curve ends the horizon as well as a falling one.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if len(history) <= patience:
        return False
    return max(history[-patience:]) <= max(history[:-patience])
