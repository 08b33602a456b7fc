"""Audit every requirement set (requirements/*.txt), or an image's installed packages, for known
vulnerabilities.

    python scripts/audit_requirements.py [SET ...]     # `make audit`; tests/test_audit.py runs it too
    python scripts/audit_requirements.py --freeze FILE --label IMAGE [--requirement FILE] [--direct NAME]
        [--report FILE.json]                           # scripts/build-images.sh, once per image

The sets pin their direct requirements only, so auditing the files alone (`pip-audit -r --no-deps`)
would miss every transitive package, and letting pip-audit resolve them builds a virtualenv per set.
Instead each set is resolved where it is installed: the project virtualenv (`make venv` installs
dev.txt, which includes training, serving and operator) or, for checkov.txt, the checkov virtualenv.
Walking the installed metadata from the set's requirements (extras and markers included) gives the
set's complete pinned closure, plus the installer tools (pip, setuptools, wheel) that every
virtualenv carries. A set installed nowhere here (an image-only set such as mlflow-server.txt) is
resolved by pip's resolver without installing anything (`pip install --dry-run --report`). The pins
are then audited by pip-audit with `--no-deps --disable-pip`: no resolution, no virtualenv.

--freeze audits a complete `name==version` list instead (what an image holds, as build-images.sh lists
it), with the same sources, cache, ignore file and verdict as a set; the packages named by --requirement
files or --direct count as its direct requirements. --report writes the verdict as JSON, so the caller
can keep it and decide strict or not later without auditing again.

pip-audit asks PyPI's per-release JSON (`/pypi/NAME/VERSION/json`). Where that answers 404 (mirrors and
proxies of PyPI often serve only the project JSON), pip-audit reports "Dependency not found on PyPI and
could not be audited"; the audit then reads PyPI's project JSON, whose advisories are those of the
latest release: a pin that *is* the latest release is audited from it, any other pin is reported as
not auditable.

The verdict of a set: a known vulnerability fails it unless its ID or an alias is listed in
requirements/audit-ignore.conf (`ID  # reason, YYYY-MM-DD`). Packages that could not be audited are
always reported (the test turns them into a warning in pytest's summary); with --strict (`make audit`)
a *direct* requirement that could not be audited fails the set unless the ignore file acknowledges it
as `unaudited:NAME  # reason, YYYY-MM-DD`. The ignore file is not a *.txt file on purpose: the
Makefile keys the virtualenv on requirements/*.txt.

Bounded and cached: socket timeouts of 15 s, a 300 s ceiling on each pip-audit or pip process, and
under ${MNIST_MLOPS_CACHE:-~/.cache/mnist-mlops}/audit pip-audit's HTTP cache plus each pin's verdict,
PyPI's latest-release advisories and pip's dry-run resolutions, reused for MNIST_MLOPS_AUDIT_TTL seconds
(default 3600: PyPI's JSON carries no validators to revalidate with).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import requests
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS_DIR = REPO_ROOT / "requirements"
IGNORE_FILE = REQUIREMENTS_DIR / "audit-ignore.conf"
PROJECT_SET = "dev"  # what `make venv` installs; the sets it includes (-r) are installed with it
SEPARATE_VENVS = {"checkov": "checkov"}  # set -> prefix of its own virtualenv (Makefile's CHECKOV_VENV)
INSTALLER_TOOLS = ("pip", "setuptools", "wheel")

PYPI_URL = "https://pypi.org/pypi"
SOCKET_TIMEOUT = 15  # seconds, for pip-audit's, pip's and our requests
PROCESS_TIMEOUT = 300.0  # seconds for one pip-audit or pip run
PIP_AUDIT_BATCH = 40  # pins per pip-audit process; a few run side by side (its lookups are serial)
PIP_AUDIT_PROCESSES = 4
HTTP_WORKERS = 8
DEFAULT_TTL = 3600.0
NOT_FOUND_ON_PYPI = "not found on PyPI"
STRICT_ENV = "MNIST_MLOPS_AUDIT_STRICT"
TRANSIENT_REASON = "PyPI's project JSON could not be read"


class AuditError(RuntimeError):
    """The audit could not run (as opposed to: it found something)."""


def cache_root() -> Path:
    return Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops")) / "audit"


def ttl_seconds() -> float:
    return float(os.environ.get("MNIST_MLOPS_AUDIT_TTL", DEFAULT_TTL))


def _read_fresh(path: Path, ttl: float) -> Any:
    if path.exists() and time.time() - path.stat().st_mtime < ttl:
        return json.loads(path.read_text())
    return None


def _write(path: Path, value: Any) -> None:
    """Atomically, so that concurrent runs (parallel shells, CI) never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value))
    partial.replace(path)


