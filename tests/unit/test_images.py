"""Static checks of images/*/Dockerfile with a real Dockerfile parser (dockerfile-parse): they cannot
be built here (no Docker engine), so what can be checked without building is checked."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from rloop_operator.builders import METRICS_PORT, RUN_AS

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ("operator", "trainer", "verifier")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
HEAVY = ("torch", "vllm", "deepspeed", "transformers", "peft")
# pip options that take a value (the value is no requirement).
PIP_VALUE_OPTIONS = {"-r", "-c", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--target"}


def parsed(image: str) -> DockerfileParser:
    path = ROOT / "images" / image / "Dockerfile"
    assert path.is_file(), f"images/{image}/Dockerfile is missing"
    parser = DockerfileParser(path=str(path))
    assert [i for i in parser.structure if i["instruction"] == "FROM"], (
        f"images/{image}/Dockerfile has no FROM"
    )
    return parser


def final_stage(image: str) -> list[dict]:
    """Instructions of the last build stage (what the image is)."""
    structure = parsed(image).structure
    starts = [n for n, i in enumerate(structure) if i["instruction"] == "FROM"]
    return structure[starts[-1] :]


def instructions(image: str, kind: str, *, final: bool = False) -> list[str]:
    source = final_stage(image) if final else parsed(image).structure
    return [i["value"] for i in source if i["instruction"] == kind]


def exec_form(value: str) -> list[str]:
    form = json.loads(value)
    assert isinstance(form, list) and all(isinstance(a, str) for a in form), f"not exec form: {value}"
    return form


def pip_installs(image: str) -> list[list[str]]:
    """The requirement arguments of every `pip install` in RUN instructions, in order."""
    found = []
    for run in instructions(image, "RUN"):
        for command in re.split(r"&&|;|\|\|", run):
            words = shlex.split(command)
            for n in range(len(words) - 1):
                if words[n].endswith("pip") and words[n + 1] == "install":
                    args, skip = [], False
                    for word in words[n + 2 :]:
                        if skip:
                            skip = False
                        elif word in PIP_VALUE_OPTIONS:
                            skip = True
                        elif not word.startswith("-"):
                            args.append(word)
                    found.append(args)
    return found


def extra_requirements(extra: str) -> list[str]:
    """An extra's requirements with `rloop[...]` self-references expanded."""
    out = []
    for req in EXTRAS[extra]:
        if m := re.fullmatch(r"rloop\[([\w,-]+)\]", req.replace(" ", "")):
            for inner in m.group(1).split(","):
                out += extra_requirements(inner)
        else:
            out.append(req)
    return out


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()


