"""The container images, as `scripts/build-images.sh` builds them, run with Docker the way the chart
runs them: the image's own numeric user, a read-only root filesystem, every capability dropped, a
tmpfs at /tmp, and no network where none is needed.

The build runs once per session (a warm run takes seconds: every image is cached by a hash of its
inputs). The Dockerfiles and .dockerignore are also checked statically, so a COPY of a path the
build context leaves out is named precisely rather than as a failed build.

Only what is cheap and names an image's own defect is checked here: importing the images into a
node's containerd and running them as restricted pods (serving, operator, training, MLflow and
pause) is the end-to-end tier's (tests/test_e2e_node.py), and so are TensorFlow training and the
MLflow server under the chart's command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import dedent

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-images.sh"
BUILD_TIMEOUT_SECONDS = 5400.0
RUN_TIMEOUT_SECONDS = 180.0
# A warm run only hashes inputs and asks Docker about tags; it must not rebuild anything.
WARM_RUN_LIMIT_SECONDS = 60.0
APP_UID = 10001
PAUSE_UID = 65535
# The first test to use the images waits for a cold build (base, five images, audits).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 900)

IMAGE_NAMES = ("training", "serving", "operator", "mlflow", "mlflow_previous", "pause")
PYTHON_IMAGES = ("training", "serving", "operator", "mlflow", "mlflow_previous")
DOCKERFILES = {
    "training": REPO_ROOT / "training_job" / "Dockerfile",
    "serving": REPO_ROOT / "serving" / "Dockerfile",
    "operator": REPO_ROOT / "operator" / "Dockerfile",
    "mlflow": REPO_ROOT / "mlflow-server" / "Dockerfile",
}
EXPECTED_ENTRYPOINT = {
    "training": ["python", "-m", "training_job"],
    "serving": ["python", "-m", "serving"],
    "operator": ["python", "-m", "mnist_operator"],
    "mlflow": ["mlflow"],
}
# One package each image's own requirements name, which its audit must count as direct.
DIRECT_REQUIREMENT = {
    "training": "tensorflow-cpu",
    "serving": "onnxruntime",
    "operator": "kopf",
    "mlflow": "mlflow",
    "mlflow_previous": "mlflow",
}
HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp")
OFFLINE = (*HARDENED, "--network", "none")


def pinned_version(requirements: Path, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", requirements.read_text(), re.MULTILINE)
    assert match, f"{requirements.name} does not pin {package}"
    return match.group(1)


MLFLOW_VERSION = pinned_version(REPO_ROOT / "requirements" / "training.txt", "mlflow")


# --- the build -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    refs: dict[str, str]
    seconds: float
    stderr: str


def run_build_script(*args: str) -> Build:
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"build-images.sh exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    lines = proc.stdout.strip().splitlines()
    tail = lines[-len(IMAGE_NAMES) :]
    refs = dict(line.split("=", 1) for line in tail if "=" in line)
    assert list(refs) == list(IMAGE_NAMES), f"the last stdout lines are not name=ref lines: {tail}"
    return Build(refs, seconds, proc.stderr)


@pytest.fixture(scope="session")
def build() -> Build:
    return run_build_script()


@pytest.fixture(scope="session")
def refs(build: Build) -> dict[str, str]:
    return build.refs


def docker(*args: str, timeout: float = RUN_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def docker_ok(*args: str, timeout: float = RUN_TIMEOUT_SECONDS) -> str:
    proc = docker(*args, timeout=timeout)
    assert proc.returncode == 0, f"docker {shlex.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def run_python(ref: str, code: str, *options: str) -> subprocess.CompletedProcess[str]:
    """`python -c CODE` in the image, offline and hardened, as the image's own user."""
    return docker("run", "--rm", *OFFLINE, *options, "--entrypoint", "python", ref, "-c", code)


def inspect(ref: str) -> dict[str, object]:
    loaded = json.loads(docker_ok("image", "inspect", ref))
    assert isinstance(loaded, list) and len(loaded) == 1
    entry = loaded[0]
    assert isinstance(entry, dict)
    return entry


def image_config(ref: str) -> dict[str, object]:
    config = inspect(ref)["Config"]
    assert isinstance(config, dict)
    return config


@pytest.fixture
def container_name() -> Iterator[str]:
    """A unique container name, removed whatever the test did with it."""
    name = f"mnist-mlops-test-{uuid.uuid4().hex[:10]}"
    yield name
    docker("rm", "--force", name, timeout=60)