# --- requirement sets, and where they are installed ---------------------------------------------


def requirement_sets() -> list[str]:
    return sorted(path.stem for path in REQUIREMENTS_DIR.glob("*.txt"))


def read_requirements(path: Path) -> tuple[list[Requirement], list[Path]]:
    """The requirements of a file and the files it includes (`-r`); any other option is refused."""
    found: list[Requirement] = []
    included: list[Path] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        option = re.fullmatch(r"(?:-r|--requirement)[\s=]+(\S+)", line)
        if option:
            nested = path.parent / option.group(1)
            nested_requirements, nested_included = read_requirements(nested)
            found.extend(nested_requirements)
            included.extend([nested, *nested_included])
        elif line.startswith("-"):
            raise AuditError(f"{path.name}:{number}: an option the audit does not support: {raw!r}")
        else:
            found.append(Requirement(line))
    return found, included


def project_venv() -> Path:
    """The virtualenv `make venv` made: this interpreter's, else the Makefile's VENV path."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    everything = b"".join(path.read_bytes() for path in sorted(REQUIREMENTS_DIR.glob("*.txt")))
    return cache_root().parent / f"venv-{hashlib.sha256(everything).hexdigest()[:12]}"


def installed_in(set_name: str) -> Path | None:
    """The virtualenv the Makefile installs a set into, or None for a set installed only in images."""
    if set_name in SEPARATE_VENVS:
        configured = os.environ.get("CHECKOV")  # what `make test` hands the suite
        if configured and set_name == "checkov":
            return Path(configured).resolve().parent.parent
        digest = hashlib.sha256((REQUIREMENTS_DIR / f"{set_name}.txt").read_bytes()).hexdigest()[:12]
        return cache_root().parent / f"{SEPARATE_VENVS[set_name]}-{digest}"
    _, included = read_requirements(REQUIREMENTS_DIR / f"{PROJECT_SET}.txt")
    if set_name == PROJECT_SET or set_name in {path.stem for path in included}:
        return project_venv()
    return None


@dataclasses.dataclass(frozen=True)
class Installed:
    name: str
    version: str
    requires: tuple[str, ...]


@functools.cache
def installed_distributions(venv: Path) -> dict[str, Installed]:
    """What a virtualenv holds, read once (each metadata read parses the METADATA file anew)."""
    site_packages = sorted((venv / "lib").glob("python3*/site-packages"))
    if not site_packages:
        raise AuditError(f"no virtualenv at {venv}: `make venv` makes it (`make test` also checkov's)")
    found: dict[str, Installed] = {}
    for dist in metadata.distributions(path=[str(path) for path in site_packages]):
        fields = dist.metadata
        installed = Installed(fields["Name"], fields["Version"], tuple(fields.get_all("Requires-Dist") or ()))
        found.setdefault(canonicalize_name(installed.name), installed)
    return found


@dataclasses.dataclass(frozen=True)
class Pin:
    name: str
    version: str
    direct: bool  # named in the set's requirement file(s)

    @property
    def key(self) -> str:
        return canonicalize_name(self.name)

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def _applies(marker: Marker | None, extras: Iterable[str]) -> bool:
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras))


def closure(requirements: Sequence[Requirement], installed: Mapping[str, Installed]) -> list[Pin]:
    """What `pip install` of the requirements put into an environment, read from its metadata."""
    problems: list[str] = []
    wanted = [req for req in requirements if _applies(req.marker, ())]
    direct = {canonicalize_name(req.name) for req in wanted}
    extras_seen: dict[str, set[str]] = {}
    queue: list[tuple[Requirement, str]] = [(req, "the requirement file") for req in wanted]
    while queue:
        req, wanted_by = queue.pop()
        key = canonicalize_name(req.name)
        dist = installed.get(key)
        if dist is None:
            problems.append(f"{req} (wanted by {wanted_by}) is not installed")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req} (wanted by {wanted_by}), but {dist.version} is installed")
        extras = set(req.extras)
        if key in extras_seen and extras <= extras_seen[key]:
            continue
        extras_seen[key] = extras_seen.get(key, set()) | extras
        for spec in dist.requires or []:
            child = Requirement(spec)
            if _applies(child.marker, extras):
                queue.append((child, f"{dist.name} {dist.version}"))
    if problems:
        raise AuditError(
            "the virtualenv does not hold the set as pinned (stale? `make venv` refreshes it):\n  "
            + "\n  ".join(sorted(problems))
        )
    keys = set(extras_seen) | {tool for tool in INSTALLER_TOOLS if tool in installed}
    return [Pin(installed[key].name, installed[key].version, key in direct) for key in sorted(keys)]


def pip_resolution(path: Path, requirements: Sequence[Requirement], cache: Path, ttl: float) -> list[Pin]:
    """What pip would install for the file today, from its resolver's report; installs nothing."""
    digest = hashlib.sha256("\n".join(sorted(map(str, requirements))).encode()).hexdigest()[:16]
    cached = cache / "resolved" / f"{path.stem}-{digest}.json"
    found = _read_fresh(cached, ttl)
    if found is None:
        with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
            report = Path(tmp) / "report.json"
            command = [
                sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                "--timeout", str(SOCKET_TIMEOUT), "--report", str(report), "--requirement", str(path),
            ]  # fmt: skip
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise AuditError(f"pip could not resolve {path.name} in {PROCESS_TIMEOUT:.0f} s") from exc
            if proc.returncode != 0 or not report.exists():
                raise AuditError(f"pip could not resolve {path.name}:\n{proc.stderr[-3000:]}")
            found = [
                [item["metadata"]["name"], item["metadata"]["version"], bool(item.get("requested"))]
                for item in json.loads(report.read_text())["install"]
            ]
        _write(cached, found)
    return sorted((Pin(name, version, direct) for name, version, direct in found), key=lambda pin: pin.key)


