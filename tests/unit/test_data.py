"""Tests for rloop.data: file loaders and the synthetic subset-sum task."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rloop.data import DataError, Example, load_examples, synthetic
from rloop.data.synthetic import make_split, parse_prompt, score_subset_sum, warmup_pairs

GSM8K_DIR = Path(__file__).resolve().parents[1] / "data" / "gsm8k"
TEST_SAMPLE = GSM8K_DIR / "test-sample.jsonl"
TRAIN_SAMPLE = GSM8K_DIR / "train-sample.jsonl"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _reachable(digits: str, target: int) -> bool:
    """Brute force, independent of the module: does some non-empty selection sum to target?"""
    values = [int(d) for d in digits]
    return any(
        sum(combo) == target for n in range(1, len(values) + 1) for combo in itertools.combinations(values, n)
    )


# --------------------------------------------------------------------------- JSONL / GSM8K


def test_gsm8k_jsonl_sample_loads_with_final_answer_as_ground_truth():
    examples = load_examples(str(TEST_SAMPLE))
    first_raw = json.loads(TEST_SAMPLE.read_text(encoding="utf-8").splitlines()[0])

    assert len(examples) == 200
    first = examples[0]
    assert first.prompt == first_raw["question"]
    assert first.answer == first_raw["answer"].rsplit("#### ", 1)[1].strip() == "18"
    assert first.extra["solution"] == first_raw["answer"]
    assert first.id == "test-sample.jsonl:0"
    assert first.messages is None
    assert len({e.id for e in examples}) == 200


def test_gsm8k_answers_are_plain_numbers_without_thousands_separators():
    examples = load_examples(str(TEST_SAMPLE)) + load_examples(str(TRAIN_SAMPLE))
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", e.answer) for e in examples)
    with_comma = [e for e in examples if "#### 2,125" in e.extra["solution"]]
    assert with_comma and with_comma[0].answer == "2125"


def test_limit_stops_early():
    assert [e.id for e in load_examples(str(TRAIN_SAMPLE), limit=3)] == [
        f"train-sample.jsonl:{i}" for i in range(3)
    ]
    assert load_examples(str(TRAIN_SAMPLE), limit=0) == []


def test_jsonl_custom_keys_id_field_and_extra_fields(tmp_path):
    path = _write_jsonl(
        tmp_path / "custom.jsonl", [{"id": "q-1", "problem": "1+1?", "solution": 2, "difficulty": "easy"}]
    )
    (example,) = load_examples(str(path), prompt_key="problem", answer_key="solution")
    assert example == Example(id="q-1", prompt="1+1?", answer="2", extra={"difficulty": "easy"})


def test_blank_lines_are_skipped_and_rows_count_records(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": "2"}\n', encoding="utf-8")
    assert [e.id for e in load_examples(str(path))] == ["gaps.jsonl:0", "gaps.jsonl:1"]


def test_fsspec_urls_are_supported():
    import fsspec

    with fsspec.open("memory://rloop-test/data.jsonl", "w") as handle:
        handle.write('{"prompt": "p", "answer": "a"}\n')
    (example,) = load_examples("memory://rloop-test/data.jsonl")
    assert (example.id, example.prompt, example.answer) == ("data.jsonl:0", "p", "a")


# --------------------------------------------------------------------------- verl parquet


def _write_verl_parquet(path: Path, prompts: list) -> Path:
    table = pa.table(
        {
            "data_source": ["openai/gsm8k"] * len(prompts),
            "prompt": prompts,
            "ability": ["math"] * len(prompts),
            "reward_model": [{"style": "rule", "ground_truth": str(72 + i)} for i in range(len(prompts))],
            "extra_info": [{"split": "test", "index": 100 + i} for i in range(len(prompts))],
        }
    )
    pq.write_table(table, path)
    return path


def test_verl_parquet_with_chat_prompts_round_trips(tmp_path):
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 8*9?"}],
        [{"role": "user", "content": "What is 73?"}],
    ]
    path = _write_verl_parquet(tmp_path / "test.parquet", chats)

    first, second = load_examples(str(path))
    assert first.prompt == "Be brief.\nWhat is 8*9?"
    assert first.messages == tuple(chats[0])
    assert first.answer == "72" and second.answer == "73"
    assert first.id == "100" and second.id == "101"
    assert first.data_source == "openai/gsm8k"
    assert first.extra == {"split": "test", "index": 100, "ability": "math"}


def test_verl_parquet_with_plain_string_prompts(tmp_path):
    path = _write_verl_parquet(tmp_path / "plain.parquet", ["What is 8*9?"])
    (example,) = load_examples(str(path), limit=5)
    assert (example.prompt, example.messages, example.answer) == ("What is 8*9?", None, "72")


# --------------------------------------------------------------------------- errors


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    assert issubclass(DataError, ValueError)


def test_unknown_format_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="format"):
        load_examples(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="unknown format 'csv'"):
        load_examples(str(TEST_SAMPLE), fmt="csv")


def test_row_without_answer_names_file_row_field_and_fix(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": "no answer"}])
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    message = str(info.value)
    assert "bad.jsonl" in message and "row 1" in message and "'answer'" in message
    assert "data.train.answerKey" in message


def test_row_without_prompt_names_the_prompt_key(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "answer": "1"}])
    with pytest.raises(DataError, match=r"row 0 .*'prompt'.*data\.train\.promptKey"):
        load_examples(str(path))


def test_invalid_json_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 2\)"):
        load_examples(str(path))


def test_malformed_chat_message_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(DataError, match="row 0"):
        load_examples(str(path))


# --------------------------------------------------------------------------- synthetic subset-sum


def test_splits_are_deterministic_per_seed():
    assert make_split("train", 50, seed=3) == make_split("train", 50, seed=3)
    assert make_split("train", 50, seed=3) != make_split("train", 50, seed=4)
    assert warmup_pairs(20, seed=1) == warmup_pairs(20, seed=1)


def test_example_fields_and_prompt_format():
    examples = make_split("heldout", 30, seed=0)
    for i, example in enumerate(examples):
        digits, target = example.extra["digits"], example.extra["target"]
        assert re.fullmatch(r"[1-9]{5}/\d\d:", example.prompt)
        assert example.prompt == f"{digits}/{target:02d}:"
        assert example.id == f"subset-sum/heldout/0/{i}"
        assert example.data_source == "synthetic/subset-sum"
        assert set(example.prompt + example.answer) <= set(synthetic.VOCAB)


def test_prompts_are_distinct_and_targets_reachable_with_correct_canonical_answers():
    examples = make_split("train", 1000, seed=7)
    assert len({e.prompt for e in examples}) == 1000
    for example in examples:
        assert _reachable(example.extra["digits"], example.extra["target"])
        assert score_subset_sum(example.answer, example.answer, prompt=example.prompt) == 1.0


def test_train_heldout_and_warmup_digit_multisets_are_disjoint():
    def multisets(prompts):
        return {"".join(sorted(p.split("/")[0])) for p in prompts}

    train = multisets(e.prompt for e in make_split("train", 3000, seed=0) + make_split("train", 500, seed=9))
    heldout = multisets(
        e.prompt for e in make_split("heldout", 3000, seed=0) + make_split("heldout", 500, seed=9)
    )
    warmup = multisets(p for p, _ in warmup_pairs(3000, seed=0))
    assert train and heldout and warmup
    assert not train & heldout and not train & warmup and not heldout & warmup


def test_warmup_answers_are_correct_and_diverse():
    pairs = warmup_pairs(2000, seed=5)
    assert all(score_subset_sum(answer, answer, prompt=prompt) == 1.0 for prompt, answer in pairs)
    digits, target = parse_prompt(pairs[0][0])
    assert _reachable(digits, target)
    # Random subset choice and random order: the same prompt family yields several answer strings,
    # not only the canonical one.
    canonical = sum(answer == synthetic.canonical_answer(*parse_prompt(p)) for p, answer in pairs)
    assert canonical < len(pairs) * 0.8
    assert len(Counter(len(a) for _, a in pairs)) >= 3


def test_bad_split_and_oversized_requests_raise():
    with pytest.raises(ValueError, match="unknown subset-sum split"):
        make_split("test", 10, seed=0)
    with pytest.raises(ValueError, match=r"has only \d+ distinct prompts"):
        make_split("train", 10**7, seed=0)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("81", 1.0),
        ("18", 1.0),
        ("315", 1.0),
        (" 81\nbecause 8+1=9", 1.0),
        ("81 is it", 1.0),
        ("9", 0.0),  # no 9 in the list
        ("55", 0.0),  # only one 5
        ("", 0.0),
        ("abc", 0.0),
        ("8+1", 0.0),  # the answer ends at "+": just "8"
        ("0081", 0.0),  # 0 is not a listed digit
    ],
)
def test_score_subset_sum_hand_cases(response, expected):
    assert score_subset_sum(response, "81", prompt="38152/09:") == expected
    assert score_subset_sum(response, "81", digits="38152", target=9) == expected


def test_score_subset_sum_is_unscorable_without_digits_and_target():
    assert score_subset_sum("81", "81") is None
    assert score_subset_sum("81", "81", prompt="no task here") is None
    # A chat template around the prompt is fine: the last "digits/target:" counts.
    assert score_subset_sum("81", "81", prompt="user: 11111/05:\nuser: 38152/09:\nassistant:") == 1.0
