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
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent

import pytest

from scripts import dockerfile_inputs

REPO_ROOT = Path(__file__).resolve().parents[2]
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
PYTHON_BASES = REPO_ROOT / "images" / "python.Dockerfile"
INSTALLER_HELPER = "replace-installer-tools"
PIP_SETTINGS = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_PROXY",
)
# Our projects the images pip-install, and the packages each image must hold installed, compiled.
INSTALLED_PROJECTS = ("contract", "prediction_log", "drift", "training_job", "operator", "serving")
INSTALLED_PACKAGES = {
    "training": ("contract", "prediction_log", "drift", "training_job"),
    "serving": ("prediction_log", "serving", "serving.grpc", "serving.rest"),
    "operator": ("contract", "prediction_log", "mnist_operator"),
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


def test_serving_serves_its_web_page_from_the_installed_package(
    refs: dict[str, str], container_name: str
) -> None:
    """The page and its assets are package data of the installed `serving` (no PYTHONPATH, no /app)."""
    ref = refs["serving"]
    env = image_config(ref)["Env"]
    assert isinstance(env, list) and not [entry for entry in env if str(entry).startswith("PYTHONPATH=")]
    # No registry to reach: the model loader keeps retrying in the background, the page is served anyway.
    docker_ok(
        "run",
        "--detach",
        "--name",
        container_name,
        *OFFLINE,
        "--env",
        "MLFLOW_TRACKING_URI=http://127.0.0.1:9",
        ref,
    )
    probe = dedent(
        """
        import json, time, urllib.request
        deadline = time.monotonic() + 60
        while True:
            try:
                page = urllib.request.urlopen('http://127.0.0.1:8000/', timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        script = urllib.request.urlopen('http://127.0.0.1:8000/static/app.js', timeout=5)
        print(json.dumps([page.status, page.headers['content-type'], page.read().decode()[:200],
                          script.status, len(script.read())]))
        """
    )
    proc = docker("exec", container_name, "python", "-c", probe, timeout=120)
    assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n{docker('logs', container_name).stderr[-3000:]}"
    status, content_type, head, script_status, script_size = json.loads(proc.stdout)
    assert (status, script_status) == (200, 200)
    assert content_type.startswith("text/html") and "<html" in head.lower(), head
    assert script_size == (REPO_ROOT / "serving" / "static" / "app.js").stat().st_size


@pytest.mark.parametrize("name", sorted(INSTALLED_PACKAGES))
def test_our_packages_are_installed_and_compiled(refs: dict[str, str], name: str) -> None:
    """pip-installed into the virtualenv, byte-code compiled at build time (the root is read-only)."""
    check = dedent(
        f"""
        import importlib.util, os
        for package in {INSTALLED_PACKAGES[name]!r}:
            origin = importlib.util.find_spec(package).origin
            compiled = os.path.exists(importlib.util.cache_from_source(origin))
            print(package, origin.startswith('/opt/venv/lib/python3.11/site-packages/'), compiled)
        """
    )
    proc = run_python(refs[name], check)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [f"{package} True True" for package in INSTALLED_PACKAGES[name]]
    assert proc.stdout.strip().splitlines() == expected, proc.stdout


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


def _venv_runs(stage: dockerfile_inputs.Stage) -> list[str]:
    return [run for run in stage.runs if "venv" in run]


def test_python_bases_shape() -> None:
    """What every Python image shares is said once, in images/python.Dockerfile."""
    stages = {stage.name: stage for stage in dockerfile_inputs.parse_file(PYTHON_BASES)}
    assert set(stages) == {"builder", "runtime"}, f"{PYTHON_BASES}: stages {list(stages)}"
    builder, runtime = stages["builder"], stages["runtime"]
    assert any("python -m venv /opt/venv" in run for run in builder.runs)
    assert builder.env["PATH"].startswith("/opt/venv/bin:")
    # The host's index settings reach every app's build stage, which is discarded with them.
    assert set(PIP_SETTINGS) <= set(builder.args), builder.args
    helper = [copy for copy in builder.copies if copy.destination == f"/usr/local/bin/{INSTALLER_HELPER}"]
    assert len(helper) == 1, f"{PYTHON_BASES}: the builder does not install {INSTALLER_HELPER}"
    helper_text = (REPO_ROOT / helper[0].sources[0]).read_text()
    assert "pip|setuptools" in helper_text and "/opt/venv/bin/pip install" in helper_text
    assert os.access(REPO_ROOT / helper[0].sources[0], os.X_OK), "the helper must be executable"
    # Numeric, so the kubelet can verify runAsNonRoot; the chart's pods run as the same uid.
    assert runtime.user == f"{APP_UID}:{APP_UID}"
    assert any(f"--uid {APP_UID}" in run for run in runtime.runs)
    assert runtime.env["PATH"].startswith("/opt/venv/bin:")
    assert runtime.env["HOME"] == "/tmp" and runtime.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert not runtime.copies and not any("pip" in run for run in runtime.runs)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_shape(name: str) -> None:
    stages = dockerfile_inputs.parse_file(DOCKERFILES[name])
    assert len(stages) == 2, f"{name}: a build stage, then a runtime stage"
    build, final = stages
    assert (build.base, final.base) == ("${BUILDER_IMAGE}", "${RUNTIME_IMAGE}"), name
    # What the bases give is not said again (tests/test_images.py::test_python_bases_shape).
    for stage in stages:
        assert not _venv_runs(stage), f"{name}: the builder base creates the virtualenv"
        assert not any("useradd" in run for run in stage.runs), f"{name}: the runtime base adds the user"
        assert not set(PIP_SETTINGS) & set(stage.args), f"{name}: the builder base declares the pip ARGs"
    assert final.user in (None, f"{APP_UID}:{APP_UID}"), f"{name}: runs as {final.user}, not {APP_UID}"
    assert final.entrypoint == EXPECTED_ENTRYPOINT[name]
    assert not any("pip install" in run for run in final.runs), (
        f"{name}: the runtime stage copies the build stage's virtualenv instead of installing"
    )
    assert any(copy.from_stage == build.name for copy in final.copies)
    requirement_copies = [
        source for copy in build.copies for source in copy.sources if source.startswith("requirements/")
    ]
    # Its own set, then the installer tools' pins, which requirements/mlflow-server.txt holds for all.
    own = "requirements/mlflow-server.txt" if name == "mlflow" else f"requirements/{name}.txt"
    assert requirement_copies[0] == own, f"{name}: the build stage installs {own} first"
    assert set(requirement_copies) == {own, "requirements/mlflow-server.txt"}, requirement_copies
    if name != "mlflow":  # whose set pins them itself
        replaces = any(run.startswith(INSTALLER_HELPER) for run in build.runs)
        assert replaces, f"{name}: the build stage does not replace venv's pip and setuptools"
    for source in set(requirement_copies):
        for line in (REPO_ROOT / source).read_text().splitlines():
            requirement = line.split("#")[0].strip()
            if requirement and not requirement.startswith("-r"):
                assert re.search(r"==|<", requirement), f"{source}: {requirement!r} is unbounded"
    # Our code is installed from its pyproject.toml, never copied where PYTHONPATH would find it.
    assert "PYTHONPATH" not in final.env, f"{name}: our packages are installed, not put on PYTHONPATH"
    ours = [copy for copy in build.copies if not copy.sources[0].startswith("requirements/")]
    for copy in ours:
        (source,) = copy.sources
        assert (REPO_ROOT / source / "pyproject.toml").is_file(), f"{name}: COPY {source} is no project"
        assert any(
            "pip install --no-deps" in run and copy.destination.rstrip("/") in run for run in build.runs
        ), f"{name}: {source} is copied but not pip-installed"
    assert not [copy for copy in final.copies if copy.from_stage is None and copy.sources[0].endswith(".py")]


@pytest.mark.parametrize("project", INSTALLED_PROJECTS)
def test_installed_projects_name_every_subpackage(project: str) -> None:
    """setuptools installs only the packages pyproject.toml lists: a new subpackage left out would be
    missing from the image only."""
    root = REPO_ROOT / project
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    package_dirs: dict[str, str] = config.get("package-dir", {})
    on_disk: set[str] = set()
    for top in {package.split(".")[0] for package in listed}:
        top_dir = root / package_dirs.get(top, top)
        for init in top_dir.rglob("__init__.py"):
            relative = init.parent.relative_to(top_dir)
            if not {"build", "__pycache__"} & set(relative.parts):
                on_disk.add(".".join((top, *relative.parts)))
    assert listed == on_disk, (
        f"{project}/pyproject.toml lists {sorted(listed)}, the tree has {sorted(on_disk)}"
    )
    for package, patterns in config.get("package-data", {}).items():
        package_dir = root / package_dirs.get(package, package.replace(".", "/"))
        for pattern in patterns:
            assert list(package_dir.glob(pattern)), f"{project}: package-data {pattern} matches nothing"


def test_serving_installs_its_web_page() -> None:
    config = tomllib.loads((REPO_ROOT / "serving" / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "static/*" in config["package-data"]["serving"]
    shipped = {path.name for path in (REPO_ROOT / "serving" / "static").iterdir()}
    assert {"index.html", "app.js", "style.css"} <= shipped


@pytest.mark.parametrize(
    "dockerfile", [*sorted(DOCKERFILES.values()), PYTHON_BASES], ids=lambda p: p.parent.name
)
def test_copies_are_in_the_build_context(dockerfile: Path) -> None:
    ignore = dockerfile_inputs.DockerIgnore.for_context(REPO_ROOT)
    for source in dockerfile_inputs.context_sources(dockerfile_inputs.parse_file(dockerfile)):
        path = REPO_ROOT / source
        assert path.exists(), f"{dockerfile}: COPY source {source} does not exist"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        kept = [p for p in files if ignore.admits(p.relative_to(REPO_ROOT).as_posix())]
        assert kept, f"{dockerfile}: .dockerignore leaves COPY source {source} out of the build context"
        dropped = [p for p in files if p.suffix in (".py", ".toml") and p not in kept]
        assert not dropped, f"{dockerfile}: .dockerignore drops {dropped[:3]} from COPY {source}"


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = dockerfile_inputs.DockerIgnore.for_context(REPO_ROOT)
    for outside in (
        "tests/conftest.py",
        ".git/HEAD",
        "bench/results/x.json",
        "charts/mnist-mlops/Chart.yaml",
        "serving/build/lib/serving/app.py",
        "contract/mnist_mlops_contract.egg-info/PKG-INFO",
    ):
        assert not ignore.admits(outside), f"{outside} should not be sent to the builder"
    for inside in (
        "contract/spec.py",
        "prediction_log/store.py",
        "prediction_log/pyproject.toml",
        "drift/pyproject.toml",
        "operator/pyproject.toml",
        "serving/pyproject.toml",
        "serving/__main__.py",
        "serving/static/index.html",
        "data/mnist.npz",
        "requirements/serving.txt",
        "requirements/mlflow-server.txt",
        f"images/{INSTALLER_HELPER}.sh",
    ):
        assert ignore.admits(inside), f"{inside} must be in the build context"
    assert not ignore.admits("serving/__pycache__/app.cpython-311.pyc")


# --- the content hash (scripts/dockerfile_inputs.py) ---------------------------------------------------


def _context(tmp_path: Path) -> Path:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "data.txt").write_text("data\n")
    (tmp_path / "pkg" / "notes.md").write_text("ignored\n")
    (tmp_path / "other.txt").write_text("not copied\n")
    (tmp_path / ".dockerignore").write_text("**/*.md\n")
    stages = ("FROM ${BASE} AS build", "COPY pkg/ /src/pkg/", "FROM ${BASE}", "COPY --from=build /src /src")
    (tmp_path / "Dockerfile").write_text("\n".join(("ARG BASE=scratch", *stages, "")))
    return tmp_path


def test_content_hash_covers_every_input_and_nothing_else(tmp_path: Path) -> None:
    root = _context(tmp_path)
    dockerfile = root / "Dockerfile"
    assert dockerfile_inputs.input_files(root, dockerfile) == ["pkg/mod.py", "pkg/sub/data.txt"]

    def digest(*extras: str) -> str:
        return dockerfile_inputs.content_hash(root, dockerfile, extras)

    first = digest("base=sha256:1")
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    assert digest("base=sha256:1") == first
    (root / "other.txt").write_text("changed\n")
    (root / "pkg" / "notes.md").write_text("changed, but .dockerignore leaves it out\n")
    assert digest("base=sha256:1") == first
    changes: dict[str, str] = {"extra": digest("base=sha256:2")}
    (root / "pkg" / "sub" / "data.txt").write_text("other data\n")
    changes["copied file"] = digest("base=sha256:1")
    (root / "pkg" / "mod.py").chmod(0o755)
    changes["executable bit"] = digest("base=sha256:1")
    dockerfile.write_text(dockerfile.read_text() + "ENV X=1\n")
    changes["Dockerfile"] = digest("base=sha256:1")
    seen = [first, *changes.values()]
    assert len(set(seen)) == len(seen), f"some change left the hash as it was: {changes}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ADD pkg/ /src/", "ADD is not supported"),
        ("COPY ${DIR}/ /src/", "variable"),
        ("COPY nowhere/ /x/", "does not exist"),
    ],
)
def test_content_hash_refuses_what_it_cannot_follow(tmp_path: Path, line: str, message: str) -> None:
    root = _context(tmp_path)
    (root / "Dockerfile").write_text(f"FROM scratch\n{line}\n")
    with pytest.raises(dockerfile_inputs.DockerfileError, match=message):
        dockerfile_inputs.content_hash(root, root / "Dockerfile")
    assert dockerfile_inputs.main(["hash", "--root", str(root), str(root / "Dockerfile")]) == 2


def test_content_hash_cli_matches_the_module(tmp_path: Path) -> None:
    root = _context(tmp_path)
    proc = subprocess.run(
        [
            "python3",
            str(REPO_ROOT / "scripts" / "dockerfile_inputs.py"),
            "hash",
            "--root",
            str(root),
            str(root / "Dockerfile"),
            "--",
            "--build-arg",
            "K=V",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == dockerfile_inputs.content_hash(
        root, root / "Dockerfile", ["--build-arg", "K=V"]
    )