@dataclasses.dataclass(frozen=True)
class Resolution:
    set_name: str
    source: str  # where the pins come from, for the report
    pins: list[Pin]


def resolve_set(set_name: str, cache: Path, ttl: float) -> Resolution:
    path = REQUIREMENTS_DIR / f"{set_name}.txt"
    requirements, _ = read_requirements(path)
    venv = installed_in(set_name)
    if venv is None:
        pins = pip_resolution(path, requirements, cache, ttl)
        return Resolution(set_name, "pip's resolver (--dry-run: installed only in an image)", pins)
    return Resolution(set_name, f"installed in {venv}", closure(requirements, installed_distributions(venv)))


FROZEN_LINE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)")


def read_freeze(path: Path, label: str, direct: Iterable[str]) -> Resolution:
    """A complete `name==version` list: nothing is resolved, so anything looser is refused."""
    direct_keys = {canonicalize_name(name) for name in direct}
    pins: dict[str, Pin] = {}
    problems: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        entry = FROZEN_LINE.fullmatch(line)
        if entry is None:
            problems.append(f"{path.name}:{number}: want `name==version`, got {raw!r}")
            continue
        pin = Pin(
            entry.group("name"), entry.group("version"), canonicalize_name(entry.group("name")) in direct_keys
        )
        if pin.key in pins and pins[pin.key].version != pin.version:
            problems.append(f"{path.name}:{number}: {pin.name} is listed at {pins[pin.key].version} too")
        pins[pin.key] = pin
    if problems:
        raise AuditError("\n".join(problems))
    if not pins:
        raise AuditError(f"{path} lists no package")
    return Resolution(label, f"listed in {path.name}", sorted(pins.values(), key=lambda pin: pin.key))