def dockerignored(path: str) -> bool:
    """Docker's rule, conservatively: a path is excluded when it or a parent matches the last matching
    pattern (`!` re-includes); `*` is allowed to cross `/` here, which only excludes more."""
    excluded = False
    parts = Path(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        patterns = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("image", IMAGES)
def test_parses_with_exec_form_entrypoint(image: str) -> None:
    parser = parsed(image)
    assert {i["instruction"] for i in parser.structure} >= {"FROM", "RUN", "COPY", "USER", "ENTRYPOINT"}
    entrypoints = instructions(image, "ENTRYPOINT", final=True)
    assert len(entrypoints) == 1, f"{image}: want exactly one ENTRYPOINT in the final stage"
    assert exec_form(entrypoints[0]), f"{image}: empty ENTRYPOINT"


@pytest.mark.parametrize("image", IMAGES)
def test_every_base_image_is_pinned_to_an_exact_tag(image: str) -> None:
    bases = parsed(image).parent_images
    assert bases, f"{image}: no base image"
    for base in bases:
        name, _, digest = base.partition("@")
        last = name.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        assert tag, f"{image}: {base} has no tag"
        assert tag != "latest" and "$" not in tag, f"{image}: {base} is not pinned"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: {base} is not an exact x.y.z tag"


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_runs_as_a_numeric_non_root_user(image: str) -> None:
    users = instructions(image, "USER", final=True)
    assert users, f"{image}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{image}: USER {users[-1]} (want numeric, not 0)"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"{image}: group of USER {users[-1]}"


@pytest.mark.parametrize("image", IMAGES)
def test_python_env_and_no_caches_left(image: str) -> None:
    envs = parsed(image).envs
    assert envs.get("PYTHONDONTWRITEBYTECODE") == "1" and envs.get("PYTHONUNBUFFERED") == "1"
    # Read-only root filesystem, /tmp an emptyDir: HOME (and so every ~/.cache) must live there.
    assert envs.get("HOME", "").startswith("/tmp"), f"{image}: HOME={envs.get('HOME')}"
    for run in instructions(image, "RUN"):
        if "pip install" in run:
            assert "--no-cache-dir" in run or envs.get("PIP_NO_CACHE_DIR") == "1", f"{image}: pip cache kept"
        if "apt-get install" in run:
            assert "rm -rf /var/lib/apt/lists" in run, f"{image}: apt lists kept in the layer"


@pytest.mark.parametrize("image", IMAGES)
def test_copy_sources_exist_and_survive_dockerignore(image: str) -> None:
    copies = instructions(image, "COPY") + instructions(image, "ADD")
    assert copies, f"{image}: copies nothing from the repository"
    for value in copies:
        words = exec_form(value) if value.lstrip().startswith("[") else value.split()
        if any(w.startswith("--from") for w in words):
            continue
        *sources, _dest = [w for w in words if not w.startswith("--")]
        assert sources, f"{image}: COPY {value}"
        for src in sources:
            assert (ROOT / src).exists(), f"{image}: COPY {src} does not exist in the repository"
            assert not dockerignored(src), f"{image}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("image, extra", [(i, i) for i in IMAGES])
def test_installs_the_repository_with_its_extra(image: str, extra: str) -> None:
    assert extra in EXTRAS, f"pyproject has no [{extra}] extra"
    installs = [arg for args in pip_installs(image) for arg in args]
    assert f".[{extra}]" in installs, f"{image} must pip install .[{extra}]"
    # The packages are found under "." and "operator": both must be in the image before the install.
    copied = " ".join(instructions(image, "COPY"))
    for needed in ("pyproject.toml", "rloop", "operator"):
        assert re.search(rf"(^|\s){needed}(\s|$)", copied), f"{image}: does not COPY {needed}"


@pytest.mark.parametrize("image", ["operator", "verifier"])
def test_light_images_have_no_ml_stack(image: str) -> None:
    body = "\n".join(
        line
        for line in (ROOT / "images" / image / "Dockerfile").read_text().lower().splitlines()
        if not line.lstrip().startswith("#")
    )
    assert not [h for h in HEAVY if h in body], f"{image}: mentions the ML stack"
    names = {requirement_name(r) for r in extra_requirements(image)}
    assert not names & set(HEAVY), f"the [{image}] extra pulls {names & set(HEAVY)}"


def test_trainer_installs_pinned_torch_first_then_the_pinned_ml_stack() -> None:
    installs = pip_installs("trainer")
    assert installs, "trainer installs nothing"
    first = installs[0]
    assert len(first) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", first[0]), (
        f"the first pip install must be torch alone, pinned with ==: {first}"
    )
    torch_pin = first[0]
    later = [arg for args in installs[1:] for arg in args]
    for package in ("vllm", "deepspeed", "transformers", "peft"):
        pins = [a for a in later if requirement_name(a) == package]
        assert pins and all(re.fullmatch(rf"{package}==\d+\.\d+\.\d+\S*", p) for p in pins), (
            f"{package} is not installed pinned with ==: {pins}"
        )
    # Every later install resolves torch again: it repeats the same pin, so no other build is pulled.
    for args in installs[1:]:
        assert torch_pin in args, f"a later install does not repeat {torch_pin}: {args}"
    envs = parsed("trainer").envs
    assert envs.get("DS_BUILD_OPS") == "0"


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_executable_is_provided(image: str) -> None:
    entrypoint = exec_form(instructions(image, "ENTRYPOINT", final=True)[0])
    executable = entrypoint[0]
    if image == "operator":
        assert entrypoint == ["kopf", "run", "-m", "rloop_operator", "--standalone"]
        assert exec_form(instructions(image, "CMD", final=True)[-1]) == ["--all-namespaces"]
        assert "kopf" in {requirement_name(r) for r in extra_requirements("operator")}
        assert importlib.util.find_spec(entrypoint[3]) is not None
    else:
        assert entrypoint == ["rloop"], f"{image}: stage Jobs run `rloop stage ...`: {entrypoint}"
        scripts = PYPROJECT["project"]["scripts"]
        assert executable in scripts, f"{executable} is no console script in pyproject"
        module, _, func = scripts[executable].partition(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_ports_and_users_match_the_chart_and_the_job_template() -> None:
    values = yaml.safe_load((ROOT / "charts" / "rloop" / "values.yaml").read_text())
    assert instructions("operator", "EXPOSE") == [str(values["metrics"]["port"])] == ["8080"]
    assert instructions("trainer", "EXPOSE") == [str(METRICS_PORT)] == ["9400"]
    assert instructions("trainer", "USER", final=True)[-1].split(":")[0] == str(RUN_AS)
    assert instructions("verifier", "USER", final=True)[-1].split(":")[0] == str(RUN_AS)
    assert instructions("operator", "USER", final=True)[-1].split(":")[0] == str(
        values["podSecurityContext"]["runAsUser"]
    )