# --- the build script's contract -----------------------------------------------------------------


def test_refs_are_content_tags_with_dev_aliases(refs: dict[str, str]) -> None:
    for name, ref in refs.items():
        repository, _, tag = ref.partition(":")
        expected_repository = "mnist-mlops/mlflow" if name.startswith("mlflow") else f"mnist-mlops/{name}"
        assert repository == expected_repository, f"{name}: {ref}"
        content_hash = tag.rsplit("-", 1)[-1]
        assert re.fullmatch(r"[0-9a-f]{12}", content_hash), f"{name}: {ref} is not tagged by content"
        if name != "pause":
            labels = image_config(ref)["Labels"]
            assert isinstance(labels, dict)
            assert labels.get("io.mnist-mlops.content-hash") == content_hash, f"{name}: label vs tag"
    assert refs["mlflow_previous"].split(":")[1].startswith(f"{previous_mlflow_version(refs)}-")
    assert len(set(refs.values())) == len(refs)
    for name in ("training", "serving", "operator", "mlflow", "pause"):
        dev = refs[name].split(":")[0] + ":dev"
        assert inspect(dev)["Id"] == inspect(refs[name])["Id"], f"{dev} does not follow {refs[name]}"


def test_warm_run_rebuilds_nothing(build: Build) -> None:
    warm = run_build_script()
    assert warm.refs == build.refs
    assert "building" not in warm.stderr, f"a warm run rebuilt something:\n{warm.stderr[-3000:]}"
    assert warm.seconds < WARM_RUN_LIMIT_SECONDS, f"warm run took {warm.seconds:.0f}s"


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them: its metadata may say tensorflow_cpu."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_python_image_was_audited(build: Build) -> None:
    """By scripts/audit_requirements.py --freeze, as the requirement sets are, with the installer
    tools the Dockerfiles take from requirements/mlflow-server.txt rather than venv's."""
    installer_pins = {
        tool: pinned_version(REPO_ROOT / "requirements" / "mlflow-server.txt", tool)
        for tool in ("pip", "setuptools")
    }
    for name in PYTHON_IMAGES:
        tag = build.refs[name].split(":")[1]
        line = re.search(rf"^build-images: audit {name} \S+: (\d+) packages", build.stderr, re.MULTILINE)
        assert line, f"{name}: no audit summary line in the build's stderr"
        assert int(line.group(1)) > 10, f"{name}: the audit saw too few packages: {line.group(0)}"
        cache = Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops"))
        report = json.loads((cache / "image-audits" / f"{name.replace('_', '-')}-{tag}.json").read_text())
        assert report["label"] == name
        versions = {canonical(package["name"]): package["version"] for package in report["packages"]}
        assert {"mlflow" if name.startswith("mlflow") else "pydantic"} <= versions.keys(), name
        installed = {tool: versions.get(tool) for tool in installer_pins}
        assert installed == installer_pins, f"{name}: installer tools {installed}, want {installer_pins}"
        direct = {canonical(package["name"]) for package in report["packages"] if package["direct"]}
        assert DIRECT_REQUIREMENT[name] in direct, f"{name}: direct {direct}"
        assert report["audited"] + report["not_auditable"] == len(report["packages"])


# --- every Python image --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PYTHON_IMAGES)
def test_runs_unprivileged_on_a_read_only_root(refs: dict[str, str], name: str) -> None:
    assert image_config(refs[name])["User"] == f"{APP_UID}:{APP_UID}"
    probe = dedent(
        """
        import os, pathlib
        print(os.getuid(), os.getgid())
        pathlib.Path('/tmp/probe').write_text('x')
        try:
            pathlib.Path('/opt/venv/probe').write_text('x')
        except OSError as e:
            print('read-only', e.errno)
        """
    )
    proc = run_python(refs[name], probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(APP_UID), str(APP_UID), "read-only", "30"], proc.stdout


# --- serving and operator: no TensorFlow ---------------------------------------------------------


@pytest.mark.parametrize("name", ["serving", "operator", "mlflow"])
def test_image_has_no_tensorflow(refs: dict[str, str], name: str) -> None:
    proc = run_python(refs[name], "import tensorflow")
    assert proc.returncode != 0
    assert "No module named 'tensorflow'" in proc.stderr, proc.stderr[-2000:]


