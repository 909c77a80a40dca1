"""The built-in *subset-sum* task: a tiny verifiable problem with several correct answers.

A prompt such as ``38152/09:`` lists five digits 1-9, then a two-digit target. A correct answer is
any non-empty selection of the listed digits (each position at most once) that sums to the target,
written as a digit string in any order, so both "81" and "18" answer ``38152/09:``.

Splits are separated by digit *multiset*: a hash of the sorted digits puts every multiset into one
of four buckets (train, heldout, warm-up, validation), so no ordering or target of a heldout list can
ever appear in training, whatever the seeds and sizes. `heldout` is the *shifted* test: digit lists
the policy never trained on. `indist` is the *in-distribution* test: the train set's own digit lists
with targets no train prompt asks for (unseen prompts from the distribution RL trained on).
`validation` (its own bucket) is for decisions taken during training, such as the adaptive RL horizon,
so no reported test set ever steers a run.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from functools import cache

from rloop.data.loaders import Example

NUM_DIGITS = 5
DIGIT_CHOICES = "123456789"
# Every character a prompt or an answer can contain (for tokenizers built from this task alone).
PROMPT_CHARS = "0123456789/:"
VOCAB = PROMPT_CHARS
DATA_SOURCE = "synthetic/subset-sum"

_NUM_BUCKETS = 4
_SPLIT_BUCKETS = {"train": 0, "heldout": 1, "validation": 3}
_WARMUP_BUCKET = 2
SPLITS = ("train", "heldout", "validation", "indist")
_PROMPT_RE = re.compile(r"([1-9]+)/(\d+):")
_LEADING_DIGITS = re.compile(r"\d*")

# (sorted digits) -> {target: distinct sub-multisets (sorted digit tuples) summing to it}
SubsetTable = dict[int, tuple[tuple[int, ...], ...]]


def format_prompt(digits: str, target: int) -> str:
    """Render the prompt text, e.g. ("38152", 9) -> "38152/09:"."""
    return f"{digits}/{target:02d}:"


def parse_prompt(prompt: str) -> tuple[str, int] | None:
    """Return (digits, target) from the last "digits/target:" in `prompt`, or None.

    The last match is used because chat templates or few-shot examples may precede the question.
    """
    matches = _PROMPT_RE.findall(prompt)
    if not matches:
        return None
    digits, target = matches[-1]
    return digits, int(target)


def make_split(split: str, size: int, seed: int, *, train_size: int | None = None) -> list[Example]:
    """Return `size` distinct subset-sum examples of `split` (one of SPLITS), reproducibly.

    Each prompt's digit list is drawn uniformly from the split's bucket and its target uniformly
    among the list's reachable sums. `indist` needs `train_size`: it reuses the digit lists of
    make_split("train", train_size, seed).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown subset-sum split {split!r}; use one of {list(SPLITS)}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if split == "indist":
        if train_size is None:
            raise ValueError("the indist split needs train_size (the size of the train split it shares digit lists with)")
        return _indist_split(size, seed, train_size)
    bucket = _SPLIT_BUCKETS[split]
    available = _num_prompts(bucket)
    if size > available:
        raise ValueError(f"subset-sum split {split!r} has only {available} distinct prompts; got size={size}")
    rng = random.Random(f"subset-sum/{split}/{seed}")
    pairs = _sample_distinct_prompts(bucket, size, rng)
    return [_make_example(split, seed, i, digits, target) for i, (digits, target) in enumerate(pairs)]


def _indist_split(size: int, seed: int, train_size: int) -> list[Example]:
    """`size` prompts on the digit lists of the train split (train_size, seed) whose (list, target) pair is
    not a train prompt, drawn uniformly from all such pairs."""
    train = make_split("train", train_size, seed)
    asked = {(e.extra["digits"], e.extra["target"]) for e in train}
    lists = list(dict.fromkeys(e.extra["digits"] for e in train))
    unseen = [(d, t) for d in lists for t in sorted(_subset_table(_sorted_key(d))) if (d, t) not in asked]
    if size > len(unseen):
        raise ValueError(f"subset-sum split 'indist' has only {len(unseen)} distinct prompts for a train split of "
                         f"{train_size}; got size={size}")
    rng = random.Random(f"subset-sum/indist/{seed}/{train_size}")
    return [_make_example("indist", seed, i, d, t) for i, (d, t) in enumerate(rng.sample(unseen, size))]


def warmup_pairs(num: int, seed: int) -> list[tuple[str, str]]:
    """Return `num` random (prompt, correct answer) pairs from the warm-up bucket only.

    The answer is drawn uniformly among all distinct correct selections and written in a random
    order, so a policy warmed up on these pairs starts out diverse rather than canonical.
    """
    rng = random.Random(f"subset-sum/warmup/{seed}")
    lists = _lists_in_bucket(_WARMUP_BUCKET)
    pairs = []
    for _ in range(num):
        digits, target = _draw_prompt(lists, rng)
        subset = list(rng.choice(_subset_table(_sorted_key(digits))[target]))
        rng.shuffle(subset)
        pairs.append((format_prompt(digits, target), "".join(map(str, subset))))
    return pairs


