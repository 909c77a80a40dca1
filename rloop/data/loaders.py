"""Load prompt/answer datasets (JSONL or verl-style parquet) into `Example` records.

Files are opened through fsspec so that local paths and object-store URLs (s3://...) behave the
same. pyarrow is imported only when a parquet file is read, to keep this module light for the
verifier worker processes that import it indirectly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import fsspec

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("jsonl", "parquet")

# Fields that load_examples turns into Example attributes; everything else in a JSONL record
# lands in Example.extra so custom verifiers can still read it.
_CONSUMED_FIELDS = frozenset({"id", "data_source", "reward_model", "extra_info"})

# GSM8K marks the final answer with "#### "; only that marker counts, not "###" headings.
_GSM8K_MARKER = "#### "
# A thousands separator between digits ("1,000"), which GSM8K uses inconsistently.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class DataError(ValueError):
    """A dataset file cannot be read into examples; the message says where and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One prompt with its verifiable ground-truth answer.

    `messages` keeps a chat-style prompt (tuple of {"role", "content"} dicts) when the source had
    one; `prompt` is then the message contents joined with newlines.
    """

    id: str
    prompt: str
    answer: str
    data_source: str = ""
    extra: dict = field(default_factory=dict)
    messages: tuple | None = None


def load_examples(
    path: str,
    *,
    fmt: str = "auto",
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    limit: int | None = None,
    storage_options: dict | None = None,
) -> list[Example]:
    """Read up to `limit` examples from a JSONL or verl-style parquet file (local or remote).

    Raises DataError for a missing file, an unknown format, or a row without a prompt or answer.
    """
    resolved = _resolve_format(path, fmt)
    reader = _iter_jsonl if resolved == "jsonl" else _iter_parquet
    examples: list[Example] = []
    # closing(): stopping early at `limit` must still close the file the generator holds open.
    with closing(reader(path, storage_options)) as records:
        for row, record in records:
            if limit is not None and len(examples) >= limit:
                break
            examples.append(_record_to_example(record, row, path, prompt_key, answer_key))
    return examples


def _resolve_format(path: str, fmt: str) -> str:
    """Pick the reader from `fmt`, or from the file suffix when fmt is "auto"."""
    if fmt in FORMATS:
        return fmt
    if fmt != "auto":
        raise DataError(f"{path}: unknown format {fmt!r}; use one of {('auto', *FORMATS)}")
    # Compressed files are decompressed by fsspec (compression="infer"), so look past .gz etc.
    name = re.sub(r"\.(gz|bz2|xz|zst)$", "", path.lower())
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise DataError(
        f"{path}: cannot tell the format from the file name; expected a suffix in "
        f"{JSONL_SUFFIXES + PARQUET_SUFFIXES}, or set the format explicitly (fmt='jsonl' or 'parquet')"
    )


def _open(path: str, storage_options: dict | None, mode: str):
    """Open `path` through fsspec, turning a missing file into a DataError."""
    kwargs = dict(storage_options or {})
    if "t" in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        return fsspec.open(path, mode, compression="infer", **kwargs).open()
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: file not found; check the dataset path (and bucket/credentials for s3://)"
        ) from exc


def _iter_jsonl(path: str, storage_options: dict | None) -> Iterator[tuple[int, dict]]:
    """Yield (row number, record) for each non-blank line; rows count from 0."""
    with _open(path, storage_options, "rt") as handle:
        row = 0
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {row} (line {line_no}) is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}: row {row} (line {line_no}) must be a JSON object, got {type(record).__name__}"
                )
            yield row, record
            row += 1


def _iter_parquet(path: str, storage_options: dict | None) -> Iterator[tuple[int, dict]]:
    """Yield (row number, record) from a parquet file, batch by batch so a `limit` reads little."""
    import pyarrow.parquet as pq  # deferred: heavy, and only parquet needs it

    with _open(path, storage_options, "rb") as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
            raise DataError(
                f"{path}: not a readable parquet file ({exc}); check the path and format"
            ) from exc
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield row, record
                row += 1


def _record_to_example(record: dict, row: int, path: str, prompt_key: str, answer_key: str) -> Example:
    """Build an Example from one raw record (a JSONL object or a parquet row)."""
    prompt, messages = _extract_prompt(record, row, path, prompt_key)
    answer = _extract_answer(record, row, path, answer_key)
    extra = _extract_extra(record, _prompt_field(record, prompt_key), answer_key)
    answer, solution = _split_gsm8k_answer(answer)
    if solution is not None:
        extra["solution"] = solution
    return Example(
        id=_extract_id(record, row, path),
        prompt=prompt,
        answer=answer,
        data_source=str(record.get("data_source") or ""),
        extra=extra,
        messages=messages,
    )


def _extract_prompt(record: dict, row: int, path: str, prompt_key: str) -> tuple[str, tuple | None]:
    """Return (prompt text, chat messages or None) from the record's prompt field."""
    value = record.get(_prompt_field(record, prompt_key))
    if value is None or (isinstance(value, str | list) and not value):
        raise DataError(
            f"{path}: row {row} has no prompt in field {prompt_key!r} (fields: {sorted(record)}); "
            "set promptKey in the dataset spec (e.g. data.train.promptKey) to the field holding the prompt"
        )
    if isinstance(value, str):
        return value, None
    if isinstance(value, list | tuple):
        messages = tuple(_check_message(m, row, path, prompt_key) for m in value)
        return "\n".join(m["content"] for m in messages), messages
    raise DataError(
        f"{path}: row {row} field {prompt_key!r} must be a string or a list of chat messages, "
        f"got {type(value).__name__}; point promptKey (e.g. data.train.promptKey) at the prompt field"
    )


