"""The security audit of every requirement set (scripts/audit_requirements.py; `make audit` prints it).

One test per requirements/*.txt set: it fails on a known vulnerability that
requirements/audit-ignore.conf does not list, prints the set's report, and turns the packages that
could not be audited into a NotAuditedWarning, which pytest's warnings summary shows; with
MNIST_MLOPS_AUDIT_STRICT=1 an unacknowledged direct requirement that could not be audited fails too.
The audit asks PyPI (pip-audit, PyPI's JSON): it needs the package index, as `make venv` does.
"""

from __future__ import annotations

import json
import os
import textwrap
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from scripts import audit_requirements as audit

SETS = audit.requirement_sets()


class NotAuditedWarning(UserWarning):
    """Packages of a requirement set that no advisory source could be asked about."""


@pytest.fixture(scope="module")
def reports() -> dict[str, audit.SetReport]:
    """Every set audited at once: a pin shared by several sets is looked up once."""
    return {report.name: report for report in audit.audit_sets(SETS)}


def test_every_requirement_file_is_a_set() -> None:
    assert {"training", "serving", "operator", "dev", "checkov"} <= set(SETS)


@pytest.mark.parametrize("set_name", SETS)
def test_requirement_set_has_no_known_vulnerability(
    set_name: str, reports: dict[str, audit.SetReport]
) -> None:
    report = reports[set_name]
    strict = os.environ.get(audit.STRICT_ENV) == "1"
    print(report.render(strict))
    assert report.resolution.pins, f"{set_name}: resolved to no package at all"
    if report.unacknowledged:
        listed = ", ".join(str(pin) for pin, _ in report.unacknowledged)
        warnings.warn(
            NotAuditedWarning(
                f"{set_name}: {len(report.unacknowledged)} of {len(report.resolution.pins)} packages "
                f"could not be audited (`make audit` says why): {listed}"
            ),
            stacklevel=1,
        )
    assert not report.failures(strict), report.render(strict)


def test_ignore_entries_are_still_needed(reports: dict[str, audit.SetReport]) -> None:
    """An entry that matches nothing any more (bumped, or withdrawn upstream) is reported for removal."""
    ignore = audit.read_ignore_file()
    found = {vuln_id for r in reports.values() for vuln in r.vulnerabilities for vuln_id in vuln.ids}
    unaudited = {pin.key for r in reports.values() for pin, _ in r.unaudited}
    stale = sorted(ignore.vulnerabilities - found) + [
        f"unaudited:{name}" for name in sorted(ignore.unaudited - unaudited)
    ]
    if stale:
        warnings.warn(UserWarning(f"audit-ignore.conf: entries no longer needed: {stale}"), stacklevel=1)


# --- the audit's own logic, offline ---------------------------------------------------------------


def _site_packages(root: Path, dists: dict[str, list[str]]) -> Path:
    """A virtualenv layout holding only metadata: {"name==version": [Requires-Dist, ...]}."""
    site = root / "lib" / "python3.11" / "site-packages"
    for pin, requires in dists.items():
        name, version = pin.split("==")
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {req}" for req in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
    return root


def test_closure_follows_extras_and_markers_and_adds_installer_tools(tmp_path: Path) -> None:
    venv = _site_packages(
        tmp_path,
        {
            "web==1.0": ["core>=1", 'fast; extra == "speed"', 'legacy; python_version < "3"'],
            "core==2.0": [],
            "fast==3.0": ['core; extra == "never"'],
            "unrelated==1.0": [],
            "pip==26.0": [],
        },
    )
    pins = audit.closure([Requirement("web[speed]==1.0")], audit.installed_distributions(venv))
    assert [(str(pin), pin.direct) for pin in pins] == [
        ("core==2.0", False),
        ("fast==3.0", False),
        ("pip==26.0", False),
        ("web==1.0", True),
    ]


def test_closure_refuses_a_stale_virtualenv(tmp_path: Path) -> None:
    venv = _site_packages(tmp_path, {"web==1.0": ["core"]})
    with pytest.raises(audit.AuditError, match=r"(?s)core .*not installed.*web==1\.1.*but 1\.0 is installed"):
        audit.closure([Requirement("web==1.1")], audit.installed_distributions(venv))


