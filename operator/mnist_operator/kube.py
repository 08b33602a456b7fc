"""The few Kubernetes API calls the handlers make, on the asyncio client, with plain dicts in and out.

kopf watches the TrainingRuns (and indexes the Jobs) itself; this is for the children: creating
Jobs, reading their pods, and patching the serving Deployments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kubernetes.aio import client, config
from kubernetes.aio.client.exceptions import ApiException

REQUEST_TIMEOUT_SECONDS = 30.0
MERGE_PATCH = "application/merge-patch+json"
# Merges lists by their keys (containers and env by name), so a patch touches one env var only.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
FIELD_MANAGER = "mnist-operator"


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
