"""Unit tests for rloop.evaluate: pass@k by exhaustive enumeration, the rest by hand values."""

import subprocess
import sys
from fractions import Fraction
from itertools import combinations
from math import comb

import pytest

from rloop.evaluate import (
    avg_at_n,
    coverage,
    forgetting_rate,
    mean_self_similarity,
    ngram_self_similarity,
    pass_at_k,
    pass_at_k_mean,
)


def enumerate_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c correct) that contain a correct one, by brute force."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n,c,k",
    [
        (5, 0, 1),
        (5, 0, 3),
        (5, 5, 3),
        (5, 2, 1),
        (5, 2, 2),
        (5, 2, 4),
        (5, 2, 5),
        (6, 3, 2),
        (7, 3, 5),
        (10, 1, 3),
        (10, 7, 4),
        (4, 4, 4),
        (4, 0, 4),
        (1, 1, 1),
        (1, 0, 1),
    ],
)
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(enumerate_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values_and_large_n():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # k=1 is c/n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    # n in the hundreds: binomials are ~1e139, product form still matches the exact rational value
    exact = 1 - Fraction(comb(990, 100), comb(1000, 100))
    assert pass_at_k(1000, 10, 100) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match=r"k=6.*n=5"):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_pass_at_k_mean():
    # per prompt: (4,1,k=2) -> 0.5, (4,0) -> 0, (4,4) -> 1 -> mean 0.5
    assert pass_at_k_mean([(4, 1), (4, 0), (4, 4)], k=2) == pytest.approx(0.5)
    # (5,2,k=1) -> 0.4, (10,1,k=1) -> 0.1 -> 0.25
    assert pass_at_k_mean([(5, 2), (10, 1)], k=1) == pytest.approx(0.25)


def test_avg_at_n_averages_per_prompt_first():
    # per prompt 3/4, 0, 0.75 -> 0.5 (pooling all 8 samples would give 4.5/8 = 0.5625)
    correct = [[True, False, True, True], [False, False], [1.0, 0.5]]
    assert avg_at_n(correct) == pytest.approx(0.5)
    assert avg_at_n([[True]]) == 1.0
    with pytest.raises(ValueError):
        avg_at_n([])


def test_forgetting_rate():
    before = {"a": True, "b": True, "c": False, "d": True, "e": True}
    after = {"a": True, "b": False, "c": True, "d": False, "f": True}
    # common: a b c d; solved before: a b d; lost: b d -> 2/3 ("e" has no after, "f" no before)
    assert forgetting_rate(before, after) == pytest.approx(2 / 3)
    assert forgetting_rate({"a": True}, {"a": True}) == 0.0
    assert forgetting_rate({"a": False}, {"a": True}) is None
    assert forgetting_rate({"a": True}, {"b": False}) is None


def test_coverage():
    solved = {
        "p1": [(0, False), (1, True), (2, False)],  # solved once, lost at its last step 2
        "p2": [(0, False), (1, False), (2, True), (2, False)],  # solved at last step 2
        "p3": [(0, False)],  # never
        "p4": [(5, True), (3, False)],  # unordered input: last step is 5, solved there
    }
    assert coverage(solved) == {"union_coverage": pytest.approx(0.75), "final_coverage": pytest.approx(0.5)}
    assert coverage({"p": []}) == {"union_coverage": 0.0, "final_coverage": 0.0}


def test_ngram_self_similarity_hand_values():
    assert ngram_self_similarity(["ab", "ab"]) == 1.0
    # {ab, bc} vs {ab, bd}: 1 shared of 3 -> 1/3
    assert ngram_self_similarity(["abc", "abd"]) == pytest.approx(1 / 3)
    # pairs: abc-abd 1/3, abc-xyz 0, abd-xyz 0 -> 1/9
    assert ngram_self_similarity(["abc", "abd", "xyz"]) == pytest.approx(1 / 9)
    # n=1: {a, b} vs {a, b, c} -> 2/3
    assert ngram_self_similarity(["aab", "abc"], n=1) == pytest.approx(2 / 3)
    # shorter than n: whole string is the single gram
    assert ngram_self_similarity(["a", "a"]) == 1.0
    assert ngram_self_similarity(["a", "b"]) == 0.0
    assert ngram_self_similarity(["only one"]) is None
    assert ngram_self_similarity([]) is None


def test_mean_self_similarity():
    # groups: 1.0, 1/3, (single -> skipped) -> 2/3
    assert mean_self_similarity([["ab", "ab"], ["abc", "abd"], ["solo"]]) == pytest.approx(2 / 3)
    assert mean_self_similarity([["solo"]]) is None
    assert mean_self_similarity([]) is None


def test_evaluate_does_not_import_torch():
    code = "import sys, rloop.evaluate; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