def test_serving_entrypoint_and_app_start(refs: dict[str, str]) -> None:
    ref = refs["serving"]
    assert image_config(ref)["Entrypoint"] == EXPECTED_ENTRYPOINT["serving"]
    proc = docker("run", "--rm", *OFFLINE, ref, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m serving" in proc.stdout + proc.stderr
    proc = run_python(ref, "import serving.app, onnxruntime, uvicorn; print(onnxruntime.__version__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == pinned_version(REPO_ROOT / "requirements" / "serving.txt", "onnxruntime")


def test_operator_imports_and_stops_at_its_configuration_check(refs: dict[str, str]) -> None:
    ref = refs["operator"]
    assert image_config(ref)["Entrypoint"] == EXPECTED_ENTRYPOINT["operator"]
    proc = run_python(ref, "import mnist_operator.handlers, kopf; print(kopf.__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Without MLFLOW_TRACKING_URI it exits at its configuration check, after every import succeeded.
    proc = docker("run", "--rm", *OFFLINE, ref)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "MLFLOW_TRACKING_URI is required" in proc.stderr


# --- training ------------------------------------------------------------------------------------


def test_training_entrypoint_and_bundled_mnist(refs: dict[str, str]) -> None:
    ref = refs["training"]
    assert image_config(ref)["Entrypoint"] == EXPECTED_ENTRYPOINT["training"]
    proc = docker("run", "--rm", *OFFLINE, ref, "train", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--architecture" in proc.stdout
    # Without importing TensorFlow (seconds of CPU): the training pods of the end-to-end tier do.
    check = dedent(
        """
        import os, numpy as np
        from importlib.metadata import version
        with np.load(os.environ['MNIST_NPZ']) as d:
            print(version('tensorflow-cpu'), d['x_train'].shape, d['x_test'].shape)
        """
    )
    proc = run_python(ref, check)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tf_version = pinned_version(REPO_ROOT / "requirements" / "training.txt", "tensorflow-cpu")
    assert proc.stdout.strip() == f"{tf_version} (60000, 28, 28) (10000, 28, 28)"


# --- MLflow --------------------------------------------------------------------------------------


def previous_mlflow_version(refs: dict[str, str]) -> str:
    return refs["mlflow_previous"].split(":")[1].rsplit("-", 1)[0]


def test_mlflow_versions_and_the_charts_optional_backends(refs: dict[str, str]) -> None:
    """One interpreter per image: each MLflow import costs seconds of CPU."""
    code = "import psycopg2, boto3, flask_wtf, mlflow.server.auth, mlflow; print(mlflow.__version__)"
    previous = previous_mlflow_version(refs)
    for name, version in (("mlflow", MLFLOW_VERSION), ("mlflow_previous", previous)):
        assert image_config(refs[name])["Entrypoint"] == EXPECTED_ENTRYPOINT["mlflow"], name
        proc = run_python(refs[name], code)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert proc.stdout.strip() == version, f"{name}: {proc.stdout}"
    as_tuple = [tuple(int(p) for p in v.split(".")) for v in (previous, MLFLOW_VERSION)]
    assert as_tuple[0][0] == as_tuple[1][0] and as_tuple[0][:2] < as_tuple[1][:2], "an older 3.x minor"


def chart_mlflow_command() -> list[str]:
    template = (REPO_ROOT / "charts/mnist-mlops/templates/mlflow/deployment.yaml").read_text()
    commands = [json.loads(found) for found in re.findall(r"^\s*command: (\[.*\])$", template, re.MULTILINE)]
    servers = [command for command in commands if isinstance(command, list) and "server" in command]
    assert len(servers) == 1, f"the chart's MLflow Deployment has no one `mlflow server` command: {commands}"
    return [str(word) for word in servers[0]]


def start_mlflow(ref: str, name: str, data: Path) -> None:
    """The chart's command and arguments, with the volume at /mlflow, as the chart's pod runs it."""
    command = chart_mlflow_command()
    docker_ok(
        "run",
        "--detach",
        "--name",
        name,
        *OFFLINE,
        "--volume",
        f"{data}:/mlflow",
        "--env",
        "HOME=/tmp",
        "--env",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false",
        "--entrypoint",
        command[0],
        ref,
        *command[1:],
        "--host=127.0.0.1",
        "--port=5000",
        "--workers=1",
        "--backend-store-uri=sqlite:////mlflow/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination=/mlflow/artifacts",
    )


def wait_healthy(name: str, timeout: float = 180.0) -> None:
    """Polls /health from inside the container: it has no network reachable from outside."""
    probe = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:5000/health').read())"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = docker("exec", name, "python", "-c", probe, timeout=30)
        if proc.returncode == 0 and "OK" in proc.stdout:
            return
        state = docker_ok("inspect", "--format", "{{.State.Running}}", name).strip()
        assert state == "true", f"mlflow exited:\n{docker('logs', name).stderr[-4000:]}"
        time.sleep(2)
    raise AssertionError(f"mlflow not healthy in {timeout:.0f}s:\n{docker('logs', name).stderr[-4000:]}")


def schema_revision(database: Path) -> str:
    with sqlite3.connect(database) as connection:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert row is not None
    return str(row[0])


def writable_volume(tmp_path: Path) -> Path:
    data = tmp_path / "mlflow"
    data.mkdir()
    os.chown(data, APP_UID, APP_UID)
    return data


def test_previous_mlflow_database_upgrades_to_the_pinned_one(refs: dict[str, str], tmp_path: Path) -> None:
    """What a `helm upgrade` from the previous image does to the volume, minus the cluster."""
    data = writable_volume(tmp_path)
    old_name = f"mnist-mlops-test-{uuid.uuid4().hex[:10]}"
    try:
        start_mlflow(refs["mlflow_previous"], old_name, data)
        wait_healthy(old_name)
    finally:
        docker("rm", "--force", old_name, timeout=60)
    old_revision = schema_revision(data / "mlflow.db")
    proc = docker(
        "run",
        "--rm",
        *OFFLINE,
        "--volume",
        f"{data}:/mlflow",
        refs["mlflow"],
        "db",
        "upgrade",
        "sqlite:////mlflow/mlflow.db",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    new_revision = schema_revision(data / "mlflow.db")
    heads = run_python(
        refs["mlflow"],
        "from alembic.script import ScriptDirectory; from mlflow.store.db.utils import _get_alembic_config;"
        "print(ScriptDirectory.from_config(_get_alembic_config('sqlite://')).get_current_head())",
    )
    assert heads.returncode == 0, heads.stderr[-3000:]
    assert new_revision == heads.stdout.strip(), "the database is not at the pinned MLflow's schema head"
    assert old_revision != new_revision, (
        f"MLflow {previous_mlflow_version(refs)} and {MLFLOW_VERSION} share schema {old_revision}: "
        "an upgrade test would see no migration; pick an older previous version"
    )


# --- pause ---------------------------------------------------------------------------------------


def test_pause_is_a_lone_static_binary(refs: dict[str, str]) -> None:
    config = image_config(refs["pause"])
    assert config["Entrypoint"] == ["/pause"]
    assert config["User"] == f"{PAUSE_UID}:{PAUSE_UID}"
    layers = inspect(refs["pause"])["RootFS"]
    assert isinstance(layers, dict) and len(layers["Layers"]) == 1
    size = inspect(refs["pause"])["Size"]
    assert isinstance(size, int) and size < 2_000_000


def test_pause_stops_promptly_on_sigterm(refs: dict[str, str], container_name: str) -> None:
    docker_ok("run", "--detach", "--name", container_name, *OFFLINE, refs["pause"])
    time.sleep(0.5)
    assert docker_ok("inspect", "--format", "{{.State.Running}}", container_name).strip() == "true"
    started = time.monotonic()
    docker_ok("stop", "--time", "5", container_name)
    elapsed = time.monotonic() - started
    # Docker falls back to SIGKILL (exit 137) after 5 s when the signal is ignored.
    assert elapsed < 5.0, f"docker stop took {elapsed:.1f}s: SIGTERM was not honoured"
    assert docker_ok("inspect", "--format", "{{.State.ExitCode}}", container_name).strip() == "0"


def test_pause_reaps_orphans_in_a_shared_pid_namespace(refs: dict[str, str], container_name: str) -> None:
    docker_ok("run", "--detach", "--name", container_name, *OFFLINE, refs["pause"])
    shared = ("--pid", f"container:{container_name}")
    # The parent exits at once; its child is re-parented to pause (PID 1) and exits later.
    orphan = dedent(
        """
        import os, time
        if os.fork() == 0:
            time.sleep(1)
            os._exit(0)
        os._exit(0)
        """
    )
    proc = run_python(refs["serving"], orphan, *shared)
    assert proc.returncode == 0, proc.stderr[-2000:]
    zombies = dedent(
        """
        import pathlib, time
        time.sleep(3)
        stats = [p.read_text() for p in pathlib.Path('/proc').glob('[0-9]*/stat')]
        states = [stat.rsplit(')', 1)[1].split()[0] for stat in stats]
        print(len(states), states.count('Z'))
        """
    )
    proc = run_python(refs["serving"], zombies, *shared)
    assert proc.returncode == 0, proc.stderr[-2000:]
    processes, zombie_count = (int(word) for word in proc.stdout.split())
    assert processes >= 2, f"the probe did not share pause's PID namespace: {proc.stdout}"
    assert zombie_count == 0, "pause left an exited orphan unreaped"


# --- the Dockerfiles and the build context, statically ---------------------------------------------


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    from_stage: str | None


@dataclass
class Stage:
    name: str | None
    copies: list[Copy] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    user: str | None = None
    entrypoint: list[str] = field(default_factory=list)


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not pending and not line):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        assert instruction != "ADD", f"{path}: use COPY (the build script's content hash reads COPY only)"
        if instruction == "FROM":
            words = rest.split()
            stages.append(Stage(name=words[2] if len(words) >= 3 and words[1].upper() == "AS" else None))
            continue
        if not stages:
            continue
        stage = stages[-1]
        if instruction == "COPY":
            words = shlex.split(rest)
            from_stage = next((w.removeprefix("--from=") for w in words if w.startswith("--from=")), None)
            words = [w for w in words if not w.startswith("--")]
            stage.copies.append(Copy(tuple(words[:-1]), words[-1], from_stage))
        elif instruction == "RUN":
            stage.runs.append(rest)
        elif instruction == "USER":
            stage.user = rest
        elif instruction == "ENTRYPOINT":
            loaded = json.loads(rest)
            assert isinstance(loaded, list), f"{path}: ENTRYPOINT must use the exec (JSON) form"
            stage.entrypoint = [str(word) for word in loaded]
    return stages


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (moby/patternmatcher): ** crosses directories, * and ? do not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
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


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_shape(name: str) -> None:
    stages = parse_dockerfile(DOCKERFILES[name])
    final = stages[-1]
    assert len(stages) >= 2, f"{name}: multi-stage (build, then a runtime stage)"
    # Numeric, so the kubelet can verify runAsNonRoot; the chart's pods run as the same uid.
    assert final.user == f"{APP_UID}:{APP_UID}", f"{name}: USER must be {APP_UID}:{APP_UID}"
    assert final.entrypoint == EXPECTED_ENTRYPOINT[name]
    assert not any("pip install" in run for run in final.runs), (
        f"{name}: the runtime stage copies the build stage's virtualenv instead of installing"
    )
    assert any(copy.from_stage == stages[0].name for copy in final.copies)
    requirement_copies = [
        source for copy in stages[0].copies for source in copy.sources if source.startswith("requirements/")
    ]
    # Its own set, then the installer tools' pins, which requirements/mlflow-server.txt holds for all.
    own = "requirements/mlflow-server.txt" if name == "mlflow" else f"requirements/{name}.txt"
    assert requirement_copies[0] == own, f"{name}: the build stage installs {own} first"
    assert set(requirement_copies) == {own, "requirements/mlflow-server.txt"}, requirement_copies
    if name != "mlflow":  # whose set pins them itself
        replaces = any(re.search(r"\bpip\b.*\bsetuptools\b", run) for run in stages[0].runs)
        assert replaces, f"{name}: the build stage does not replace venv's pip and setuptools"
    for source in set(requirement_copies):
        for line in (REPO_ROOT / source).read_text().splitlines():
            requirement = line.split("#")[0].strip()
            if requirement and not requirement.startswith("-r"):
                assert re.search(r"==|<", requirement), f"{source}: {requirement!r} is unbounded"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copies_are_in_the_build_context(name: str) -> None:
    rules = _dockerignore_rules()
    for stage in parse_dockerfile(DOCKERFILES[name]):
        for copy in stage.copies:
            if copy.from_stage is not None:
                continue
            for source in copy.sources:
                path = REPO_ROOT / source
                assert path.exists(), f"{name}: COPY source {source} does not exist"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                kept = [p for p in files if in_build_context(p.relative_to(REPO_ROOT).as_posix(), rules)]
                assert kept, f"{name}: .dockerignore leaves COPY source {source} out of the build context"
                dropped = [p for p in files if p.suffix == ".py" and p not in kept]
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
        "requirements/mlflow-server.txt",
    ):
        assert in_build_context(inside, rules), f"{inside} must be in the build context"
    assert not in_build_context("serving/__pycache__/app.cpython-311.pyc", rules)
