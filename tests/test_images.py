"""The three images, checked without a container engine: each Dockerfile's requirement file installs
into a clean virtualenv, and its entrypoint starts there with only the files the Dockerfile copies.

There is no Docker here, so the test reads each Dockerfile and does what its build would do: the
pip install of the build stage (into a virtualenv cached by the requirement file's hash, as Docker
caches the layer), then the final stage's COPY lines into a scratch root, its ENV, WORKDIR and
ENTRYPOINT. A requirement that does not resolve, a module the image forgets to copy, an import of
TensorFlow in a TF-free image, or a COPY of a path that .dockerignore leaves out of the build
context all fail here as they would fail `docker build` or the container's start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops"))
IMAGE_VENV_DIR = CACHE_ROOT / "image-venvs"
PIP_TIMEOUT_SECONDS = 1800.0
ENTRYPOINT_TIMEOUT_SECONDS = 120.0
APP_UID = 10001


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    from_stage: str | None


@dataclass
class Stage:
    name: str | None
    copies: list[Copy] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def requirement_file(self) -> Path:
        """The requirement file the build stage copies in and installs with pip -r."""
        for stage in self.stages[:-1]:
            for copy in stage.copies:
                if copy.from_stage is None and any(src.startswith("requirements/") for src in copy.sources):
                    assert len(copy.sources) == 1, f"{self.path}: copy one requirement file at a time"
                    installed = any("pip install" in run and copy.destination in run for run in stage.runs)
                    assert installed, f"{self.path}: {copy.destination} is copied but never pip-installed"
                    return REPO_ROOT / copy.sources[0]
        raise AssertionError(f"{self.path}: no stage copies and installs a requirements/ file")


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def _exec_form(value: str) -> list[str]:
    loaded = json.loads(value)
    assert isinstance(loaded, list), f"expected the exec (JSON) form, got {value!r}"
    return [str(item) for item in loaded]


def _substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


_IGNORED_INSTRUCTIONS = {"ARG", "LABEL", "EXPOSE", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "VOLUME"}


def _apply(stage: Stage, instruction: str, rest: str, where: str) -> None:
    if instruction == "COPY":
        words = shlex.split(rest)
        from_stage = None
        while words and words[0].startswith("--"):
            flag = words.pop(0)
            if flag.startswith("--from="):
                from_stage = flag.removeprefix("--from=")
        assert len(words) >= 2, f"{where}: COPY needs a source and a destination"
        stage.copies.append(Copy(tuple(words[:-1]), words[-1], from_stage))
    elif instruction == "ENV":
        for item in shlex.split(rest):
            key, sep, value = item.partition("=")
            assert sep, f"{where}: use ENV KEY=VALUE"
            stage.env[key] = _substitute(value, stage.env)
    elif instruction == "RUN":
        stage.runs.append(rest)
    elif instruction == "WORKDIR":
        stage.workdir = rest
    elif instruction == "USER":
        stage.user = rest
    elif instruction == "ENTRYPOINT":
        stage.entrypoint = _exec_form(rest)
    elif instruction == "CMD":
        stage.cmd = _exec_form(rest)
    else:
        # ADD (remote URLs, auto-extraction) and anything unknown: refuse rather than guess.
        raise AssertionError(f"{where}: instruction {instruction} is not understood by this test")


def parse_dockerfile(path: Path) -> Dockerfile:
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=name))
        elif instruction not in _IGNORED_INSTRUCTIONS:
            assert stages, f"{path}: {instruction} before FROM"
            _apply(stages[-1], instruction, rest, f"{path}: {line}")
    return Dockerfile(path, tuple(stages))


# --- .dockerignore -------------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (moby/patternmatcher): ** crosses directories, * and ? do not."""
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    return re.compile(f"^{out}$")


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negate, _dockerignore_regex(pattern)))
    return rules


def in_build_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the file is sent to the builder: the last rule matching it or a parent decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return not excluded


