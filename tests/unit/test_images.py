"""Static checks of images/*/Dockerfile with a real Dockerfile parser (dockerfile-parse): they cannot
be built here (no Docker engine), so what can be checked without building is checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from rloop_operator.builders import METRICS_PORT, RUN_AS

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ("operator", "trainer", "verifier")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = ("torch", "vllm", "deepspeed", "transformers", "peft")


def parsed(image: str) -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "images" / image / "Dockerfile"))
    assert parser.structure, f"images/{image}/Dockerfile is empty"
    return parser


def instructions(image: str, kind: str) -> list[str]:
    return [i["value"] for i in parsed(image).structure if i["instruction"] == kind]


def pip_installs(image: str) -> list[str]:
    return [cmd for cmd in instructions(image, "RUN") if "pip install" in cmd]


@pytest.mark.parametrize("image", IMAGES)
def test_base_images_are_pinned(image: str) -> None:
    for base in parsed(image).parent_images:
        name, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: unpinned base {base}"


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_a_numeric_non_root_user(image: str) -> None:
    users = instructions(image, "USER")
    assert users, f"{image}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


@pytest.mark.parametrize("image", IMAGES)
def test_copy_sources_exist(image: str) -> None:
    for value in instructions(image, "COPY"):
        *sources, _ = value.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{image}: COPY {src} does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("rloop", "operator", "pyproject.toml"):
        assert needed not in ignored


@pytest.mark.parametrize(
    "image, extra", [("operator", "operator"), ("trainer", "trainer"), ("verifier", "verifier")]
)
def test_installs_its_extra(image: str, extra: str) -> None:
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    assert any(f'".[{extra}]"' in cmd for cmd in pip_installs(image)), f"{image} must install .[{extra}]"


@pytest.mark.parametrize("image", ["operator", "verifier"])
def test_light_images_have_no_ml_stack(image: str) -> None:
    text = (ROOT / "images" / image / "Dockerfile").read_text().lower()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not [h for h in HEAVY if h in body]
    extra = image
    deps = " ".join(PYPROJECT["project"]["optional-dependencies"][extra]).lower()
    assert not [h for h in HEAVY if h in deps]


def test_trainer_pins_torch_first_and_the_ml_stack() -> None:
    installs = pip_installs("trainer")
    assert re.search(r"\btorch==\d+\.\d+\.\d+", installs[0]) and len(installs[0].split()) <= 5, (
        "the first pip install must be torch alone, pinned"
    )
    torch_pin = re.search(r"torch==([\d.]+)", installs[0]).group(1)
    everything = " ".join(installs)
    for package in ("vllm", "deepspeed", "transformers", "peft"):
        assert re.search(rf"\b{package}==\d+\.\d+", everything), f"{package} is not pinned"
    # Every later install that could resolve torch repeats the same pin.
    for cmd in installs[1:]:
        assert f"torch=={torch_pin}" in cmd
    assert "DS_BUILD_OPS=0" in " ".join(instructions("trainer", "ENV"))


def test_entrypoints_exist() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert instructions("trainer", "ENTRYPOINT") == ['["rloop"]'] and "rloop" in scripts
    assert instructions("verifier", "ENTRYPOINT") == ['["rloop"]']
    assert instructions("operator", "ENTRYPOINT") == [
        '["kopf", "run", "-m", "rloop_operator", "--standalone"]'
    ]
    assert any(d.startswith("kopf") for d in PYPROJECT["project"]["optional-dependencies"]["operator"])
    assert (ROOT / "operator" / "rloop_operator" / "__init__.py").exists()


def test_ports_and_users_match_the_chart_and_the_job_template() -> None:
    import yaml

    values = yaml.safe_load((ROOT / "charts" / "rloop" / "values.yaml").read_text())
    assert instructions("operator", "EXPOSE") == [str(values["metrics"]["port"])]
    assert instructions("trainer", "EXPOSE") == [str(METRICS_PORT)]
    assert instructions("trainer", "USER")[-1].split(":")[0] == str(RUN_AS)
    assert instructions("operator", "USER")[-1].split(":")[0] == str(
        values["podSecurityContext"]["runAsUser"]
    )
