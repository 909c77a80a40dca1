"""The RLoop filter (pool -> expert set) and the eval metrics, on hand-built pools."""

from __future__ import annotations

import pytest

from rloop.spec import FilterSpec
from rloop.stages.eval import eval_metrics
from rloop.stages.verify import select_experts


def row(pid: str, response: str, correct: bool, step: int = 0, finish: str = "stop") -> dict:
    return {"prompt_id": pid, "prompt": f"prompt-{pid}", "response": response, "correct": correct, "step": step,
            "finish_reason": finish}


# a: mastered (4/4), solved at the last step      -> union yes, final yes
# b: 3/4 correct at step 0, only wrong at step 1  -> union yes, final no; "12 " duplicates "12"
# c: never solved                                 -> union no,  final no
# d: 6 distinct correct of 8 (6/8), all at step 1 -> union yes, final yes
POOL = [
    row("a", "5", True, 0), row("a", "5", True, 0), row("a", "5", True, 1), row("a", "14", True, 1),
    row("b", "12", True, 0), row("b", "12 ", True, 0), row("b", "21", True, 0), row("b", "3", False, 1),
    row("c", "1", False, 0), row("c", "2", False, 1),
    *(row("d", str(i), True, 1) for i in range(1, 7)), row("d", "7", False, 1), row("d", "8", False, 1),
]


def test_truncated_correct_responses_are_left_out_unless_asked():
    """A correct answer cut off at the generation cap: RFT on it (with or without an EOS) would teach the
    model to stop mid-solution, so by default it is no expert, though it still counts for the pass rate."""
    pool = [row("p", "42", True), row("p", "4 + 38 = 42 and th", True, finish="length"), row("p", "7", False),
            row("q", "6 * 7 = 42, so the ans", True, finish="length"), row("q", "1", False)]
    experts, stats = select_experts(pool, FilterSpec(max_pass_rate=0.7))
    assert by_prompt(experts) == {"p": ["42"]}
    assert experts[0]["pool_pass_rate"] == pytest.approx(2 / 3)  # the truncated success counts as solved
    assert stats["truncated_correct"] == 2 and stats["expert_prompts"] == 1
    experts, _ = select_experts(pool, FilterSpec(max_pass_rate=0.7, include_truncated=True))
    assert by_prompt(experts) == {"p": ["42", "4 + 38 = 42 and th"], "q": ["6 * 7 = 42, so the ans"]}


def by_prompt(experts):
    out: dict[str, list[str]] = {}
    for e in experts:
        out.setdefault(e["prompt_id"], []).append(e["response"])
    return out


def test_filter_drops_mastered_prompts_dedups_and_caps():
    experts, stats = select_experts(POOL, FilterSpec(max_pass_rate=0.75, max_per_prompt=3, dedup=True, seed=0))
    got = by_prompt(experts)
    assert set(got) == {"b", "d"}  # a is over the pass-rate bar, c has nothing correct
    assert got["b"] == ["12", "21"]  # "12 " is a duplicate of "12" (whitespace-stripped); the first is kept
    assert len(got["d"]) == 3 and set(got["d"]) <= {"1", "2", "3", "4", "5", "6"}
    assert all(e["correct"] and e["pool_pass_rate"] == 0.75 for e in experts)
    assert all(e["step"] in (0, 1) and e["prompt"] == f"prompt-{e['prompt_id']}" for e in experts)
    assert stats == {
        "pool_trajectories": 18,
        "pool_correct": 13,
        "pool_prompts": 4,
        "prompts_over_max_pass_rate": 1,
        "expert_prompts": 2,
        "expert_trajectories": 5,
        "truncated_correct": 0,
        "distinct_correct_responses": 10,  # a: 5, 14; b: 12, 21; d: 1..6
        "union_coverage": 0.75,
        "final_coverage": 0.5,
    }