# --- virtualenvs ---------------------------------------------------------------------------------


def image_venv(requirements: Path) -> Path:
    """A clean virtualenv holding exactly the requirement file, cached by the file's content."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    venv = IMAGE_VENV_DIR / f"{requirements.stem}-{digest}"
    ready = venv / ".ready"
    if ready.exists():
        return venv
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The same two steps as the Dockerfiles' build stage: a fresh pip, then the file alone.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    proc = subprocess.run(
        [*pip, "--requirement", str(requirements)],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, f"pip install -r {requirements.name} failed:\n{proc.stderr[-4000:]}"
    ready.write_text(digest)
    return venv


def installed_distributions(venv: Path) -> set[str]:
    site = next((venv / "lib").glob("python3*/site-packages"))
    names = set()
    for dist in site.glob("*.dist-info"):
        names.add(dist.name.split("-")[0].lower().replace("_", "-"))
    return names


# --- the images ------------------------------------------------------------------------------------

IMAGES = {
    "training": REPO_ROOT / "training_job" / "Dockerfile",
    "serving": REPO_ROOT / "serving" / "Dockerfile",
    "operator": REPO_ROOT / "operator" / "Dockerfile",
}
TF_FREE = ("serving", "operator")
EXPECTED_ENTRYPOINT = {
    "training": ["python", "-m", "training_job"],
    "serving": ["python", "-m", "serving"],
    "operator": ["python", "-m", "mnist_operator"],
}


@dataclass(frozen=True)
class StartCheck:
    """How the entrypoint proves it starts without a cluster: its arguments, env, exit code, output."""

    args: tuple[str, ...]
    exit_code: int
    expected_output: str
    unset_env: tuple[str, ...] = ()


START_CHECKS = {
    "training": StartCheck(("--help",), 0, "python -m training_job"),
    "serving": StartCheck(("--help",), 0, "python -m serving"),
    # The operator has no --help: without MLFLOW_TRACKING_URI it stops at its configuration check,
    # which runs after every import (kopf, the kubernetes client, the handlers) has succeeded.
    "operator": StartCheck((), 2, "MLFLOW_TRACKING_URI is required", unset_env=("MLFLOW_TRACKING_URI",)),
}
# The modules that do the real work, imported in the image layout: the heavy dependencies (TensorFlow,
# tf2onnx, onnxruntime, kopf) must import with exactly the pinned set.
WORK_MODULES = {
    "training": ("training_job.train", "training_job.export", "training_job.data"),
    "serving": ("serving.app",),
    "operator": ("mnist_operator.handlers",),
}


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    name = str(request.param)
    return name, parse_dockerfile(IMAGES[name])


def stage_root(dockerfile: Dockerfile, root: Path) -> None:
    """Lays the final stage's COPY (from the build context) into `root` as the image's filesystem."""
    for copy in dockerfile.final.copies:
        if copy.from_stage is not None:
            continue
        for source in copy.sources:
            src = REPO_ROOT / source
            assert src.exists(), f"{dockerfile.path}: COPY source {source} does not exist"
            destination = root / copy.destination.lstrip("/")
            if src.is_dir():
                shutil.copytree(
                    src, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            elif copy.destination.endswith("/") or len(copy.sources) > 1:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, destination / src.name)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, destination)


def test_dockerfile_shape(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    assert len(dockerfile.stages) >= 2, f"{name}: multi-stage (build, then a runtime stage)"
    assert dockerfile.final.user is not None, f"{name}: the runtime stage must set USER"
    # Numeric, so the kubelet can verify runAsNonRoot; the chart's pods run as the same uid.
    assert dockerfile.final.user.split(":")[0] == str(APP_UID), f"{name}: USER must be {APP_UID}"
    assert dockerfile.final.entrypoint == EXPECTED_ENTRYPOINT[name]
    assert not any("pip install" in run for run in dockerfile.final.runs), (
        f"{name}: the runtime stage copies the build stage's virtualenv instead of installing"
    )
    assert any(copy.from_stage == dockerfile.stages[0].name for copy in dockerfile.final.copies)
    requirements = dockerfile.requirement_file()
    for line in requirements.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement and not requirement.startswith("-r"):
            assert re.search(r"==|<", requirement), f"{requirements.name}: {requirement!r} has no upper bound"


def test_copies_are_in_the_build_context(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    rules = _dockerignore_rules()
    for stage in dockerfile.stages:
        for copy in stage.copies:
            if copy.from_stage is not None:
                continue
            for source in copy.sources:
                path = REPO_ROOT / source
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                kept = [p for p in files if in_build_context(p.relative_to(REPO_ROOT).as_posix(), rules)]
                assert kept, f"{name}: .dockerignore leaves COPY source {source} out of the build context"
                python_files = [p for p in files if p.suffix == ".py"]
                dropped = [p for p in python_files if p not in kept]
                assert not dropped, f"{name}: .dockerignore drops {dropped[:3]} from COPY {source}"


def test_dockerignore_keeps_the_context_small() -> None:
    rules = _dockerignore_rules()
    for outside in (
        "tests/conftest.py",
        ".git/HEAD",
        "bench/results/x.json",
        "charts/mnist-mlops/Chart.yaml",
    ):
        assert not in_build_context(outside, rules), f"{outside} should not be sent to the builder"
    for inside in (
        "training_job/spec.py",
        "serving/__main__.py",
        "data/mnist.npz",
        "requirements/serving.txt",
    ):
        assert in_build_context(inside, rules), f"{inside} must be in the build context"
    assert not in_build_context("serving/__pycache__/app.cpython-311.pyc", rules)


@pytest.mark.slow
def test_entrypoint_starts_in_a_clean_venv(image: tuple[str, Dockerfile], tmp_path: Path) -> None:
    name, dockerfile = image
    venv = image_venv(dockerfile.requirement_file())
    distributions = installed_distributions(venv)
    if name in TF_FREE:
        assert not {d for d in distributions if d.startswith(("tensorflow", "keras", "tf-"))}, (
            f"{name}: TensorFlow/Keras must not be in its requirement set"
        )
    root = tmp_path / "image-root"
    stage_root(dockerfile, root)

    stage = dockerfile.final
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "MNIST_", "SERVING_"))
    }
    for key, value in stage.env.items():
        if key == "PATH":
            continue
        # Absolute paths inside the image (PYTHONPATH=/app, MNIST_NPZ=/opt/...) map into the root.
        env[key] = os.pathsep.join(
            str(root / part.lstrip("/")) if part.startswith("/") else part for part in value.split(os.pathsep)
        )
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    env["HOME"] = str(tmp_path / "home")
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # never contacted by --help
    if "MNIST_NPZ" in stage.env:
        assert Path(env["MNIST_NPZ"]).is_file(), f"{name}: MNIST_NPZ points at a file the image lacks"

    check = START_CHECKS[name]
    for key in check.unset_env:
        env.pop(key, None)
    python = str(venv / "bin" / "python")
    workdir = root / stage.workdir.lstrip("/")
    proc = subprocess.run(
        [python, *stage.entrypoint[1:], *check.args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=ENTRYPOINT_TIMEOUT_SECONDS,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == check.exit_code, (
        f"{name}: `{' '.join([*stage.entrypoint, *check.args])}` exited {proc.returncode}:\n{output[-4000:]}"
    )
    assert check.expected_output in output, (
        f"{name}: expected {check.expected_output!r} in:\n{output[-2000:]}"
    )

    imports = "; ".join(f"import {module}" for module in WORK_MODULES[name])
    proc = subprocess.run(
        [python, "-c", imports],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=ENTRYPOINT_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, f"{name}: `{imports}` failed in the image layout:\n{proc.stderr[-4000:]}"
