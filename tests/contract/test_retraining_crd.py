"""The RetrainingPolicy CRD mirrors contract/retraining.py, and a real API server enforces it.

The schema walk compares the CRD's spec with the pydantic model (names, types, bounds, lengths, enums,
patterns, required fields, defaults); spec.trainingRunTemplate must be the TrainingRun CRD's spec
schema itself, minus its immutability rule, so a field added to TrainingRuns is one a policy can set.
Then bad policies are applied with kubectl and must be rejected naming the problem; what the schema
cannot express (a cron expression) is refused by the model with a clear message (and by the operator
as an InvalidSpec condition: tests/mnist_operator/test_retraining.py).
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from contract.retraining import (
    API_GROUP,
    API_VERSION,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SHORT_NAME,
    ConcurrencyPolicy,
    RetrainingPolicySpec,
    next_fire_time,
)
from contract.spec import TrainingRunSpec
from testing.controlplane import ControlPlane
from testing.kubectl import kubectl, unique_name
from testing.operator_harness import RETRAINING_CRD_PATH, load_crd

CRD = yaml.safe_load(RETRAINING_CRD_PATH.read_text())
VERSION = next(version for version in CRD["spec"]["versions"] if version["name"] == API_VERSION)
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]
PYDANTIC = RetrainingPolicySpec.model_json_schema(by_alias=True, mode="validation")
TEMPLATE = "trainingRunTemplate"


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pydantic node behind $ref / allOf / anyOf-with-null."""
    while True:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = {**PYDANTIC["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
        elif "allOf" in node and len(node["allOf"]) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        elif "anyOf" in node:
            options = [option for option in node["anyOf"] if option.get("type") != "null"]
            assert len(options) == 1, node
            node = {**options[0], **{k: v for k, v in node.items() if k not in {"anyOf", "default"}}}
        else:
            return node


KEYWORDS = ("type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems")


def mismatches(model: Mapping[str, Any], crd: Mapping[str, Any], path: str) -> Iterator[str]:
    model = _resolve(model)
    for keyword in KEYWORDS:
        if model.get(keyword) != crd.get(keyword):
            yield f"{path}: {keyword} {crd.get(keyword)!r} != pydantic {model.get(keyword)!r}"
    if model.get("default") is not None and model.get("default") != crd.get("default"):
        yield f"{path}: default {crd.get('default')!r} != pydantic {model.get('default')!r}"
    if "items" in model:
        yield from mismatches(model["items"], crd.get("items", {}), f"{path}[]")
    properties = model.get("properties")
    if properties is None:
        return
    crd_properties = crd.get("properties", {})
    if set(properties) != set(crd_properties):
        yield f"{path}: pydantic {sorted(properties)} != CRD {sorted(crd_properties)}"
    if sorted(model.get("required", [])) != sorted(crd.get("required", [])):
        yield f"{path}: required {crd.get('required')} != pydantic {model.get('required')}"
    for key in sorted(set(properties) & set(crd_properties)):
        if key != TEMPLATE:
            yield from mismatches(properties[key], crd_properties[key], f"{path}.{key}")


def trainingrun_spec_schema() -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(
        load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    )
    spec["x-kubernetes-validations"] = [
        rule for rule in spec["x-kubernetes-validations"] if rule["rule"] != "self == oldSelf"
    ]
    return spec


def _comparable(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in schema.items() if key not in {"description", "default"}}


def test_the_spec_matches_the_pydantic_model() -> None:
    found = list(mismatches(PYDANTIC, SPEC_SCHEMA, "spec"))
    assert not found, "the CRD drifted from contract/retraining.py:\n" + "\n".join(found)


def test_the_walk_notices_drift() -> None:
    drifted = copy.deepcopy(SPEC_SCHEMA)
    drifted["properties"]["historyLimit"]["maximum"] = 7
    feedback = drifted["properties"]["triggers"]["properties"]["feedback"]["properties"]
    feedback["min_labelled"] = feedback.pop("minLabelled")
    found = list(mismatches(PYDANTIC, drifted, "spec"))
    assert any("spec.historyLimit: maximum 7" in line for line in found), found
    assert any("spec.triggers.feedback: pydantic ['minLabelled']" in line for line in found), found


def test_the_template_is_the_trainingrun_spec_schema() -> None:
    """A field added to TrainingRuns must be added here too (re-copy it from the TrainingRun CRD)."""
    assert _comparable(SPEC_SCHEMA["properties"][TEMPLATE]) == _comparable(trainingrun_spec_schema())
    template = PYDANTIC["properties"][TEMPLATE]
    assert template["$ref"].endswith("/TrainingRunSpec")


def test_names_columns_and_status_subresource() -> None:
    names = CRD["spec"]["names"]
    assert (CRD["spec"]["group"], names["kind"], names["plural"], names["shortNames"]) == (
        API_GROUP,
        KIND,
        PLURAL,
        [SHORT_NAME],
    )
    assert "mlops" in names["categories"]
    assert VERSION["subresources"] == {"status": {}}
    columns = {column["name"]: column["jsonPath"] for column in VERSION["additionalPrinterColumns"]}
    assert columns["Last trigger"] == ".status.lastTrigger.detail"
    assert columns["Last run"] == ".status.lastTrigger.trainingRun"
    assert columns["Active"] == ".status.active"
    # The status keeps kopf's bookkeeping, which the schema does not describe.
    assert SCHEMA["properties"]["status"]["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"]
    rule = SCHEMA["x-kubernetes-validations"][0]
    assert rule["rule"] == f"size(self.metadata.name) <= {MAX_NAME_LENGTH}"


# ------------------------------------------------------------------------ the model on its own


def _policy(**spec: Any) -> dict[str, Any]:
    return {"trainingRunTemplate": {}, **spec}


def test_a_minimal_policy_is_defaulted() -> None:
    parsed = RetrainingPolicySpec.model_validate(_policy(triggers={"schedule": "0 3 * * *"}))
    assert parsed.concurrency_policy == ConcurrencyPolicy.FORBID
    assert parsed.history_limit == 5
    assert parsed.training_run_template == TrainingRunSpec()


@pytest.mark.parametrize(
    ("triggers", "message"),
    [
        ({}, "triggers needs at least one of schedule, alert or feedback"),
        ({"schedule": "every day at 3"}, "has 4 fields; a cron schedule has 5"),
        ({"schedule": "*/5 * * * * *"}, "has 6 fields"),
        ({"schedule": "61 3 * * *"}, "is not a valid cron expression"),
        ({"schedule": "@sometimes"}, "unknown macro"),
        ({"alert": {"names": []}}, "at least 1 item"),
        ({"alert": {"names": ["Mnist-Drift"]}}, "should match pattern"),
        ({"alert": {"names": ["A", "A"]}}, "alert names must be unique"),
        ({"feedback": {"minLabelled": 0}}, "greater than or equal to 1"),
    ],
)
def test_bad_triggers_are_refused_with_a_clear_message(triggers: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as error:
        RetrainingPolicySpec.model_validate(_policy(triggers=triggers))
    assert message in str(error.value)


def test_the_template_is_validated_as_a_trainingrun_spec() -> None:
    with pytest.raises(ValidationError, match="must divide evenly among workers"):
        RetrainingPolicySpec.model_validate(
            {
                "trainingRunTemplate": {"workers": 3, "hyperparameters": {"batchSize": 128}},
                "triggers": {"schedule": "@daily"},
            }
        )


def test_next_fire_time_is_utc_and_strictly_after() -> None:
    moment = datetime.datetime(2026, 5, 1, 3, 0, tzinfo=datetime.UTC)
    assert next_fire_time("0 3 * * *", moment) == datetime.datetime(2026, 5, 2, 3, 0, tzinfo=datetime.UTC)
    assert next_fire_time("@hourly", moment) == datetime.datetime(2026, 5, 1, 4, 0, tzinfo=datetime.UTC)


# ------------------------------------------------------------------------ against the API server


def _manifest(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def policy_namespace(control_plane: ControlPlane, crd_installed: None) -> Iterator[str]:
    namespace = unique_name("rp-crd")
    result = kubectl(control_plane, "create", "namespace", namespace)
    assert result.returncode == 0, result.stderr
    yield namespace
    kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


SCHEDULE = {"schedule": "0 3 * * *"}
INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "no-triggers",
        {"trainingRunTemplate": {}, "triggers": {}},
        "spec.triggers in body should have at least 1 properties",
    ),
    ("no-template", {"triggers": SCHEDULE}, "spec.trainingRunTemplate: Required value"),
    (
        "concurrency",
        _policy(triggers=SCHEDULE, concurrencyPolicy="Allow"),
        'spec.concurrencyPolicy: Unsupported value: "Allow"',
    ),
    (
        "history",
        _policy(triggers=SCHEDULE, historyLimit=0),
        "spec.historyLimit in body should be greater than or equal to 1",
    ),
    (
        "min-labelled",
        _policy(triggers={"feedback": {"minLabelled": 0}}),
        "minLabelled in body should be greater than or equal to 1",
    ),
    (
        "alert-empty",
        _policy(triggers={"alert": {"names": []}}),
        "spec.triggers.alert.names in body should have at least 1 items",
    ),
    (
        "alert-name",
        _policy(triggers={"alert": {"names": ["Mnist-Drift"]}}),
        "spec.triggers.alert.names[0] in body should match",
    ),
    (
        "alert-duplicate",
        _policy(triggers={"alert": {"names": ["A", "A"]}}),
        'spec.triggers.alert.names[1]: Duplicate value: "A"',
    ),
    ("unknown-trigger", _policy(triggers={"drift": {}}), 'unknown field "spec.triggers.drift"'),
    (
        "template-arch",
        {"trainingRunTemplate": {"architecture": "resnet"}, "triggers": SCHEDULE},
        'spec.trainingRunTemplate.architecture: Unsupported value: "resnet"',
    ),
    (
        "template-workers",
        {"trainingRunTemplate": {"workers": 3}, "triggers": SCHEDULE},
        "must be a multiple of workers",
    ),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_policies_are_rejected(
    control_plane: ControlPlane, policy_namespace: str, case: str, spec: dict[str, Any], message: str
) -> None:
    result = kubectl(
        control_plane, "apply", "-n", policy_namespace, "-f", "-", manifest=_manifest(f"bad-{case}", spec)
    )
    assert result.returncode != 0, f"{case} was accepted: {result.stdout}"
    assert message in result.stderr, result.stderr


def test_a_too_long_name_is_rejected(control_plane: ControlPlane, policy_namespace: str) -> None:
    result = kubectl(
        control_plane,
        "apply",
        "-n",
        policy_namespace,
        "-f",
        "-",
        manifest=_manifest("x" * (MAX_NAME_LENGTH + 1), _policy(triggers=SCHEDULE)),
    )
    assert result.returncode != 0
    assert f"metadata.name must be at most {MAX_NAME_LENGTH} characters" in result.stderr, result.stderr


def test_a_valid_policy_is_stored_defaulted_and_parses(
    control_plane: ControlPlane, policy_namespace: str
) -> None:
    name = unique_name("policy")
    spec = {
        "trainingRunTemplate": {"hyperparameters": {"epochs": 1}},
        "triggers": {"alert": {"names": ["MnistInputDrift"]}},
    }
    applied = kubectl(
        control_plane, "apply", "-n", policy_namespace, "-f", "-", manifest=_manifest(name, spec)
    )
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(
        kubectl(control_plane, "get", "rp", name, "-n", policy_namespace, "-o", "json").stdout
    )["spec"]
    assert stored["concurrencyPolicy"] == "Forbid"
    assert stored["historyLimit"] == 5
    # The template is defaulted like a TrainingRun's spec.
    assert stored[TEMPLATE] == {
        **TrainingRunSpec().model_dump(by_alias=True, mode="json", exclude_none=True),
        "hyperparameters": {
            **TrainingRunSpec().hyperparameters.model_dump(by_alias=True, mode="json"),
            "epochs": 1,
        },
    }
    parsed = RetrainingPolicySpec.model_validate(stored)
    assert parsed.training_run_template.hyperparameters.epochs == 1
    table = kubectl(control_plane, "get", "rp", name, "-n", policy_namespace)
    assert table.stdout.splitlines()[0].split() == ["NAME", "LAST", "TRIGGER", "LAST", "RUN", "ACTIVE", "AGE"]
    # Unlike a TrainingRun's, a policy's spec may change.
    changed = kubectl(
        control_plane,
        "patch",
        "rp",
        name,
        "-n",
        policy_namespace,
        "--type=merge",
        "-p",
        '{"spec":{"historyLimit":2}}',
    )
    assert changed.returncode == 0, changed.stderr