# --- pip-audit, and PyPI's latest-release advisories where pip-audit finds nothing ---------------


@dataclasses.dataclass(frozen=True)
class Vulnerability:
    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fix_versions: tuple[str, ...]
    summary: str

    @property
    def ids(self) -> frozenset[str]:
        return frozenset((self.id, *self.aliases))

    def describe(self) -> str:
        fix = f"fixed in {', '.join(self.fix_versions)}" if self.fix_versions else "no fixed release"
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        summary = " ".join(self.summary.split())
        return f"{self.package}=={self.version}: {self.id}{aliases}, {fix}: {summary[:200]}"


@dataclasses.dataclass(frozen=True)
class PinAudit:
    audited_by: str | None  # None: could not be audited
    reason: str  # why not, when not
    vulnerabilities: tuple[Vulnerability, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PinAudit:
        vulns = tuple(
            Vulnerability(**{**v, "aliases": tuple(v["aliases"]), "fix_versions": tuple(v["fix_versions"])})
            for v in data["vulnerabilities"]
        )
        return cls(data["audited_by"], data["reason"], vulns)


def _vulnerability(pin: Pin, record: Mapping[str, Any], fixes: str, texts: Sequence[str]) -> Vulnerability:
    """From pip-audit's JSON (`fix_versions`, `description`) or PyPI's (`fixed_in`, `summary`)."""
    return Vulnerability(
        pin.name,
        pin.version,
        record["id"],
        tuple(record.get("aliases") or ()),
        tuple(record.get(fixes) or ()),
        next((record[key] for key in texts if record.get(key)), ""),
    )


def _distinct(vulns: Iterable[Vulnerability]) -> tuple[Vulnerability, ...]:
    """One record per vulnerability: PyPI lists a PYSEC and a GHSA record of the same one."""
    kept: list[Vulnerability] = []
    for vuln in vulns:
        if not any(vuln.ids & other.ids for other in kept):
            kept.append(vuln)
    return tuple(kept)


def pip_audit_command() -> list[str]:
    """pip-audit from dev.txt, run by this interpreter; PIP_AUDIT=/path/to/pip-audit overrides."""
    configured = os.environ.get("PIP_AUDIT")
    return [configured] if configured else [sys.executable, "-m", "pip_audit"]


def run_pip_audit(pins: Sequence[Pin], cache: Path) -> list[dict[str, Any]]:
    """pip-audit's JSON entries for the pins: `vulns`, or a `skip_reason`."""
    with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
        pinned = Path(tmp) / "pinned.txt"
        pinned.write_text("".join(f"{pin}\n" for pin in pins))
        output = Path(tmp) / "pip-audit.json"
        command = [
            *pip_audit_command(), "--requirement", str(pinned), "--no-deps", "--disable-pip",
            "--format", "json", "--output", str(output), "--cache-dir", str(cache / "pip-audit"),
            "--timeout", str(SOCKET_TIMEOUT), "--progress-spinner", "off",
        ]  # fmt: skip
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise AuditError(f"pip-audit did not finish in {PROCESS_TIMEOUT:.0f} s") from exc
        except FileNotFoundError as exc:
            raise AuditError(f"pip-audit is not installed ({command[0]}): `make venv` installs it") from exc
        # Exit status 1 means "vulnerabilities found" as well as "failed": the JSON tells them apart.
        if not output.exists():
            raise AuditError(f"pip-audit failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        dependencies: list[dict[str, Any]] = json.loads(output.read_text())["dependencies"]
    return dependencies


def latest_release(name: str, cache: Path, ttl: float) -> tuple[str, list[dict[str, Any]]]:
    """The latest release on PyPI and its advisories (the project JSON's `vulnerabilities`)."""
    path = cache / "pypi-latest" / f"{canonicalize_name(name)}.json"
    found = _read_fresh(path, ttl)
    if found is None:
        response = requests.get(f"{PYPI_URL}/{canonicalize_name(name)}/json", timeout=SOCKET_TIMEOUT)
        response.raise_for_status()
        project = response.json()
        advisories = [a for a in project.get("vulnerabilities") or [] if not a.get("withdrawn")]
        found = {"version": project["info"]["version"], "advisories": advisories}
        _write(path, found)
    return found["version"], found["advisories"]


def _same_version(left: str, right: str) -> bool:
    try:
        return Version(left) == Version(right)
    except InvalidVersion:
        return left == right


def audit_from_latest_release(pin: Pin, cache: Path, ttl: float) -> PinAudit:
    try:
        latest, advisories = latest_release(pin.name, cache, ttl)
    except (requests.RequestException, ValueError, KeyError) as exc:
        return PinAudit(None, f"{TRANSIENT_REASON}: {exc}")
    if not _same_version(pin.version, latest):
        return PinAudit(None, f"no per-release advisories on this index, and the latest release is {latest}")
    vulns = (_vulnerability(pin, advisory, "fixed_in", ("summary", "details")) for advisory in advisories)
    return PinAudit("PyPI (advisories of the latest release)", "", _distinct(vulns))


T = TypeVar("T")
R = TypeVar("R")


def _parallel(function: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    if not items:
        return []
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(function, items))


def audit_pins(
    pins: Iterable[Pin], cache: Path | None = None, ttl: float | None = None
) -> dict[tuple[str, str], PinAudit]:
    """Each pin's audit: cached for `ttl` seconds, else pip-audit, else PyPI's latest release."""
    cache = cache_root() if cache is None else cache
    ttl = ttl_seconds() if ttl is None else ttl
    unique = {(pin.key, pin.version): Pin(pin.name, pin.version, False) for pin in pins}
    results: dict[tuple[str, str], PinAudit] = {}

    def cache_path(pin: Pin) -> Path:
        return cache / "results" / f"{pin.key}-{pin.version}.json"

    for ident, pin in unique.items():
        cached = _read_fresh(cache_path(pin), ttl)
        if cached is not None:
            results[ident] = PinAudit.from_json(cached)
    todo = [pin for ident, pin in unique.items() if ident not in results]
    # pip-audit's JSON names a skipped package without its version: one version of a name per batch.
    layers: list[list[Pin]] = []
    for pin in todo:
        layer = next((layer for layer in layers if all(p.key != pin.key for p in layer)), None)
        if layer is None:
            layers.append(layer := [])
        layer.append(pin)
    batches = [
        layer[i : i + PIP_AUDIT_BATCH] for layer in layers for i in range(0, len(layer), PIP_AUDIT_BATCH)
    ]
    fallback: list[Pin] = []
    reports = _parallel(lambda batch: run_pip_audit(batch, cache), batches, PIP_AUDIT_PROCESSES)
    for batch, entries in zip(batches, reports, strict=True):
        by_key = {pin.key: pin for pin in batch}
        for entry in entries:
            pin = by_key[canonicalize_name(entry["name"])]
            skip = entry.get("skip_reason")
            if skip is None:
                vulns = (
                    _vulnerability(pin, v, "fix_versions", ("description",)) for v in entry.get("vulns") or []
                )
                results[(pin.key, pin.version)] = PinAudit("pip-audit", "", _distinct(vulns))
            elif NOT_FOUND_ON_PYPI in skip:
                fallback.append(pin)
            else:
                results[(pin.key, pin.version)] = PinAudit(None, f"pip-audit: {skip}")
    latest = _parallel(lambda pin: audit_from_latest_release(pin, cache, ttl), fallback, HTTP_WORKERS)
    for pin, found in zip(fallback, latest, strict=True):
        results[(pin.key, pin.version)] = found
    for pin in todo:
        found = results.get((pin.key, pin.version)) or PinAudit(None, "pip-audit did not report it")
        results[(pin.key, pin.version)] = found
        if not found.reason.startswith(TRANSIENT_REASON):  # not kept: the next run asks again
            _write(cache_path(pin), found.to_json())
    return results


# --- the ignore file, and the verdict -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IgnoreList:
    vulnerabilities: frozenset[str]
    unaudited: frozenset[str]  # canonical package names


IGNORE_LINE = re.compile(r"(?P<what>\S+)\s+#\s*(?P<reason>.*\S)")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


def read_ignore_file(path: Path = IGNORE_FILE) -> IgnoreList:
    """`ID  # reason, YYYY-MM-DD` or `unaudited:NAME  # reason, YYYY-MM-DD`, one a line."""
    vulns: set[str] = set()
    unaudited: set[str] = set()
    problems: list[str] = []
    lines = path.read_text().splitlines() if path.exists() else []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        entry = IGNORE_LINE.fullmatch(raw.strip())
        if entry is None or not DATE.search(entry.group("reason")):
            problems.append(f"{path.name}:{number}: want `ID  # reason, YYYY-MM-DD`, got {raw!r}")
        elif entry.group("what").startswith("unaudited:"):
            unaudited.add(canonicalize_name(entry.group("what").removeprefix("unaudited:")))
        else:
            vulns.add(entry.group("what"))
    if problems:
        raise AuditError("\n".join(problems))
    return IgnoreList(frozenset(vulns), frozenset(unaudited))


@dataclasses.dataclass(frozen=True)
class SetReport:
    resolution: Resolution
    audits: Mapping[tuple[str, str], PinAudit]  # by (canonical name, version)
    ignore: IgnoreList
    seconds: float

    @property
    def name(self) -> str:
        return self.resolution.set_name

    def _audit(self, pin: Pin) -> PinAudit:
        return self.audits[(pin.key, pin.version)]

    @property
    def audited(self) -> list[Pin]:
        return [pin for pin in self.resolution.pins if self._audit(pin).audited_by]

    @property
    def unaudited(self) -> list[tuple[Pin, str]]:
        return [
            (pin, self._audit(pin).reason) for pin in self.resolution.pins if not self._audit(pin).audited_by
        ]

    @property
    def unacknowledged(self) -> list[tuple[Pin, str]]:
        return [(pin, why) for pin, why in self.unaudited if pin.key not in self.ignore.unaudited]

    @property
    def vulnerabilities(self) -> list[Vulnerability]:
        return [vuln for pin in self.resolution.pins for vuln in self._audit(pin).vulnerabilities]

    def is_ignored(self, vuln: Vulnerability) -> bool:
        return bool(self.ignore.vulnerabilities & vuln.ids)

    def failures(self, strict: bool = False) -> list[str]:
        found = [f"vulnerable: {v.describe()}" for v in self.vulnerabilities if not self.is_ignored(v)]
        if strict:
            found += [
                f"not auditable, a direct requirement: {pin}: {why}"
                for pin, why in self.unacknowledged
                if pin.direct
            ]
        return found

    def render(self, strict: bool = False) -> str:
        unaudited = self.unaudited
        lines = [
            f"{self.name}: {len(self.resolution.pins)} packages ({self.resolution.source}), "
            f"{len(self.audited)} audited, {len(unaudited)} not auditable, "
            f"{len(self.vulnerabilities)} known vulnerabilities ({self.seconds:.1f} s)"
        ]
        methods: dict[str, int] = {}
        for pin in self.audited:
            how = self._audit(pin).audited_by or ""
            methods[how] = methods.get(how, 0) + 1
        lines += [f"  audited by {how}: {count}" for how, count in sorted(methods.items())]
        if unaudited:
            lines.append("  not auditable:")
        for pin, why in unaudited:
            notes = ["direct" if pin.direct else "transitive"]
            if pin.key in self.ignore.unaudited:
                notes.append("acknowledged in audit-ignore.conf")
            lines.append(f"    {pin} ({', '.join(notes)}): {why}")
        for vuln in self.vulnerabilities:
            state = "ignored (audit-ignore.conf)" if self.is_ignored(vuln) else "VULNERABLE"
            lines.append(f"  {state}: {vuln.describe()}")
        failures = self.failures(strict)
        lines.append(f"  verdict: {'FAIL' if failures else 'ok'}")
        lines += [f"    {failure}" for failure in failures]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report with both verdicts, so a kept copy answers a strict and a lenient caller alike."""
        packages = []
        for pin in self.resolution.pins:
            found = self._audit(pin)
            packages.append(
                {
                    "name": pin.name,
                    "version": pin.version,
                    "direct": pin.direct,
                    "audited_by": found.audited_by,
                    "reason": found.reason,
                    "acknowledged": not found.audited_by and pin.key in self.ignore.unaudited,
                    "vulnerabilities": [
                        {**dataclasses.asdict(vuln), "ignored": self.is_ignored(vuln)}
                        for vuln in found.vulnerabilities
                    ],
                }
            )
        return {
            "label": self.name,
            "source": self.resolution.source,
            "packages": packages,
            "audited": len(self.audited),
            "not_auditable": len(self.unaudited),
            "vulnerabilities": len(self.vulnerabilities),
            "transient": sum(1 for _, why in self.unaudited if why.startswith(TRANSIENT_REASON)),
            "failures": self.failures(strict=False),
            "strict_failures": self.failures(strict=True),
        }


def audit_sets(names: Sequence[str], ignore: IgnoreList | None = None) -> list[SetReport]:
    """Audits the sets together: each distinct pin is looked up once, whichever sets share it."""
    ignore = read_ignore_file() if ignore is None else ignore
    cache, ttl = cache_root(), ttl_seconds()
    started = time.monotonic()
    resolutions = [resolve_set(name, cache, ttl) for name in names]
    audits = audit_pins((pin for resolution in resolutions for pin in resolution.pins), cache, ttl)
    seconds = time.monotonic() - started
    return [SetReport(resolution, audits, ignore, seconds) for resolution in resolutions]


def audit_freeze(
    path: Path, label: str, direct: Iterable[str] = (), ignore: IgnoreList | None = None
) -> SetReport:
    """Audits a complete `name==version` list (an image's packages) as a set is audited."""
    ignore = read_ignore_file() if ignore is None else ignore
    started = time.monotonic()
    resolution = read_freeze(path, label, direct)
    audits = audit_pins(resolution.pins)
    return SetReport(resolution, audits, ignore, time.monotonic() - started)


def direct_names(requirement_files: Sequence[Path], names: Sequence[str]) -> list[str]:
    """The names the requirement files (includes followed) and --direct give, markers ignored: an
    image is one platform, and a requirement it skipped is simply not in its list."""
    found = list(names)
    for path in requirement_files:
        found += [req.name for req in read_requirements(path)[0]]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sets", nargs="*", help=f"requirement sets (default: all, {requirement_sets()})")
    parser.add_argument(
        "--strict",
        action="store_true",
        default=os.environ.get(STRICT_ENV) == "1",
        help=f"also fail on a direct requirement that could not be audited (or {STRICT_ENV}=1)",
    )
    freeze = parser.add_argument_group("an arbitrary package list (an image's), instead of sets")
    freeze.add_argument("--freeze", type=Path, metavar="FILE", help="a complete `name==version` list")
    freeze.add_argument("--label", help="the list's name in the report (default: FILE's stem)")
    freeze.add_argument(
        "--requirement",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a requirement file the list was installed from: what it names counts as direct",
    )
    freeze.add_argument(
        "--direct", action="append", default=[], metavar="NAME", help="a package that counts as direct"
    )
    parser.add_argument("--report", type=Path, metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    if args.freeze is None and (args.label or args.requirement or args.direct):
        parser.error("--label, --requirement and --direct go with --freeze")
    if args.freeze is not None and args.sets:
        parser.error("either requirement sets or --freeze")
    if args.report is not None and args.freeze is None and len(args.sets) != 1:
        parser.error("--report writes one report: give --freeze or a single set")
    try:
        if args.freeze is not None:
            direct = direct_names(args.requirement, args.direct)
            reports = [audit_freeze(args.freeze, args.label or args.freeze.stem, direct)]
        else:
            reports = audit_sets(args.sets or requirement_sets())
    except (AuditError, OSError) as exc:
        print(f"the audit could not run: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.render(args.strict))
    if args.report is not None:
        _write(args.report, reports[0].to_json())
    return 1 if any(report.failures(args.strict) for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
