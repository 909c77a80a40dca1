"""The bad-manifest corpus (tests/data/bad-manifests/): `rloop validate` rejects every file with exit code 2,
the field (or the file-level problem) named in the message, no traceback, within seconds and bounded
memory. Most files go through the CLI's own entry point in-process; a sample through `python -m rloop`.

Each file says what its error must mention on its first line (`# expect: spec.loop.rl.clipHigh`) and its
class on the second (`# class: cross-field`); files that cannot carry a comment (empty, binary) are listed
in index.txt. The operator validates `.spec` with the same function (`parse_spec`), checked here too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from rloop.cli import main
from rloop.manifests import load_run, read_manifest
from rloop.spec import MAX_MANIFEST_BYTES, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "bad-manifests"
SECONDS_EACH = 3.0
"""Generous for a loaded 2-core machine: every file takes ~10 ms when the machine is quiet."""
HOSTILE = {
    "garbage-bytes",
    "deep-nesting",
    "alias-bomb",
    "huge-string",
    "empty",
    "not-a-mapping",
    "broken-yaml",
}
"""File-level classes: the error must be exactly one line."""
REQUIRED_CLASSES = HOSTILE - {"broken-yaml"} | {
    "unknown-field",
    "wrong-type",
    "numeric-string",
    "yes-no-boolean",
    "huge-int",
    "inf-nan",
    "out-of-range",
    "cross-field",
    "dns-name",
    "quantity",
    "credentials",
    "missing",
}


@dataclass(frozen=True)
class Case:
    path: Path
    cls: str
    expect: str

    def __str__(self) -> str:
        return self.path.name


def _index() -> dict[str, tuple[str, str]]:
    out = {}
    for line in (CORPUS / "index.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, cls, expect = line.split("\t")
            out[name] = (cls, expect)
    return out


def _cases() -> list[Case]:
    index = _index()
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        head = path.read_bytes()[:4096].split(b"\n", 2)
        if head[0].startswith(b"# expect: ") and len(head) > 1 and head[1].startswith(b"# class: "):
            expect, cls = head[0][10:].decode().strip(), head[1][9:].decode().strip()
        else:
            cls, expect = index[path.name]
        cases.append(Case(path, cls, expect))
    return cases


CASES = _cases()
SUBPROCESS_SAMPLE = [
    "garbage-bytes.yaml",
    "deep-nesting-flow.yaml",
    "alias-bomb.yaml",
    "huge-string.yaml",
    "snake-case-field.yaml",
    "clip-high-below-clip-low.yaml",
]


def test_the_corpus_is_large_and_covers_every_class() -> None:
    assert len(CASES) >= 40
    classes = {c.cls for c in CASES}
    assert not REQUIRED_CLASSES - classes, REQUIRED_CLASSES - classes
    assert set(_index()) <= {c.path.name for c in CASES}, "index.txt names a file that is not there"
    assert set(SUBPROCESS_SAMPLE) <= {c.path.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rloop_validate_rejects_it_naming_the_field(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    rc = main(["validate", str(case.path)])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert out == ""
    assert err.startswith("rloop: invalid RLoopRun:")
    assert case.expect in err, err
    assert "Traceback" not in err
    assert elapsed < SECONDS_EACH, f"{case}: {elapsed:.1f}s"
    lines = err.rstrip("\n").splitlines()
    assert all(len(line) <= 500 for line in lines)
    if case.cls in HOSTILE:
        assert len(lines) == 1, err  # one line naming the problem


@pytest.mark.parametrize("case", [c for c in CASES if c.expect.startswith("spec.")], ids=str)
def test_the_operators_spec_validation_names_the_same_field(case: Case) -> None:
    """The operator validates `.spec` with parse_spec (Failed/InvalidSpec with the message): same rules,
    same field paths, whatever the file's other problems."""
    doc = read_manifest(case.path)
    with pytest.raises(SpecError) as info:
        parse_spec(doc["spec"])
    assert case.expect in str(info.value)


@pytest.mark.parametrize("name", SUBPROCESS_SAMPLE)
def test_python_m_rloop_validate_rejects_it(name: str) -> None:
    case = next(c for c in CASES if c.path.name == name)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rloop", "validate", str(case.path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert case.expect in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert time.perf_counter() - t0 < 30  # interpreter start-up and imports on a shared machine included


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.cls in {"alias-bomb", "deep-nesting", "huge-string", "garbage-bytes"}],
    ids=str,
)
def test_hostile_files_are_refused_in_bounded_memory(case: Case) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(SpecError):
            load_run(case.path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{case}: {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_pure_python_yaml_parser_gives_the_same_verdict(case: Case) -> None:
    """Without libyaml (PyYAML falls back to its own parser) the loader refuses the same files, and the
    documents it does load are the same."""
    import yaml

    from rloop.manifests import _manifest_loader, load_yaml

    try:
        text = case.path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        pytest.skip("not text: refused before any parser runs")
    pure = _manifest_loader(yaml.SafeLoader)
    try:
        fast = load_yaml(text)
    except SpecError as err:
        with pytest.raises(SpecError) as info:
            load_yaml(text, loader=pure)
        assert case.expect in str(err) and case.expect in str(info.value), (str(err), str(info.value))
        return
    assert load_yaml(text, loader=pure) == fast


# ----------------------------------------------------------------------------- made on the fly
def _rejects(path: Path, expect: str, capsys: pytest.CaptureFixture[str]) -> str:
    t0 = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    assert time.perf_counter() - t0 < SECONDS_EACH
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_huge_file_is_refused_before_it_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:  # sparse: 4 GiB on paper, nothing on disk
        f.truncate(4 * 2**30)
    tracemalloc.start()
    try:
        _rejects(path, f"larger than {MAX_MANIFEST_BYTES // 1024} KiB", capsys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_MANIFEST_BYTES


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_an_endless_stream_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    _rejects(Path("/dev/zero"), "larger than", capsys)


def test_a_directory_or_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rejects(tmp_path, "is a directory", capsys)
    _rejects(tmp_path / "absent.yaml", "no such file", capsys)


def test_a_bigger_alias_bomb_is_refused_at_the_first_alias(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 50) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 50) + "]" for i in range(1, 40)]  # 50^40 nodes
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    _rejects(path, "alias *l0", capsys)


def test_utf8_with_a_byte_order_mark_is_fine(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "tiny.yaml").read_text(encoding="utf-8")
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_run(path).metadata.name == "tiny"


def test_json_manifests_load_too(tmp_path: Path) -> None:
    import json

    run = load_run(ROOT / "examples" / "tiny.yaml")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(run.to_wire()))
    assert load_run(path) == run
