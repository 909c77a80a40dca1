"""A sample of the bad-manifest corpus (tests/data/bad-manifests/) applied to the operator beside a good
run, on the same harness as test_operator_e2e.py (real operator process, API emulator, test kubelet,
SeaweedFS). The emulator has no CRD schema, so these are the files whose problems only the operator's
own validation (`rloop.spec.parse_spec`, the same rules as `rloop validate`) can catch — on a real
cluster the numeric string, the boolean string and the snake_case field would already be refused or
pruned at admission. Each bad run must fail alone with Failed/InvalidSpec naming the field, create no
Job, and leave the good run to succeed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rloop.manifests import read_manifest
from tests.integration.test_operator_e2e import (
    NS,
    Cluster,
    cluster,  # noqa: F401  (module-scoped fixture: a cluster of our own)
)
from tests.k8s.apiserver import RLOOPRUNS

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad-manifests"
SAMPLE = [
    "clip-high-below-clip-low.yaml",  # cross-field
    "k-list-duplicate.yaml",  # cross-field
    "prompt-template-stray-brace.yaml",  # cross-field
    "lr-numeric-string.yaml",  # strict types: "3e-4"
    "suspend-yes-string.yaml",  # strict types: "yes"
    "snake-case-field.yaml",  # by alias only
]


def _expect(path: Path) -> str:
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ").strip()


def _apply_exactly(target: Cluster, docs: list[dict]) -> None:
    """Apply as JSON (which kubectl reads as YAML): a YAML dump could turn the string "3e-4" back
    into a number on the way, which is the very disagreement under test."""
    if shutil.which("kubectl"):
        folder = target.tmp / "bad-manifests"
        folder.mkdir(exist_ok=True)
        for doc in docs:
            (folder / f"{doc['metadata']['name']}.json").write_text(json.dumps(doc))
        target.kubectl("apply", "--validate=false", "-f", str(folder))
        return
    for doc in docs:
        target.server.create(RLOOPRUNS, doc, namespace=NS)


def test_bad_manifests_fail_with_invalid_spec_while_a_good_run_succeeds(cluster: Cluster) -> None:  # noqa: F811
    bad: dict[str, str] = {}
    docs = []
    for name in SAMPLE:
        path = CORPUS / name
        doc = read_manifest(path)
        doc["metadata"]["namespace"] = NS
        doc["spec"]["storage"] = {
            "uri": f"s3://{cluster.s3.bucket}/{cluster.prefix}",
            "secretRef": {"name": "s3"},
        }
        bad[doc["metadata"]["name"]] = _expect(path)
        docs.append(doc)
    good = cluster.manifest("good-beside-bad")
    _apply_exactly(cluster, [*docs, good])

    for name, field in bad.items():
        failed = cluster.wait_condition(name, "Failed", timeout=120)
        assert failed["reason"] == "InvalidSpec", (name, failed)
        assert field in failed["message"], (name, failed["message"])
        assert all(len(line) <= 500 for line in failed["message"].splitlines())
        assert cluster.jobs(name) == []
        found = cluster.wait_events(name, lambda e: any(r == "InvalidSpec" for r, _ in e), "InvalidSpec")
        assert field in next(m for r, m in found if r == "InvalidSpec")

    done = cluster.wait_condition("good-beside-bad", "Succeeded")
    assert done["reason"] == "Succeeded"
    assert len(cluster.jobs("good-beside-bad")) == 5
    for name in bad:  # still failed, still no Jobs, after all the good run's passes
        assert cluster.condition(name, "Failed")["status"] == "True"
        assert cluster.jobs(name) == []