def test_requirement_files_follow_includes_and_refuse_other_options(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("# comment\nnumpy==2.0  # trailing\n")
    (tmp_path / "top.txt").write_text("-r base.txt\nuvicorn[standard]==0.1\n")
    requirements, included = audit.read_requirements(tmp_path / "top.txt")
    assert [str(req) for req in requirements] == ["numpy==2.0", "uvicorn[standard]==0.1"]
    assert included == [tmp_path / "base.txt"]
    (tmp_path / "bad.txt").write_text("--index-url https://example.invalid/simple\n")
    with pytest.raises(audit.AuditError, match=r"bad\.txt:1"):
        audit.read_requirements(tmp_path / "bad.txt")


def test_ignore_file_wants_a_reason_and_a_date(tmp_path: Path) -> None:
    path = tmp_path / "ignore.conf"
    path.write_text(
        textwrap.dedent("""\
            # comment
            GHSA-aaaa-bbbb-cccc  # not reachable from our code, 2026-01-02
            unaudited:Some_Package  # pinned by the vendor, 2026-01-02
        """)
    )
    ignore = audit.read_ignore_file(path)
    assert ignore.vulnerabilities == {"GHSA-aaaa-bbbb-cccc"}
    assert ignore.unaudited == {"some-package"}
    path.write_text("CVE-2026-0001\nCVE-2026-0002  # no date\n")
    with pytest.raises(audit.AuditError, match=r"(?s)ignore.conf:1.*ignore.conf:2"):
        audit.read_ignore_file(path)


def test_verdict_ignores_listed_aliases_and_is_strict_only_on_request() -> None:
    web, core = audit.Pin("web", "1.0", direct=True), audit.Pin("core", "2.0", direct=False)
    vuln = audit.Vulnerability("web", "1.0", "PYSEC-1", ("CVE-1", "GHSA-1"), ("1.1",), "bad")
    audits = {
        ("web", "1.0"): audit.PinAudit("pip-audit", "", audit._distinct([vuln, vuln])),
        ("core", "2.0"): audit.PinAudit(None, "latest is 3.0"),
    }
    resolution = audit.Resolution("demo", "test", [core, web])
    report = audit.SetReport(resolution, audits, audit.IgnoreList(frozenset(), frozenset()), 0.0)
    assert len(report.vulnerabilities) == 1
    assert report.failures() == [f"vulnerable: {vuln.describe()}"]
    assert report.unacknowledged == [(core, "latest is 3.0")]
    ignored = audit.SetReport(resolution, audits, audit.IgnoreList(frozenset({"CVE-1"}), frozenset()), 0.0)
    assert ignored.failures(strict=True) == []  # core is transitive: reported, never failed
    audits[("web", "1.0")] = audit.PinAudit(None, "latest is 1.1")
    assert ignored.failures(strict=False) == []
    assert ignored.failures(strict=True) == ["not auditable, a direct requirement: web==1.0: latest is 1.1"]
    assert "VULNERABLE" not in ignored.render() and "web==1.0 (direct)" in ignored.render()


# --- an image's package list (--freeze, as scripts/build-images.sh runs it) ---------------------------


def test_freeze_list_is_read_whole_and_direct_names_come_from_requirement_files(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("Web[speed]==1.0 ; python_version >= '3'\n")
    (tmp_path / "image.txt").write_text("-r base.txt\nother==2.0\n")
    frozen = tmp_path / "frozen.txt"
    frozen.write_text("# what the image holds\nweb==1.0\ncore==2.0\nOther==2.0\npip==26.3\n")
    direct = audit.direct_names([tmp_path / "image.txt"], ["PIP"])
    resolution = audit.read_freeze(frozen, "image", direct)
    assert resolution.set_name == "image"
    assert [(str(pin), pin.direct) for pin in resolution.pins] == [
        ("core==2.0", False),
        ("Other==2.0", True),
        ("pip==26.3", True),
        ("web==1.0", True),
    ]


def test_freeze_list_refuses_what_is_not_one_exact_pin_a_package(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen.txt"
    frozen.write_text("web>=1.0\nweb==1.0\nWeb==1.1\n")
    with pytest.raises(
        audit.AuditError, match=r"(?s)frozen\.txt:1: want.*frozen\.txt:3: Web is listed at 1\.0"
    ):
        audit.read_freeze(frozen, "image", [])
    frozen.write_text("# nothing\n")
    with pytest.raises(audit.AuditError, match="lists no package"):
        audit.read_freeze(frozen, "image", [])


def test_freeze_mode_reports_both_verdicts_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept report must answer a later --strict-audit run without auditing again."""
    vuln = audit.Vulnerability("core", "2.0", "PYSEC-1", ("CVE-1",), ("2.1",), "bad")
    found = {
        ("web", "1.0"): audit.PinAudit(None, "latest is 1.1"),
        ("core", "2.0"): audit.PinAudit("pip-audit", "", (vuln,)),
    }
    monkeypatch.setattr(audit, "audit_pins", lambda pins, *_: {k: found[k] for k in found})
    monkeypatch.setattr(
        audit, "read_ignore_file", lambda: audit.IgnoreList(frozenset({"CVE-1"}), frozenset())
    )
    frozen = tmp_path / "img.txt"
    frozen.write_text("web==1.0\ncore==2.0\n")
    report = tmp_path / "report.json"
    assert audit.main(["--freeze", str(frozen), "--direct", "web", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["label"] == "img"
    assert (data["audited"], data["not_auditable"], data["vulnerabilities"]) == (1, 1, 1)
    assert data["failures"] == []
    assert data["strict_failures"] == ["not auditable, a direct requirement: web==1.0: latest is 1.1"]
    core = next(package for package in data["packages"] if package["name"] == "core")
    assert core["vulnerabilities"][0]["id"] == "PYSEC-1" and core["vulnerabilities"][0]["ignored"]
    assert audit.main(["--freeze", str(frozen), "--direct", "web", "--strict"]) == 1
    assert audit.main(["--freeze", str(tmp_path / "missing.txt")]) == 2