def test_filter_defaults_keep_mastered_prompts():
    experts, stats = select_experts(POOL, FilterSpec())  # maxPassRate 1.0, maxPerPrompt 4, dedup on
    got = by_prompt(experts)
    assert got["a"] == ["5", "14"]
    assert got["b"] == ["12", "21"]
    assert len(got["d"]) == 4
    assert stats["prompts_over_max_pass_rate"] == 0 and stats["expert_prompts"] == 3
    assert stats["expert_trajectories"] == 8


def test_filter_without_dedup_keeps_repeats():
    experts, _ = select_experts(POOL, FilterSpec(max_per_prompt=8, dedup=False))
    got = by_prompt(experts)
    assert got["a"] == ["5", "5", "5", "14"]
    assert got["b"] == ["12", "12 ", "21"]
    assert got["d"] == ["1", "2", "3", "4", "5", "6"]  # under the cap: all, in pool order


def test_per_prompt_cap_is_deterministic_in_seed():
    pick = [
        by_prompt(select_experts(POOL, FilterSpec(max_per_prompt=3, seed=s))[0])["d"] for s in range(10)
    ]
    again = by_prompt(select_experts(list(POOL), FilterSpec(max_per_prompt=3, seed=0))[0])["d"]
    assert again == pick[0]
    assert len({tuple(sorted(p)) for p in pick}) > 1  # the seed does choose among the candidates


def test_filter_max_pass_rate_zero_keeps_nothing_solvable():
    experts, stats = select_experts(POOL, FilterSpec(max_pass_rate=0.0))
    assert experts == []
    assert stats["prompts_over_max_pass_rate"] == 3 and stats["expert_prompts"] == 0


def test_pool_without_steps_has_no_coverage():
    pool = [{k: v for k, v in r.items() if k != "step"} for r in POOL]
    _, stats = select_experts(pool, FilterSpec())
    assert "union_coverage" not in stats and "final_coverage" not in stats


def eval_row(pid: str, response: str, correct: bool) -> dict:
    return {"prompt_id": pid, "response": response, "correct": correct}


def test_eval_metrics_by_hand():
    # p1: 2 of 4 correct, identical responses; p2: 0 of 4 correct, responses x/y alternating
    rows = [eval_row("p1", "ab", c) for c in (True, True, False, False)]
    rows += [eval_row("p2", r, False) for r in ("x", "y", "x", "y")]
    m = eval_metrics(rows, [1, 2, 4], prev_rows=None)
    assert m["num_prompts"] == 2 and m["n"] == 4
    assert m["avg_at_n"] == pytest.approx((0.5 + 0.0) / 2)
    # pass@1 = avg@n; pass@2 for p1 = 1 - C(2,2)/C(4,2) = 5/6, for p2 = 0; pass@4 for p1 = 1
    assert m["pass_at_k"] == pytest.approx({"1": 0.25, "2": 5 / 12, "4": 0.5})
    # bigram Jaccard: p1 all identical -> 1; p2 pairs (x,y,x,y): 2 of 6 pairs equal -> 1/3
    assert m["self_similarity"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["forgetting_rate"] is None

    # before: p1 solved, p2 solved, p3 solved (not evaluated now: ignored), p4 unsolved
    prev = [eval_row("p1", "ab", True), eval_row("p1", "ab", False), eval_row("p2", "x", True),
            eval_row("p3", "z", True), eval_row("p4", "w", False)]
    m = eval_metrics(rows, [1], prev_rows=prev)
    assert m["forgetting_rate"] == pytest.approx(0.5)  # p2 forgotten, p1 kept
    nothing_before = [eval_row("p1", "ab", False), eval_row("p2", "x", False)]
    assert eval_metrics(rows, [1], prev_rows=nothing_before)["forgetting_rate"] is None
    assert eval_metrics(rows, [1], prev_rows=[eval_row("p1", "ab", True)])["forgetting_rate"] == 0.0