def _prompt_field(record: dict, prompt_key: str) -> str:
    """The field holding the prompt: `prompt_key`, or "question" for raw GSM8K files that lack it."""
    if prompt_key not in record and "question" in record:
        return "question"
    return prompt_key


def _check_message(message: Any, row: int, path: str, prompt_key: str) -> dict:
    """Validate one chat message; verl prompts are lists of {"role", "content"} dicts."""
    if (
        isinstance(message, dict)
        and isinstance(message.get("content"), str)
        and isinstance(message.get("role"), str)
    ):
        return dict(message)
    raise DataError(
        f"{path}: row {row} field {prompt_key!r} holds a chat message without string 'role' and 'content': "
        f"{message!r}; fix the data or point promptKey (e.g. data.train.promptKey) at a plain-text prompt"
    )


def _extract_answer(record: dict, row: int, path: str, answer_key: str) -> str:
    """Return the ground truth from `answer_key`, else from verl's reward_model.ground_truth."""
    value = record.get(answer_key)
    if value is None:
        reward_model = record.get("reward_model")
        if isinstance(reward_model, dict):
            value = reward_model.get("ground_truth")
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value).strip() == "":
        raise DataError(
            f"{path}: row {row} has no usable answer in field {answer_key!r} or reward_model.ground_truth "
            f"(got {value!r}); set answerKey in the dataset spec (e.g. data.train.answerKey) to the answer field"
        )
    return str(value)


def _extract_extra(record: dict, prompt_key: str, answer_key: str) -> dict:
    """Collect extra_info plus any unconsumed top-level fields, for verifiers that need them."""
    extra = dict(record.get("extra_info") or {})
    for key, value in record.items():
        if key not in _CONSUMED_FIELDS and key not in (prompt_key, answer_key):
            extra.setdefault(key, value)
    return extra


def _extract_id(record: dict, row: int, path: str) -> str:
    """Use the record's "id", then extra_info.index, else "<file name>:<row>"."""
    if record.get("id") is not None:
        return str(record["id"])
    extra_info = record.get("extra_info")
    if isinstance(extra_info, dict) and extra_info.get("index") is not None:
        return str(extra_info["index"])
    return f"{path.rstrip('/').rsplit('/', 1)[-1]}:{row}"


def _split_gsm8k_answer(answer: str) -> tuple[str, str | None]:
    """Return (ground truth, full solution or None) for GSM8K-style "...\\n#### 42" answers.

    Only the extracted final answer loses its thousands separators; the solution is kept verbatim.
    """
    if not (answer.startswith(_GSM8K_MARKER) or "\n" + _GSM8K_MARKER in answer):
        return answer, None
    final = answer.rsplit(_GSM8K_MARKER, 1)[1].strip()
    return _THOUSANDS_COMMA.sub("", final), answer
