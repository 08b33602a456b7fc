"""The few Kubernetes API calls the handlers make, on the asyncio client, with plain dicts in and out.

kopf watches the TrainingRuns (and indexes the Jobs) itself; this is for the children: creating
Jobs, reading their pods, and patching the serving Deployments.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

from kubernetes.aio import client, config
from kubernetes.aio.client.exceptions import ApiException

from contract.spec import API_GROUP, API_VERSION, PLURAL

REQUEST_TIMEOUT_SECONDS = 30.0
MERGE_PATCH = "application/merge-patch+json"
# Merges lists by their keys (containers and env by name), so a patch touches one env var only.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
FIELD_MANAGER = "mnist-operator"
# A pod's /health answers at once or not at all; a hung pod must not hold up the others.
POD_PROXY_TIMEOUT_SECONDS = 5.0
# The API server's limit on an event message is 1 KiB.
EVENT_MESSAGE_LIMIT = 1024
KIND_API_VERSIONS = {"Deployment": "apps/v1", "Pod": "v1"}


class ConflictError(Exception):
    """The object already exists (409 on create)."""


async def api_client() -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: $KUBECONFIG (or ~/.kube/config)."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration, persist_config=False
        )
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _plain(self, obj: Any) -> Any:
        return self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self.api.close()  # type: ignore[no-untyped-call]

    async def create_job(self, job: Mapping[str, Any]) -> dict[str, Any]:
        namespace = str(job["metadata"]["namespace"])
        try:
            created = await self.batch.create_namespaced_job(
                namespace,
                client.V1Job.model_validate(job),
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(f"Job {namespace}/{job['metadata']['name']} already exists") from error
            raise
        return dict(self._plain(created))

    async def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            job = await self.batch.read_namespaced_job(
                name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(self._plain(job))

    async def create_service(self, service: Mapping[str, Any]) -> None:
        """Creates a Service; one that exists already (an earlier attempt's) is left as it is."""
        namespace = str(service["metadata"]["namespace"])
        try:
            await self.core.create_namespaced_service(
                namespace,
                client.V1Service.model_validate(service),
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as error:
            if error.status != 409:
                raise

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        pods = await self.core.list_namespaced_pod(
            namespace, label_selector=label_selector, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
        return [dict(self._plain(pod)) for pod in pods.items]

    async def list_deployments(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        deployments = await self.apps.list_namespaced_deployment(
            namespace, label_selector=label_selector, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
        return [dict(self._plain(deployment)) for deployment in deployments.items]

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            deployment = await self.apps.read_namespaced_deployment(
                name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(self._plain(deployment))

    async def patch_deployment(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        patched = await self.apps.patch_namespaced_deployment(
            name,
            namespace,
            dict(patch),
            field_manager=FIELD_MANAGER,
            _content_type=STRATEGIC_MERGE_PATCH,
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
        return dict(self._plain(patched))

    async def list_deployments_everywhere(self, label_selector: str) -> list[dict[str, Any]]:
        """Cluster-wide mode: the labelled Deployments of every namespace, in one request."""
        deployments = await self.apps.list_deployment_for_all_namespaces(
            label_selector=label_selector, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
        return [dict(self._plain(deployment)) for deployment in deployments.items]

    async def list_trainingruns(self, namespace: str) -> list[dict[str, Any]]:
        found = await self.custom.list_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
        items = found.get("items") if isinstance(found, dict) else None
        return [dict(item) for item in items or []]

    async def read_trainingrun(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = await self.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(found) if isinstance(found, dict) else None

    async def pod_proxy_get(self, namespace: str, pod: str, port: int, path: str) -> tuple[int, bytes]:
        """GET `path` of a pod through the API server's pod proxy: (HTTP status, body). The raw body,
        since the generated client would turn a JSON answer declared as `str` into a Python repr."""
        # Without preload: the raw aiohttp response, whatever its status (nothing is raised for a 4xx).
        response = await self.core.connect_get_namespaced_pod_proxy_with_path_without_preload_content(
            f"{pod}:{port}", namespace, path.lstrip("/"), _request_timeout=POD_PROXY_TIMEOUT_SECONDS
        )
        try:
            return int(response.status), await response.read()
        finally:
            response.release()

    async def post_event(
        self, involved: Mapping[str, Any], kind: str, type_: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event about `involved` (a plain object of kind `kind`), as `kubectl describe` shows."""
        meta = involved["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion") or KIND_API_VERSIONS.get(kind),
                "kind": kind,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:EVENT_MESSAGE_LIMIT],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.core.create_namespaced_event(
            meta["namespace"],
            client.CoreV1Event.model_validate(event),
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