def canonical_answer(digits: str, target: int) -> str:
    """One fixed correct answer: the fewest digits, earliest positions first, in prompt order."""
    values = [int(d) for d in digits]
    for length in range(1, len(values) + 1):
        for positions in itertools.combinations(range(len(values)), length):
            if sum(values[p] for p in positions) == target:
                return "".join(digits[p] for p in positions)
    raise ValueError(f"target {target} is not reachable from digits {digits}")


def score_subset_sum(
    response: str,
    ground_truth: str,
    *,
    digits: str | None = None,
    target: int | None = None,
    prompt: str | None = None,
) -> float | None:
    """1.0 iff the response's leading digit run is a valid selection summing to the target.

    Leading whitespace is skipped and the answer ends at the first non-digit, so "81\\n..." and
    "81 because" both count as "81". Digits/target come from the kwargs, else from `prompt`;
    without either the response is unscorable (None). `ground_truth` is only one of possibly many
    correct answers, so it is not compared against.
    """
    if (digits is None or target is None) and prompt is not None:
        parsed = parse_prompt(prompt)
        if parsed is not None:
            digits = digits if digits is not None else parsed[0]
            target = target if target is not None else parsed[1]
    if digits is None or target is None:
        return None
    answer = _LEADING_DIGITS.match(response.lstrip()).group()
    if not answer:
        return 0.0
    if any(answer.count(d) > str(digits).count(d) for d in set(answer)):
        return 0.0
    return 1.0 if sum(int(d) for d in answer) == int(target) else 0.0


def _make_example(split: str, seed: int, index: int, digits: str, target: int) -> Example:
    """Wrap one prompt as an Example with a canonical answer and its raw fields in `extra`."""
    return Example(
        id=f"subset-sum/{split}/{seed}/{index}",
        prompt=format_prompt(digits, target),
        answer=canonical_answer(digits, target),
        data_source=DATA_SOURCE,
        extra={"digits": digits, "target": target},
    )


def _sample_distinct_prompts(bucket: int, size: int, rng: random.Random) -> list[tuple[str, int]]:
    """Draw `size` distinct (digits, target) prompts from `bucket`.

    Rejection sampling keeps the list-then-target distribution; once more than half of all prompts
    are wanted it would crawl (coupon collector), so then sample the full enumeration instead.
    """
    if size > _num_prompts(bucket) // 2:
        return rng.sample(_all_prompts(bucket), size)
    lists = _lists_in_bucket(bucket)
    seen: set[tuple[str, int]] = set()
    pairs = []
    while len(pairs) < size:
        pair = _draw_prompt(lists, rng)
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def _draw_prompt(lists: tuple[str, ...], rng: random.Random) -> tuple[str, int]:
    """A digit list uniform over `lists`, then a target uniform over its reachable sums."""
    digits = rng.choice(lists)
    target = rng.choice(sorted(_subset_table(_sorted_key(digits))))
    return digits, target


def _sorted_key(digits: str) -> str:
    """The multiset identity of a digit list: its digits sorted."""
    return "".join(sorted(digits))


@cache
def _bucket_of(sorted_digits: str) -> int:
    """Stable bucket of a digit multiset (sha256, so independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(sorted_digits.encode()).digest()[:8], "big") % _NUM_BUCKETS


@cache
def _lists_in_bucket(bucket: int) -> tuple[str, ...]:
    """All ordered digit lists whose multiset hashes to `bucket`, in a fixed order."""
    lists = ("".join(p) for p in itertools.product(DIGIT_CHOICES, repeat=NUM_DIGITS))
    return tuple(d for d in lists if _bucket_of(_sorted_key(d)) == bucket)


@cache
def _subset_table(sorted_digits: str) -> SubsetTable:
    """Map each reachable sum to the distinct sub-multisets of `sorted_digits` that reach it."""
    values = [int(d) for d in sorted_digits]
    table: dict[int, set[tuple[int, ...]]] = {}
    for length in range(1, len(values) + 1):
        for subset in itertools.combinations(values, length):
            table.setdefault(sum(subset), set()).add(subset)
    return {total: tuple(sorted(subsets)) for total, subsets in table.items()}


@cache
def _num_prompts(bucket: int) -> int:
    """How many distinct prompts `bucket` can produce (lists times their reachable sums)."""
    return sum(len(_subset_table(_sorted_key(d))) for d in _lists_in_bucket(bucket))


def _all_prompts(bucket: int) -> list[tuple[str, int]]:
    """Every (digits, target) prompt of `bucket`, in a fixed order."""
    return [(d, t) for d in _lists_in_bucket(bucket) for t in sorted(_subset_table(_sorted_key(d)))]
