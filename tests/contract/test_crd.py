"""The TrainingRun CRD: it mirrors contract/spec.py exactly, and a real API server enforces it.

The first half walks the CRD's schema and the pydantic models side by side (names, types, bounds,
enums, defaults), so renaming or re-bounding a field on one side only fails here. The second half
installs the CRD on the test control plane and applies TrainingRuns with kubectl: invalid ones are
rejected with a message naming the problem, valid ones come back defaulted as documented.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

from contract.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAME,
    TrainingRunSpec,
    load_manifests,
)
from testing.controlplane import ControlPlane
from testing.kubectl import kubectl, unique_name
from testing.operator_harness import CRD_PATH, load_crd

CRD = load_crd()
VERSION = next(version for version in CRD["spec"]["versions"] if version["name"] == API_VERSION)
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]
PYDANTIC_SCHEMA = TrainingRunSpec.model_json_schema(by_alias=True, mode="validation")
# Fields whose pydantic type is a free-form dict: the CRD gives them a structure of its own.
FREE_FORM = {"servingSelector", "resources"}
JSON_TYPES = {
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
    "string": "string",
    "object": "object",
}


def _resolve(node: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """The pydantic JSON-schema node behind $ref/allOf/anyOf-with-null, and whether null is allowed."""
    nullable = False
    while True:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = {**PYDANTIC_SCHEMA["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
        elif "allOf" in node and len(node["allOf"]) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        elif "anyOf" in node:
            options = [option for option in node["anyOf"] if option.get("type") != "null"]
            nullable = nullable or len(options) < len(node["anyOf"])
            assert len(options) == 1, f"unexpected union in the pydantic schema: {node}"
            node = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        else:
            return node, nullable


def _bounds_pydantic(node: Mapping[str, Any]) -> tuple[Any, bool, Any, bool]:
    low = node.get("exclusiveMinimum", node.get("minimum"))
    high = node.get("exclusiveMaximum", node.get("maximum"))
    return low, "exclusiveMinimum" in node, high, "exclusiveMaximum" in node


def _bounds_crd(node: Mapping[str, Any]) -> tuple[Any, bool, Any, bool]:
    return (
        node.get("minimum"),
        bool(node.get("exclusiveMinimum", False)),
        node.get("maximum"),
        bool(node.get("exclusiveMaximum", False)),
    )


def _walk(pydantic_node: Mapping[str, Any], crd_node: Mapping[str, Any], path: str) -> Iterator[str]:
    """Yields every mismatch between the two schemas below `path`."""
    model, _nullable = _resolve(pydantic_node)
    properties = model.get("properties")
    if properties is not None:
        crd_properties = crd_node.get("properties", {})
        if set(properties) != set(crd_properties):
            yield (
                f"{path}: pydantic has {sorted(set(properties) - set(crd_properties))} only, "
                f"the CRD has {sorted(set(crd_properties) - set(properties))} only"
            )
        for key in sorted(set(properties) & set(crd_properties)):
            yield from _walk(properties[key], crd_properties[key], f"{path}.{key}")
        return
    if model.get("type") == "array":
        yield from _compare_array(model, crd_node, path)
        return
    if path.rsplit(".", 1)[-1] in FREE_FORM:
        if crd_node.get("type") != "object":
            yield f"{path}: a free-form dict in pydantic must be an object in the CRD"
        return
    yield from _compare_leaf(model, crd_node, path)


def _compare_array(model: Mapping[str, Any], crd_node: Mapping[str, Any], path: str) -> Iterator[str]:
    if crd_node.get("type") != "array":
        yield f"{path}: type {crd_node.get('type')!r} != pydantic 'array'"
        return
    for keyword in ("minItems", "maxItems"):
        if crd_node.get(keyword) != model.get(keyword):
            yield f"{path}: {keyword} {crd_node.get(keyword)} != pydantic {model.get(keyword)}"
    yield from _walk(model.get("items", {}), crd_node.get("items", {}), f"{path}[]")


def _compare_leaf(model: Mapping[str, Any], crd_node: Mapping[str, Any], path: str) -> Iterator[str]:
    if "enum" in model:
        if crd_node.get("enum") != model["enum"]:
            yield f"{path}: enum {crd_node.get('enum')} != pydantic {model['enum']}"
    elif "pattern" in model:
        alternatives = re.fullmatch(r"\^\(([^()]*)\)\$", model["pattern"])
        if "enum" in crd_node and alternatives:
            if sorted(crd_node["enum"]) != sorted(alternatives.group(1).split("|")):
                yield f"{path}: enum {crd_node['enum']} != pydantic pattern {model['pattern']}"
        elif crd_node.get("pattern") != model["pattern"]:
            yield f"{path}: pattern {crd_node.get('pattern')!r} != pydantic {model['pattern']!r}"
    kind = model.get("type")
    if kind is not None and crd_node.get("type") != JSON_TYPES.get(kind):
        yield f"{path}: type {crd_node.get('type')!r} != pydantic {kind!r}"
    if _bounds_crd(crd_node) != _bounds_pydantic(model):
        yield f"{path}: bounds {_bounds_crd(crd_node)} != pydantic {_bounds_pydantic(model)}"
    for keyword in ("minLength", "maxLength"):
        if crd_node.get(keyword) != model.get(keyword):
            yield f"{path}: {keyword} {crd_node.get(keyword)} != pydantic {model.get(keyword)}"


def apply_crd_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Structural-schema defaulting as the API server does it: defaults fill absent fields, top-down."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    result = dict(value)
    for key, child in schema["properties"].items():
        if key not in result and "default" in child:
            result[key] = json.loads(json.dumps(child["default"]))
        if key in result:
            result[key] = apply_crd_defaults(child, result[key])
    return result


def pydantic_defaults() -> dict[str, Any]:
    return TrainingRunSpec().model_dump(by_alias=True, mode="json", exclude_none=True)


def test_every_spec_field_matches_pydantic() -> None:
    mismatches = list(_walk(PYDANTIC_SCHEMA, SPEC_SCHEMA, "spec"))
    assert not mismatches, "the CRD drifted from contract/spec.py:\n" + "\n".join(mismatches)


def test_the_drift_check_notices_a_renamed_field() -> None:
    renamed = json.loads(json.dumps(SPEC_SCHEMA))
    hyper = renamed["properties"]["hyperparameters"]["properties"]
    hyper["learning_rate"] = hyper.pop("learningRate")
    hyper["epochs"]["maximum"] = 500
    mismatches = list(_walk(PYDANTIC_SCHEMA, renamed, "spec"))
    assert any("learningRate" in line and "learning_rate" in line for line in mismatches), mismatches
    assert any("spec.hyperparameters.epochs: bounds" in line for line in mismatches), mismatches


def test_defaults_are_the_pydantic_defaults() -> None:
    assert apply_crd_defaults(SPEC_SCHEMA, {}) == pydantic_defaults()


def test_names_and_printer_columns() -> None:
    names = CRD["spec"]["names"]
    assert (CRD["spec"]["group"], names["kind"], names["plural"]) == (API_GROUP, KIND, PLURAL)
    assert names["shortNames"] == [SHORT_NAME]
    assert "mlops" in names["categories"]
    assert VERSION["subresources"] == {"status": {}}
    columns = {column["name"]: column["jsonPath"] for column in VERSION["additionalPrinterColumns"]}
    for expected in ("Phase", "Architecture", "Accuracy", "Version", "Promoted", "Age"):
        assert expected in columns
    assert columns["Accuracy"] == ".status.metrics.test_accuracy"


def test_every_schema_node_is_typed() -> None:
    """A structural schema: every property has a type (or is int-or-string)."""

    def untyped(node: Mapping[str, Any], path: str) -> Iterator[str]:
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            yield path
        for key, child in (node.get("properties") or {}).items():
            yield from untyped(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from untyped(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from untyped(node["additionalProperties"], f"{path}{{}}")

    assert list(untyped(SCHEMA, "")) == []


# ------------------------------------------------------------------------ against the API server


def _manifest(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def crd_namespace(control_plane: ControlPlane, crd_installed: None) -> Iterator[str]:
    namespace = unique_name("crd")
    result = kubectl(control_plane, "create", "namespace", namespace)
    assert result.returncode == 0, result.stderr
    yield namespace
    # No operator ever sees these runs: a cluster-wide one started later must not find them.
    kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("architecture", {"architecture": "resnet"}, 'spec.architecture: Unsupported value: "resnet"'),
    (
        "learning-rate-zero",
        {"hyperparameters": {"learningRate": 0}},
        "learningRate in body should be greater than 0",
    ),
    ("learning-rate-high", {"hyperparameters": {"learningRate": 2}}, "should be less than or equal to 1"),
    (
        "batch-size",
        {"hyperparameters": {"batchSize": 0}},
        "batchSize in body should be greater than or equal to 1",
    ),
    ("epochs", {"hyperparameters": {"epochs": 500}}, "epochs in body should be less than or equal to 200"),
    (
        "optimizer",
        {"hyperparameters": {"optimizer": "lamb"}},
        'spec.hyperparameters.optimizer: Unsupported value: "lamb"',
    ),
    (
        "epochs-type",
        {"hyperparameters": {"epochs": "five"}},
        'spec.hyperparameters.epochs: Invalid value: "string"',
    ),
    ("model-name", {"registeredModel": "Bad_Name"}, "spec.registeredModel in body should match"),
    ("unknown-field", {"epochs": 3}, 'unknown field "spec.epochs"'),
    ("margin", {"promotion": {"margin": -0.1}}, "margin in body should be greater than or equal to 0"),
    ("accuracy-minimum", {"promotion": {"minimum": 97}}, "an accuracy minimum must lie between 0 and 1"),
    (
        "lower-accuracy",
        {"promotion": {"higherIsBetter": False}},
        "higherIsBetter cannot be false for an accuracy",
    ),
    ("margin-unused", {"promotion": {"mustBeatChampion": False, "margin": 0.01}}, "margin only applies when"),
    ("cpu", {"resources": {"cpu": "1000"}}, "cpu must be a quantity between 100m and 64"),
    ("memory", {"resources": {"memory": "lots"}}, "memory must be a quantity between 256Mi and 256Gi"),
    ("gpu", {"resources": {"gpu": -1}}, "gpu in body should be greater than or equal to 0"),
    (
        "deadline",
        {"activeDeadlineSeconds": 10},
        "activeDeadlineSeconds in body should be greater than or equal to 60",
    ),
    ("backoff", {"backoffLimit": 11}, "backoffLimit in body should be less than or equal to 10"),
    (
        "selector",
        {"servingSelector": {"matchExpressions": [{"key": "tier", "operator": "In"}]}},
        "In and NotIn need values",
    ),
    (
        "strategy",
        {"rollout": {"strategy": "bluegreen"}},
        'spec.rollout.strategy: Unsupported value: "bluegreen"',
    ),
    (
        "weights-decrease",
        {"rollout": {"steps": [{"weight": 50}, {"weight": 10}]}},
        "rollout.steps weights must be strictly increasing",
    ),
    (
        "weights-repeat",
        {"rollout": {"steps": [{"weight": 10}, {"weight": 10}]}},
        "rollout.steps weights must be strictly increasing",
    ),
    ("weight-100", {"rollout": {"steps": [{"weight": 100}]}}, "weight in body should be less than 100"),
    ("hold", {"rollout": {"steps": [{"weight": 5, "holdSeconds": 1}]}}, "holdSeconds in body should be"),
    ("no-steps", {"rollout": {"steps": []}}, "should have at least 1 items"),
    (
        "agreement",
        {"rollout": {"analysis": {"minAgreement": 1.5}}},
        "minAgreement in body should be less than or equal to 1",
    ),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_trainingruns_are_rejected(
    control_plane: ControlPlane, crd_namespace: str, case: str, spec: dict[str, Any], message: str
) -> None:
    result = kubectl(
        control_plane, "apply", "-n", crd_namespace, "-f", "-", manifest=_manifest(f"bad-{case}", spec)
    )
    assert result.returncode != 0, f"{case} was accepted: {result.stdout}"
    assert message in result.stderr, result.stderr


def test_a_too_long_name_is_rejected(control_plane: ControlPlane, crd_namespace: str) -> None:
    result = kubectl(control_plane, "apply", "-n", crd_namespace, "-f", "-", manifest=_manifest("x" * 58, {}))
    assert result.returncode != 0
    assert "metadata.name must be at most 57 characters" in result.stderr, result.stderr


def test_an_empty_spec_is_defaulted_to_the_pydantic_defaults(
    control_plane: ControlPlane, crd_namespace: str
) -> None:
    name = unique_name("defaults")
    applied = kubectl(control_plane, "apply", "-n", crd_namespace, "-f", "-", manifest=_manifest(name, {}))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(kubectl(control_plane, "get", "tr", name, "-n", crd_namespace, "-o", "json").stdout)
    assert stored["spec"] == pydantic_defaults()
    # What the API server stores is what the operator parses.
    assert TrainingRunSpec.model_validate(stored["spec"]) == TrainingRunSpec()


def test_partial_spec_keeps_given_values_and_defaults_the_rest(
    control_plane: ControlPlane, crd_namespace: str
) -> None:
    name = unique_name("partial")
    spec = {
        "architecture": "residual-bn",
        "hyperparameters": {"epochs": 2},
        "resources": {"cpu": 2, "gpu": 1},
    }
    applied = kubectl(control_plane, "apply", "-n", crd_namespace, "-f", "-", manifest=_manifest(name, spec))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(kubectl(control_plane, "get", "tr", name, "-n", crd_namespace, "-o", "json").stdout)[
        "spec"
    ]
    parsed = TrainingRunSpec.model_validate(stored)
    assert parsed.hyperparameters.epochs == 2
    assert parsed.hyperparameters.learning_rate == 0.001
    assert parsed.promotion.must_beat_champion is True
    assert stored["resources"] == {"cpu": 2, "gpu": 1}


def test_a_rollout_is_defaulted_as_pydantic_defaults_it(
    control_plane: ControlPlane, crd_namespace: str
) -> None:
    """`rollout: {strategy: canary}` gets the default steps and thresholds on both sides; no `rollout`
    at all stays absent (the operator's default strategy applies)."""
    name = unique_name("rollout")
    spec = {"rollout": {"strategy": "canary", "analysis": {"minRequests": 20}}}
    applied = kubectl(control_plane, "apply", "-n", crd_namespace, "-f", "-", manifest=_manifest(name, spec))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(kubectl(control_plane, "get", "tr", name, "-n", crd_namespace, "-o", "json").stdout)[
        "spec"
    ]
    parsed = TrainingRunSpec.model_validate(spec)
    assert stored["rollout"] == parsed.model_dump(by_alias=True, mode="json", exclude_none=True)["rollout"]
    assert stored["rollout"]["steps"] == [
        {"weight": 10, "holdSeconds": 120},
        {"weight": 50, "holdSeconds": 120},
    ]
    assert "strategy" not in apply_crd_defaults(SPEC_SCHEMA, {"rollout": {}})["rollout"]


def test_the_seed_manifests_are_accepted(control_plane: ControlPlane, crd_namespace: str) -> None:
    from testing.operator_harness import SEED_MANIFESTS

    assert SEED_MANIFESTS, "no seed TrainingRuns in manifests/trainingruns"
    for path in SEED_MANIFESTS:
        assert [manifest.kind for manifest in load_manifests(path.read_text())] == [KIND]
        result = kubectl(control_plane, "apply", "--dry-run=server", "-n", crd_namespace, "-f", str(path))
        assert result.returncode == 0, f"{path}: {result.stderr}"


def test_the_spec_is_immutable(control_plane: ControlPlane, crd_namespace: str) -> None:
    name = unique_name("immutable")
    created = kubectl(
        control_plane,
        "apply",
        "-n",
        crd_namespace,
        "-f",
        "-",
        manifest=_manifest(name, {"architecture": "baseline"}),
    )
    assert created.returncode == 0, created.stderr
    changed = kubectl(
        control_plane,
        "apply",
        "-n",
        crd_namespace,
        "-f",
        "-",
        manifest=_manifest(name, {"architecture": "enhanced"}),
    )
    assert changed.returncode != 0
    assert "spec is immutable" in changed.stderr, changed.stderr
    # Metadata stays editable (labels, annotations): only the training's definition is frozen.
    labelled = kubectl(control_plane, "label", "tr", name, "-n", crd_namespace, "team=vision")
    assert labelled.returncode == 0, labelled.stderr


def test_kubectl_get_shows_the_columns_and_the_category(
    control_plane: ControlPlane, crd_namespace: str
) -> None:
    name = unique_name("columns")
    applied = kubectl(control_plane, "apply", "-n", crd_namespace, "-f", "-", manifest=_manifest(name, {}))
    assert applied.returncode == 0, applied.stderr
    table = kubectl(control_plane, "get", "tr", name, "-n", crd_namespace)
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header == [
        "NAME",
        "PHASE",
        "ARCHITECTURE",
        "ACCURACY",
        "VERSION",
        "PROMOTED",
        "STRATEGY",
        "WEIGHT",
        "ANALYSIS",
        "AGE",
    ]
    by_category = kubectl(control_plane, "get", "mlops", "-n", crd_namespace, "-o", "name")
    assert f"trainingrun.{API_GROUP}/{name}" in by_category.stdout.split()


def test_crd_file_is_a_single_document() -> None:
    assert len(list(yaml.safe_load_all(CRD_PATH.read_text()))) == 1
