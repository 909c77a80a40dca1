"""What every stage needs: its run's spec and store, inputs read only through validated manifests,
prompt rendering, scoring, parquet/JSON helpers, and the exit-code contract."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Exit codes: the contract with both executors lives in rloop.contracts (re-exported for the stages).
from rloop.contracts import (  # noqa: F401  (re-exported for the stages)
    EXIT_CORRUPT_INPUT,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_STORE_UNAVAILABLE,
    RUN_MANIFEST_FILE_ENV,
    RUN_MANIFEST_LEGACY_ENV,
    RUN_MANIFEST_SHA256_ENV,
    manifest_sha256,
)
from rloop.plan import Stage
from rloop.prompts import PromptFormat, PromptFormatError
from rloop.redact import redact_uris
from rloop.spec import MAX_SPEC_JSON, DatasetSpec, RLoopRun, SpecError, parse_run
from rloop.store import CorruptArtifact, MissingArtifact, NotCommitted, RunStore
from rloop.tracking import NO_TRACKING, StageTracker


class InputError(ValueError):
    """Bad user input discovered while running a stage (maps to EXIT_INVALID_INPUT)."""


@dataclass
class StageContext:
    store: RunStore
    run: RLoopRun
    stage: Stage
    tracker: StageTracker = field(default=NO_TRACKING)
    """Experiment trackers of this attempt (`rloop.tracking`), set by `run_stage` on rank 0."""

    @classmethod
    def open(cls, run_uri: str, stage: Stage) -> StageContext:
        store = RunStore.from_uri(run_uri)
        _snapshot_spec_from_env(store)
        try:
            run = parse_run(store.read_spec())
        except SpecError as err:
            raise InputError(f"{run_uri}/spec.json is not a valid RLoopRun:\n{err}") from None
        return cls(store, run, stage)

    @property
    def spec(self):
        return self.run.spec

    @property
    def iteration(self) -> int:
        if self.stage.iteration is None:
            raise InputError(f"stage {self.stage.kind} needs --iteration")
        return self.stage.iteration

    def commit(self, writer, summary: dict[str, Any]):
        """Commit the stage's output. The trackers get the summary first and put their files (TensorBoard
        events, offline W&B runs) into the output, so they are in the manifest and a retry replaces them."""
        self.tracker.before_commit(writer, summary)
        return writer.commit(summary)

    # ------------------------------------------------------------------------------ inputs
    def input_manifest(self, stage_id: str):
        """Deep-validate an input stage. Only a proven corrupt input — a size or sha256 that differs from
        its manifest, an unreadable manifest, a listed file still missing after the store's retry window
        — is invalidated (its manifest moved aside) so the planner re-runs its producer; this stage then
        exits with EXIT_CORRUPT_INPUT. Transient store errors are retried inside `validate` and end as
        StoreUnavailable (EXIT_STORE_UNAVAILABLE), which invalidates nothing."""
        try:
            return self.store.validate(stage_id, deep=True, look_again=True)
        except NotCommitted:
            raise  # nothing to invalidate
        except CorruptArtifact:
            self._invalidate(stage_id)
            raise

    def _invalidate(self, stage_id: str) -> None:
        mpath = f"{stage_id}/_COMMIT.json"
        if self.store.exists(mpath):
            self.store.move(mpath, mpath + ".corrupt")

    def policy_dir(self, policy_path: str) -> Path:
        """Local directory of a committed policy (`iter-000/rft/policy` style path)."""
        stage_id, rel = policy_path.rsplit("/", 1)
        return self.store.local_dir(stage_id, rel, manifest=self.input_manifest(stage_id))

    def read_parquet(self, stage_id: str, rel: str) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_input(stage_id, rel))).to_pylist()

    def read_json(self, stage_id: str, rel: str) -> Any:
        return json.loads(self.read_input(stage_id, rel))

    def read_input(self, stage_id: str, rel: str) -> bytes:
        """One file of a committed input, verified against its manifest (invalidated if it is corrupt)."""
        m = self.input_manifest(stage_id)
        try:
            return self.store.read_verified(stage_id, rel, m)
        except (CorruptArtifact, MissingArtifact):
            self._invalidate(stage_id)
            raise

    def prompt_format(self, tokenizer) -> PromptFormat:
        """How this run turns an example into prompt text and ids (`rloop.prompts`)."""
        try:
            return PromptFormat.for_model(tokenizer, chat_template=self.spec.model.chat_template,
                                          template=self.spec.data.prompt_template)
        except PromptFormatError as err:
            raise InputError(str(err)) from None


MAX_RUN_MANIFEST_BYTES = MAX_SPEC_JSON + 4096
"""The spec is at most MAX_SPEC_JSON as JSON; apiVersion, kind and metadata add well under 4 KiB."""


def _run_manifest_from_env() -> tuple[str, str] | None:
    """(where it came from, text) of the run manifest the executor passed, or None (`rloop run` wrote
    spec.json itself). The operator passes a file (RLOOP_RUN_MANIFEST_FILE, a downward-API volume of the
    pod's annotation) and its sha256 in env; the 0.1 operator passed the text in RLOOP_RUN_MANIFEST."""
    path = os.environ.get(RUN_MANIFEST_FILE_ENV)
    if not path:
        text = os.environ.get(RUN_MANIFEST_LEGACY_ENV)
        return (RUN_MANIFEST_LEGACY_ENV, text) if text else None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RUN_MANIFEST_BYTES + 1)
    except OSError as err:
        raise InputError(f"{RUN_MANIFEST_FILE_ENV}={path}: cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_RUN_MANIFEST_BYTES:
        raise InputError(f"{path}: larger than {MAX_RUN_MANIFEST_BYTES} bytes; no valid RLoopRun is")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; expected the run manifest as JSON") from None
    expected = os.environ.get(RUN_MANIFEST_SHA256_ENV)
    if expected and manifest_sha256(text) != expected:
        # Pod annotations can be edited after the Job was made; the pod's env cannot.
        raise InputError(
            f"{path} is not the manifest the operator made for this Job (its sha256 differs from "
            f"{RUN_MANIFEST_SHA256_ENV}): the pod's rloop.dev/run-manifest annotation was edited; delete the "
            "Job so that the operator makes a new one"
        )
    return path, text


def _snapshot_spec_from_env(store: RunStore) -> None:
    """On Kubernetes nobody runs `rloop run`: the operator passes the resolved manifest (see
    `_run_manifest_from_env`) and the first stage snapshots it as spec.json. Later stages check that the
    snapshot still agrees with it on every field that may not change mid-run."""
    passed = _run_manifest_from_env()
    if passed is None:
        return
    where, text = passed
    try:
        run = parse_run(json.loads(text))
    except (ValueError, SpecError) as err:
        raise InputError(f"{where} is not a valid RLoopRun: {err}") from None
    if store.exists("spec.json"):
        from rloop.spec import immutable_changes

        changed = immutable_changes(parse_run(store.read_spec()).spec, run.spec)
        if changed:
            # Either the spec was edited mid-run (the CRD's CEL rules refuse that on a real cluster) or
            # a new RLoopRun reuses the name of one whose results are still in the store. Never mix them.
            raise InputError(
                f"{', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} from the spec that "
                f"made the results already in {store.uri} "
                "(an edited run, or an earlier RLoopRun of the same name); revert to that spec to resume "
                "them, or use another metadata.name, or delete that store prefix to start over"
            )
    store.write_spec(run.to_wire())


def load_dataset(ds: DatasetSpec, what: str):
    """Examples of a train or eval set; data problems become InputError naming the field."""
    from rloop.data import DataError, load_examples
    from rloop.data.synthetic import make_split

    try:
        if ds.synthetic is not None:
            examples = make_split(ds.synthetic.split, ds.synthetic.size, ds.synthetic.seed,
                                  train_size=ds.synthetic.train_size)
        else:
            examples = load_examples(ds.path, fmt=ds.format, prompt_key=ds.prompt_key, answer_key=ds.answer_key)
    except (DataError, ValueError, FileNotFoundError) as err:
        raise InputError(f"{what}: {err}") from None
    examples = examples[: ds.limit] if ds.limit else examples
    if not examples:
        raise InputError(f"{what}: the data set is empty")
    return examples


def make_scorer(spec):
    """(responses, examples) -> scores, via the configured verifier."""
    from rloop.verify import score_batch

    def score(responses: list[str], examples: list) -> list[float | None]:
        rows = [{**e.extra, "prompt": e.prompt} for e in examples]
        return score_batch(spec.verifier.name, responses, [e.answer for e in examples], rows,
                           timeout_s=spec.verifier.timeout_seconds)

    return score


def parquet_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows)), buf)
    return buf.getvalue()


def _without_uri_secrets(value: Any) -> Any:
    """`value` with every string in it passed through `redact_uris` (values, not the JSON text: cutting a
    query out of JSON text could take an escaping backslash with it)."""
    if isinstance(value, str):
        return redact_uris(value)
    if isinstance(value, dict):
        return {k: _without_uri_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_uri_secrets(v) for v in value]
    return value


def write_termination_message(summary: dict[str, Any]) -> None:
    """Kubernetes reads a finished pod's termination message (max 4 KiB): the operator gets the stage
    summary from there without store credentials. Off unless RLOOP_TERMINATION_LOG is set."""
    path = os.environ.get("RLOOP_TERMINATION_LOG")
    if not path:
        return
    summary = _without_uri_secrets(summary)  # the message reaches the run's status and Events
    text = json.dumps(summary, separators=(",", ":"), default=float)
    if len(text) > 4000:
        text = json.dumps({k: v for k, v in summary.items() if isinstance(v, int | float | str)})[:4000]
    try:
        Path(path).write_text(text)
    except OSError as err:  # never fail a committed stage over a status nicety
        print(f"rloop: could not write termination message: {err}", file=sys.stderr)
