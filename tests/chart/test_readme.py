"""The chart's README values table (scripts/chart_readme.py) and the comments it is made from."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from scripts import chart_readme

CHART_DIR = chart_readme.DEFAULT_CHART

SAMPLE = textwrap.dedent(
    """\
    # Header comment, not a description.

    # -- Replaces the chart name.
    nameOverride: ""
    image:
      # -- The image repository,
      # continued on a second line.
      repository: example/app
      tag: ""
      # A plain comment is no description.
      pullPolicy: IfNotPresent
    # -- Requests and limits, shown as one row.
    resources:
      requests:
        cpu: 100m
      limits:
        # -- Described inside a described map: a row of its own.
        memory: 1Gi
    # -- (int) A type override.
    # @default -- the number of nodes
    replicas: 2
    # -- Lists are skipped inside.
    extraEnv:
      - name: A
        # -- not a key of the values
        value: b
    script: |
      not: a key
    # -- After a block scalar.
    "quoted-key": true

    # -- A blank line separates this from the key below.

    undescribed: {}
    ratio: 0.5
    """
)


def test_parse_comments_places_each_description_on_its_key() -> None:
    comments = chart_readme.parse_comments(SAMPLE)
    assert {".".join(path): comment.description for path, comment in comments.items()} == {
        "nameOverride": "Replaces the chart name.",
        "image.repository": "The image repository, continued on a second line.",
        "resources": "Requests and limits, shown as one row.",
        "resources.limits.memory": "Described inside a described map: a row of its own.",
        "replicas": "A type override.",
        "extraEnv": "Lists are skipped inside.",
        "quoted-key": "After a block scalar.",
    }
    replicas = comments[("replicas",)]
    assert replicas.type_override == "int"
    assert replicas.default_override == "the number of nodes"


def test_rows_describe_maps_as_a_whole_and_break_down_the_others() -> None:
    table = chart_readme.rows(yaml.safe_load(SAMPLE), chart_readme.parse_comments(SAMPLE))
    assert [(row.key, row.type, row.default) for row in table] == [
        ("nameOverride", "string", '`""`'),
        ("image.repository", "string", '`"example/app"`'),
        ("image.tag", "string", '`""`'),
        ("image.pullPolicy", "string", '`"IfNotPresent"`'),
        ("resources", "object", '`{"requests":{"cpu":"100m"},"limits":{"memory":"1Gi"}}`'),
        ("resources.limits.memory", "string", '`"1Gi"`'),
        ("replicas", "int", "the number of nodes"),
        ("extraEnv", "list", '`[{"name":"A","value":"b"}]`'),
        ("script", "string", '`"not: a key\\n"`'),
        ("quoted-key", "bool", "`true`"),
        ("undescribed", "object", "`{}`"),
        ("ratio", "float", "`0.5`"),
    ]
    assert chart_readme.undescribed(table) == [
        "image.tag",
        "image.pullPolicy",
        "script",
        "undescribed",
        "ratio",
    ]


def test_render_table_escapes_markdown() -> None:
    row = chart_readme.Row(key="a", type="string", default='`"x|y"`', description="`<b>` or <release> | pipe")
    assert chart_readme.render_table([row]).splitlines()[-1] == (
        '| a | string | `"x\\|y"` | `<b>` or &lt;release&gt; \\| pipe |'
    )


def test_a_comment_on_a_key_that_is_no_value_is_an_error() -> None:
    text = "list:\n  - a\n# -- dangling\nkey: 1\n"
    with pytest.raises(chart_readme.ValuesCommentError, match="not values"):
        chart_readme.rows({"other": 1}, chart_readme.parse_comments(text))


def test_render_readme_keeps_the_hand_written_text() -> None:
    section = chart_readme.values_section("# -- A flag.\nflag: true\n")
    first = chart_readme.render_readme("# Intro\n\nWritten by hand.\n", section, "chart", "unused")
    assert first.startswith("# Intro\n\nWritten by hand.\n\n" + chart_readme.BEGIN_MARKER)
    edited = first + "\nA footer.\n"
    newer = chart_readme.values_section("# -- A flag, renamed.\nflag: false\n")
    again = chart_readme.render_readme(edited, newer, "chart", "unused")
    assert again == "# Intro\n\nWritten by hand.\n\n" + newer + "\nA footer.\n"
    assert chart_readme.render_readme(again, newer, "chart", "unused") == again
    assert chart_readme.render_readme(None, section, "chart", "A chart.").startswith(
        "# chart\n\nA chart.\n\n"
    )


def test_check_mode_fails_on_a_stale_readme(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\ndescription: A demo.\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("# -- Replicas.\nreplicas: 1\n")
    assert chart_readme.main(["--chart", str(chart), "--check"]) == 1
    assert not (chart / "README.md").exists()
    assert chart_readme.main(["--chart", str(chart)]) == 0
    assert "| replicas | int | `1` | Replicas. |" in (chart / "README.md").read_text()
    assert chart_readme.main(["--chart", str(chart), "--check"]) == 0
    (chart / "values.yaml").write_text("# -- Replicas.\nreplicas: 2\n")
    assert chart_readme.main(["--chart", str(chart), "--check"]) == 1


def test_chart_readme_is_up_to_date_with_values_yaml() -> None:
    readme = CHART_DIR / "README.md"
    assert readme.read_text(encoding="utf-8") == chart_readme.expected_readme(CHART_DIR), (
        "charts/mnist-mlops/README.md is out of date with values.yaml: run python scripts/chart_readme.py"
    )


def test_every_value_of_the_chart_is_described() -> None:
    text = (CHART_DIR / "values.yaml").read_text(encoding="utf-8")
    table = chart_readme.rows(yaml.safe_load(text), chart_readme.parse_comments(text))
    assert chart_readme.undescribed(table) == [], "add a '# -- ...' comment above these keys in values.yaml"
