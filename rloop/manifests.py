"""Reading RLoopRun manifest files: bounded, strict, and the same verdict as kubectl's YAML reader.

One place turns bytes into a document (`read_manifest`) and a document into a run (`load_run`, via
`rloop.spec.parse_run`). Hostile files end as one-line SpecErrors, bounded in time and memory: at most
MAX_MANIFEST_BYTES, strict UTF-8, one document, no alias expansion beyond the first alias, nesting at
most MAX_DEPTH levels (checked on the event stream before anything is built).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rloop.spec import MAX_DEPTH, MAX_MANIFEST_BYTES, RLoopRun, SpecError, _short, clean_line, parse_run

_INT, _FLOAT, _TIMESTAMP = (f"tag:yaml.org,2002:{t}" for t in ("int", "float", "timestamp"))


def _manifest_loader(base: type) -> type:
    """yaml's safe loader (`base`), resolving plain scalars the way kubectl's YAML reader does: `3e-4`
    is a number (PyYAML's YAML 1.1 wants a dot), dates stay strings, no base-60 numbers (`1:30`)."""
    loader = type(f"Manifest{base.__name__}", (base,), {})
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT, _TIMESTAMP)]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(
        _INT,
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )
    loader.add_implicit_resolver(
        _FLOAT,
        re.compile(
            r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
            r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return loader


_ManifestLoader = _manifest_loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader))
"""libyaml's parser when PyYAML has it (fast), else the pure-Python one (the checks are the same)."""


class _YamlProblem(Exception):
    def __init__(self, message: str, event: Any):
        mark = getattr(event, "start_mark", None)
        super().__init__(f"{message} (line {mark.line + 1})" if mark is not None else message)


def _scan_yaml(text: str, loader: type) -> None:
    """Walk the YAML event stream (no tree is built) and refuse what the loader would turn into a
    trap: aliases (a few lines of `*a` expand into billions of nodes), duplicate keys (the last one
    silently wins), nesting deeper than MAX_DEPTH (the loader recurses), more than one document."""
    frames: list[list[Any]] = []  # [is_mapping, expecting_key, keys seen]
    documents = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _YamlProblem("holds more than one YAML document; put one RLoopRun in a file", event)
        elif isinstance(event, yaml.AliasEvent):
            raise _YamlProblem(
                f"uses the YAML alias *{clean_line(str(event.anchor), 40)}; aliases are not accepted in a "
                "manifest (they can expand a small file into billions of nodes): write the values out",
                event,
            )
        elif isinstance(event, yaml.ScalarEvent | yaml.MappingStartEvent | yaml.SequenceStartEvent):
            top = frames[-1] if frames else None
            if top is not None and top[0] and top[1]:  # a mapping key
                if not isinstance(event, yaml.ScalarEvent):
                    raise _YamlProblem("has a mapping key that is a list or mapping; keys must be plain names", event)
                if event.value in top[2]:
                    raise _YamlProblem(
                        f"repeats the key {_short(event.value, 40)} in one mapping (the later value would "
                        "silently win); keep one",
                        event,
                    )
                top[2].add(event.value)
                top[1] = False
                continue
            if top is not None and top[0]:
                top[1] = True  # this node is the value; the next node at this level is a key again
            if not isinstance(event, yaml.ScalarEvent):
                frames.append([isinstance(event, yaml.MappingStartEvent), True, set()])
                if len(frames) > MAX_DEPTH:
                    raise _YamlProblem(f"is nested deeper than {MAX_DEPTH} levels", event)
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            frames.pop()


def _yaml_error(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        what = err.problem or err.context or "cannot be parsed"
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{what}{where}"
    return str(err).split("\n", 1)[0]


def load_yaml(text: str, source: str = "<manifest>", *, loader: type | None = None) -> Any:
    """The single YAML document in `text`, loaded safely (see `_scan_yaml`); SpecError on anything else."""
    loader = loader or _ManifestLoader
    try:
        _scan_yaml(text, loader)
        return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)
    except _YamlProblem as err:
        raise SpecError(clean_line(f"{source}: {err}")) from None
    except yaml.YAMLError as err:
        raise SpecError(clean_line(f"{source}: not valid YAML: {_yaml_error(err)}")) from None
    except (ValueError, OverflowError, RecursionError) as err:
        if "integer string conversion" in str(err):  # Python refuses int() of more than 4300 digits
            err = "an integer with thousands of digits (no RLoopRun field holds more than 19)"
        raise SpecError(clean_line(f"{source}: a value cannot be read: {err}")) from None


def read_manifest(path: str | Path) -> Any:
    """The document in a manifest file: at most MAX_MANIFEST_BYTES, strict UTF-8, one safe YAML document."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{p}: is a directory, not a manifest file") from None
    except OSError as err:
        raise SpecError(clean_line(f"{p}: cannot be read: {err.strerror or err}")) from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise SpecError(
            f"{p}: larger than {MAX_MANIFEST_BYTES // 1024} KiB; an RLoopRun manifest is a few KiB of YAML"
        )
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{p}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); an RLoopRun "
            "manifest is a YAML or JSON text file"
        ) from None
    if not text.strip():
        raise SpecError(f"{p}: the file is empty; expected an RLoopRun manifest (apiVersion, kind, metadata, spec)")
    doc = load_yaml(text, str(p))
    if doc is None:
        raise SpecError(
            f"{p}: the file is empty (no YAML document, only comments); expected an RLoopRun manifest"
        )
    return doc


def load_run(path: str | Path) -> RLoopRun:
    """Read an RLoopRun manifest from a YAML (or JSON) file; SpecError for any problem, one per line."""
    return parse_run(read_manifest(path))
