"""The test control plane behaves like a real cluster's: version, admission, RBAC, controllers."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from local_mode.processes import wait_until
from testing.controlplane import BUILD_SCRIPT, ControlPlane, ControlPlaneError, locate_binaries
from testing.kubectl import kubectl, kubectl_ok, unique_name

COMMAND_TIMEOUT_SECONDS = 60.0
CONTROLLER_TIMEOUT_SECONDS = 60.0
RBAC_PROPAGATION_TIMEOUT_SECONDS = 30.0


def pinned_version(variable: str) -> str:
    """A version pinned at the top of the build script, so the test follows the pin."""
    match = re.search(rf'^{variable}="([^"]+)"$', BUILD_SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{variable} is not pinned in {BUILD_SCRIPT}"
    return match.group(1)


def api_client(kubeconfig: Path) -> client.ApiClient:
    api: client.ApiClient = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    return api


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    api = api_client(control_plane.kubeconfig_path)
    yield api
    api.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def namespace(control_plane: ControlPlane, admin: client.ApiClient) -> str:
    name = unique_name("cp-test")
    client.CoreV1Api(admin).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    control_plane.wait_for_serviceaccount(name)
    return name


def pod_manifest(name: str, *, privileged: bool) -> dict[str, Any]:
    if privileged:
        security: dict[str, Any] = {"privileged": True}
        pod_security: dict[str, Any] = {}
    else:
        security = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": 10001,
        }
        pod_security = {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "securityContext": pod_security,
            "containers": [{"name": "main", "image": "busybox:1.36", "securityContext": security}],
        },
    }


def apply(plane: ControlPlane, namespace: str, manifest: Mapping[str, Any]) -> None:
    kubectl_ok(plane, "apply", "-n", namespace, "-f", "-", manifest=manifest)


def get_items(plane: ControlPlane, namespace: str, resource: str, selector: str | None = None) -> list[Any]:
    args = ["get", resource, "-n", namespace, "-o", "json"]
    if selector:
        args += ["-l", selector]
    items: list[Any] = json.loads(kubectl_ok(plane, *args))["items"]
    return items


def owners(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(ref["kind"], ref["name"]) for ref in obj["metadata"].get("ownerReferences", [])]


def exists(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def is_forbidden(call: Callable[[], object]) -> bool:
    try:
        call()
    except ApiException as exc:
        if exc.status == 403:
            return True
        raise
    return False


# --------------------------------------------------------------------------- tests


def test_version_endpoint_reports_the_pinned_release(control_plane: ControlPlane) -> None:
    wanted = pinned_version("KUBERNETES_VERSION")
    info = control_plane.api_json("/version")
    assert info["gitVersion"] == wanted
    major, minor = wanted.lstrip("v").split(".")[:2]
    assert (info["major"], info["minor"]) == (major, minor)

    # The same answer through kubectl and the generated kubeconfig, not only our own HTTP client.
    result = kubectl(control_plane, "version", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["serverVersion"]["gitVersion"] == wanted


def test_helm_is_the_pinned_release_and_reaches_the_cluster(control_plane: ControlPlane) -> None:
    env = control_plane.env()
    version = subprocess.run(
        ["helm", "version", "--short"], env=env, capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_SECONDS, check=False,
    )  # fmt: skip
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(pinned_version("HELM_VERSION"))

    listing = subprocess.run(
        ["helm", "list", "--all-namespaces", "-o", "json"], env=env, capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_SECONDS, check=False,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == []


def test_pod_security_restricted_namespace_rejects_privileged_pods(control_plane: ControlPlane) -> None:
    restricted = unique_name("psa-restricted")
    created = kubectl(
        control_plane,
        "apply",
        "-f",
        "-",
        manifest={
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": restricted, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
        },
    )
    assert created.returncode == 0, created.stderr
    control_plane.wait_for_serviceaccount(restricted)

    privileged = kubectl(
        control_plane, "apply", "--dry-run=server", "-n", restricted, "-f", "-",
        manifest=pod_manifest("privileged", privileged=True),
    )  # fmt: skip
    assert privileged.returncode != 0, privileged.stdout
    assert 'violates PodSecurity "restricted:latest"' in privileged.stderr
    assert "privileged" in privileged.stderr

    compliant = kubectl(
        control_plane, "apply", "--dry-run=server", "-n", restricted, "-f", "-",
        manifest=pod_manifest("compliant", privileged=False),
    )  # fmt: skip
    assert compliant.returncode == 0, compliant.stderr
    assert "created (server dry run)" in compliant.stdout


def test_privileged_pod_is_admitted_without_the_pod_security_label(
    control_plane: ControlPlane, namespace: str
) -> None:
    # The control for the test above: the rejection must come from PodSecurity, not from the
    # API server refusing privileged containers altogether.
    result = kubectl(
        control_plane, "apply", "--dry-run=server", "-n", namespace, "-f", "-",
        manifest=pod_manifest("privileged", privileged=True),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(
    admin: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(admin)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"k": "v"})
    )
    assert owner.metadata is not None and owner.metadata.uid
    owner_ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    for name, refs in (("dependent", [owner_ref]), ("bystander", None)):
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, owner_references=refs))
        )

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    wait_until(
        lambda: not exists(lambda: core.read_namespaced_config_map("dependent", namespace)),
        CONTROLLER_TIMEOUT_SECONDS,
        "the garbage collector to delete the dependent ConfigMap",
    )
    # Only the owned object goes.
    assert exists(lambda: core.read_namespaced_config_map("bystander", namespace))


def test_deployment_controller_creates_replicaset_and_pending_pods(
    control_plane: ControlPlane, namespace: str
) -> None:
    labels = {"app": "web"}
    apply(
        control_plane,
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": pod_manifest("x", privileged=False)["spec"],
                },
            },
        },
    )

    wait_until(
        lambda: len(get_items(control_plane, namespace, "pods", "app=web")) == 2,
        CONTROLLER_TIMEOUT_SECONDS,
        "the Deployment's 2 pods",
    )
    replica_sets = get_items(control_plane, namespace, "replicasets", "app=web")
    assert len(replica_sets) == 1
    rs = replica_sets[0]
    assert owners(rs) == [("Deployment", "web")]
    for pod in get_items(control_plane, namespace, "pods", "app=web"):
        assert owners(pod) == [("ReplicaSet", rs["metadata"]["name"])]
        # No scheduler and no kubelet: admitted and stored, never run.
        assert pod["status"]["phase"] == "Pending"
        assert "nodeName" not in pod["spec"]


def test_job_controller_creates_a_pod_and_tracks_it(control_plane: ControlPlane, namespace: str) -> None:
    apply(
        control_plane,
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {**pod_manifest("x", privileged=False)["spec"], "restartPolicy": "Never"}
                },
            },
        },
    )
    wait_until(
        lambda: len(get_items(control_plane, namespace, "pods", "job-name=once")) == 1,
        CONTROLLER_TIMEOUT_SECONDS,
        "the Job's pod",
    )
    (pod,) = get_items(control_plane, namespace, "pods", "job-name=once")
    assert owners(pod) == [("Job", "once")]
    # The real controller also keeps status: one pod created and not finished.
    wait_until(
        lambda: get_items(control_plane, namespace, "jobs")[0].get("status", {}).get("active") == 1,
        CONTROLLER_TIMEOUT_SECONDS,
        "Job status.active == 1",
    )


def test_namespace_controller_finishes_namespace_deletion(admin: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(admin)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="content"))
    )
    core.delete_namespace(namespace)
    # Deleting content and dropping the `kubernetes` finalizer is the namespace controller's job.
    wait_until(
        lambda: not exists(lambda: core.read_namespace(namespace)),
        CONTROLLER_TIMEOUT_SECONDS,
        f"namespace {namespace} to be finalized",
    )


def grant_pod_reader(plane: ControlPlane, namespace: str, service_account: str) -> None:
    apply(
        plane,
        namespace,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
    )
    apply(
        plane,
        namespace,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
        },
    )


def test_impersonated_serviceaccount_is_bound_by_rbac(control_plane: ControlPlane, namespace: str) -> None:
    as_reader = control_plane.impersonating_kubeconfig(namespace, "reader")

    denied = kubectl(control_plane, "get", "pods", "-n", namespace, kubeconfig=as_reader)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr

    grant_pod_reader(control_plane, namespace, "reader")

    # The RBAC authorizer reads through an informer cache: the grant lands shortly after.
    wait_until(
        lambda: kubectl(control_plane, "get", "pods", "-n", namespace, kubeconfig=as_reader).returncode == 0,
        RBAC_PROPAGATION_TIMEOUT_SECONDS,
        "the RoleBinding to allow listing pods",
    )
    # The grant is exactly what the Role says: still no secrets, and nothing elsewhere.
    secrets = kubectl(control_plane, "get", "secrets", "-n", namespace, kubeconfig=as_reader)
    assert secrets.returncode != 0
    assert "Forbidden" in secrets.stderr
    elsewhere = kubectl(control_plane, "get", "pods", "-n", "default", kubeconfig=as_reader)
    assert elsewhere.returncode != 0
    assert "Forbidden" in elsewhere.stderr


def test_serviceaccount_token_kubeconfig_has_only_the_accounts_rights(
    control_plane: ControlPlane, admin: client.ApiClient, namespace: str
) -> None:
    client.CoreV1Api(admin).create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="operator"))
    )
    token_config = control_plane.serviceaccount_kubeconfig(namespace, "operator")
    # No admin credential may leak into it, or a client could escalate.
    assert "client-key" not in token_config.read_text()

    as_operator = api_client(token_config)
    try:
        core = client.CoreV1Api(as_operator)
        assert is_forbidden(lambda: core.list_namespaced_pod(namespace))

        grant_pod_reader(control_plane, namespace, "operator")
        wait_until(
            lambda: not is_forbidden(lambda: core.list_namespaced_pod(namespace)),
            RBAC_PROPAGATION_TIMEOUT_SECONDS,
            "the RoleBinding to allow listing pods",
        )
        assert is_forbidden(lambda: core.list_namespaced_secret(namespace))
        review = client.AuthenticationV1Api(as_operator).create_self_subject_review(
            client.V1SelfSubjectReview()
        )
        assert review.status is not None and review.status.user_info is not None
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:operator"
    finally:
        as_operator.close()  # type: ignore[no-untyped-call]


def test_startup_failure_names_the_component_and_shows_its_log(tmp_path: Path) -> None:
    real = locate_binaries()
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("etcd", "kube-controller-manager", "helm"):
        (fake / name).symlink_to(real / name)
    apiserver = fake / "kube-apiserver"
    apiserver.write_text("#!/bin/sh\necho 'simulated start-up failure' >&2\nexit 3\n")
    apiserver.chmod(0o755)
    parent = tmp_path / "planes"
    parent.mkdir()

    with pytest.raises(ControlPlaneError) as failure:
        ControlPlane.start(bin_dir=fake, parent_dir=parent, timeout=60)

    assert "kube-apiserver exited with code 3" in str(failure.value)
    assert "simulated start-up failure" in str(failure.value)
    # The etcd that did start was stopped and its directory removed.
    assert list(parent.iterdir()) == []
