"""The tiny base model's cache (`<store>/_cache/tiny-<key>`) is keyed by its config AND by the code
that builds it: a model warmed up by an older rloop is never reused by a newer one."""

from __future__ import annotations

from types import SimpleNamespace

from rloop.spec import parse_run
from rloop.stages import init
from tests.helpers import small_doc


def test_the_fingerprint_covers_every_byte_of_the_build_code(tmp_path):
    for rel in ("a.py", "b/c.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    before = init.build_fingerprint(tmp_path, ("a.py", "b/c.py"))
    assert init.build_fingerprint(tmp_path, ("a.py", "b/c.py")) == before
    (tmp_path / "b/c.py").write_text("x = 2\n")
    assert init.build_fingerprint(tmp_path, ("a.py", "b/c.py")) != before
    assert len(init.build_fingerprint()) == 64  # the installed package's own sources are all there


def test_the_cache_key_moves_with_the_code_and_the_config(monkeypatch):
    ctx = SimpleNamespace(spec=parse_run(small_doc("k")).spec)
    key = init._tiny_cache_key(ctx)
    assert key.startswith("tiny-") and init._tiny_cache_key(ctx) == key
    monkeypatch.setattr(init, "build_fingerprint", lambda: "other code")
    assert init._tiny_cache_key(ctx) != key
    monkeypatch.undo()
    doc = small_doc("k")
    doc["spec"]["model"]["tiny"]["seed"] = 7
    assert init._tiny_cache_key(SimpleNamespace(spec=parse_run(doc).spec)) != key
