"""Pure builders of the objects the operator creates or patches: plain dicts, no API calls.

Names are deterministic (a TrainingRun `x` always gets the Job `x-train`), which is what makes a
repeated create safe: the second attempt meets 409 Conflict and adopts the Job the first one made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from contract.constants import (
    NON_RETRYABLE_EXIT_CODES,
    WORKER_HOSTS_ENV,
    WORKER_PORT,
    WORKER_PORT_NAME,
)
from contract.retraining import FEEDBACK_DB_URL_ENV
from contract.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    MODEL_VERSION_ANNOTATION,
    REGISTERED_MODEL_LABEL,
    TrainingRunSpec,
)
from contract.train_command import spec_to_args
from mnist_operator.config import OperatorConfig

OPERATOR_NAME = "mnist-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
TRAININGRUN_LABEL = f"{API_GROUP}/trainingrun"
TRAININGRUN_UID_ANNOTATION = f"{API_GROUP}/trainingrun-uid"
JOB_SUFFIX = "-train"
WORKERS_SERVICE_SUFFIX = "-workers"
# The label Kueue admits a suspended Job by (its LocalQueue in the Job's namespace).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Set by the Job controller on every pod of a Job; the workers' headless Service selects by it.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTAINER_NAME = "train"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The serving setting (serving/settings.py) a rollout pins to the promoted version.
SERVING_MODEL_URI_ENV = "SERVING_MODEL_URI"
GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS_USER = 10001
# Inside the pod: the emptyDir mount that makes a read-only root filesystem workable.
SCRATCH_DIR = "/tmp"  # noqa: S108


def job_name(trainingrun_name: str) -> str:
    return f"{trainingrun_name}{JOB_SUFFIX}"


def workers_service_name(trainingrun_name: str) -> str:
    return f"{trainingrun_name}{WORKERS_SERVICE_SUFFIX}"


def worker_hosts(trainingrun_name: str, workers: int) -> list[str]:
    """Each worker's stable address: an Indexed Job's pod `<job>-<i>` is `<job>-<i>.<service>` in DNS
    once its template names the headless Service as `subdomain`; worker 0 first."""
    job, service = job_name(trainingrun_name), workers_service_name(trainingrun_name)
    return [f"{job}-{index}.{service}:{WORKER_PORT}" for index in range(workers)]


def build_workers_service(*, name: str, namespace: str, uid: str) -> dict[str, Any]:
    """The headless Service that gives a multi-worker Job's pods their DNS names. Not-ready addresses
    are published: the workers must find each other before any of them is ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": workers_service_name(name),
            "namespace": namespace,
            "labels": training_labels(name),
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_NAME_LABEL: job_name(name)},
            "ports": [{"name": WORKER_PORT_NAME, "port": WORKER_PORT, "targetPort": WORKER_PORT}],
        },
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Makes the Job a dependent of its TrainingRun, so deleting the run garbage-collects it."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def training_labels(trainingrun_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "mnist-training",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "mnist-mlops",
        MANAGED_BY_LABEL: OPERATOR_NAME,
        TRAININGRUN_LABEL: trainingrun_name,
    }


def resource_requirements(
    resources: Mapping[str, Any] | None, default_cpu: str, default_memory: str
) -> dict[str, dict[str, str]]:
    """cpu is a request only (a CPU limit throttles training for nothing); memory is both, so the
    pod is never the first one evicted; GPUs must be requested and limited alike."""
    resources = resources or {}
    cpu = str(resources.get("cpu", default_cpu))
    memory = str(resources.get("memory", default_memory))
    gpu = int(resources.get("gpu") or 0)
    requests = {"cpu": cpu, "memory": memory}
    limits = {"memory": memory}
    if gpu > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpu)
    return {"requests": requests, "limits": limits}


def pod_security_context() -> dict[str, Any]:
    """The restricted Pod Security Standard, so the pods are admitted in enforce=restricted namespaces."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def feedback_env(spec: TrainingRunSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """MNIST_FEEDBACK_DB_URL for a run that trains on the prediction log's labelled feedback: from the
    configured Secret (a URL with a password belongs in one), else the operator's own prediction log
    URL; nothing when the run does not ask for feedback or no prediction log is configured."""
    if not spec.include_feedback:
        return []
    if config.feedback_db_secret:
        reference = {"name": config.feedback_db_secret, "key": config.feedback_db_secret_key}
        return [{"name": FEEDBACK_DB_URL_ENV, "valueFrom": {"secretKeyRef": reference}}]
    if config.prediction_log_url:
        return [{"name": FEEDBACK_DB_URL_ENV, "value": config.prediction_log_url}]
    return []


def build_job_spec(
    *,
    name: str,
    namespace: str,
    uid: str,
    spec: TrainingRunSpec,
    config: OperatorConfig,
) -> dict[str, Any]:
    """The training Job of the TrainingRun `namespace/name` (uid `uid`)."""
    labels = training_labels(name)
    args = [
        *spec_to_args(spec, run_name=name),
        f"--trainingrun-name={name}",
        f"--trainingrun-namespace={namespace}",
        f"--trainingrun-uid={uid}",
    ]
    env: list[dict[str, Any]] = [
        {"name": "MLFLOW_TRACKING_URI", "value": config.mlflow_tracking_uri},
        # Mirrors terminationMessagePath for the process (contract.result reads it).
        {"name": "TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
        # The root filesystem is read-only: every cache goes to the /tmp emptyDir.
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "KERAS_HOME", "value": f"{SCRATCH_DIR}/.keras"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_DIR}/.matplotlib"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if config.mlflow_auth_secret:
        # The MLflow client reads basic-auth credentials only from these variables.
        env += [
            {
                "name": variable,
                "valueFrom": {"secretKeyRef": {"name": config.mlflow_auth_secret, "key": key}},
            }
            for variable, key in (
                ("MLFLOW_TRACKING_USERNAME", config.mlflow_auth_username_key),
                ("MLFLOW_TRACKING_PASSWORD", config.mlflow_auth_password_key),
            )
        ]
    env += feedback_env(spec, config)
    resources = resource_requirements(spec.resources, config.default_cpu, config.default_memory)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Training talks to MLflow only; no Kubernetes API credentials in the pod.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": spec.image or config.training_image,
                "imagePullPolicy": config.training_image_pull_policy,
                "command": ["python", "-m", "training_job"],
                "args": args,
                "env": env,
                "resources": resources,
                "securityContext": container_security_context(),
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                # The result JSON on success; the log tail when the process dies without writing one.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [{"name": "tmp", "mountPath": SCRATCH_DIR}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if config.training_service_account:
        pod_spec["serviceAccountName"] = config.training_service_account
    if config.training_image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in config.training_image_pull_secrets]
    if GPU_RESOURCE in resources["limits"]:
        pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "completions": spec.workers,
        "parallelism": spec.workers,
        # A replacement pod starts only once the failed one is gone: never two runs logging at once.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
                # Evictions and preemptions are not the training's fault.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.workers > 1:
        # One pod per worker, each knowing its index (JOB_COMPLETION_INDEX) and every worker's address:
        # what the training process turns into TF_CONFIG. A failed worker fails the whole Job, since
        # the collective all-reduce cannot continue without it (podFailurePolicy above already fails
        # it on the non-retryable codes; backoffLimitPerIndex 0 makes any other failure final too).
        job_spec["completionMode"] = "Indexed"
        job_spec["backoffLimitPerIndex"] = 0
        job_spec["maxFailedIndexes"] = 0
        del job_spec["backoffLimit"]
        pod_spec["subdomain"] = workers_service_name(name)
        pod_spec["containers"][0]["env"].append(
            {"name": WORKER_HOSTS_ENV, "value": ",".join(worker_hosts(name, spec.workers))}
        )
        pod_spec["containers"][0]["ports"] = [{"name": WORKER_PORT_NAME, "containerPort": WORKER_PORT}]
    job_labels = dict(labels)
    if spec.queue_name:
        # Kueue admits the Job by unsuspending it; created running, it would start before admission.
        job_spec["suspend"] = True
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {TRAININGRUN_UID_ANNOTATION: uid},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": job_spec,
    }


def serving_label_selector(registered_model: str, serving_selector: Mapping[str, Any] | None) -> str:
    """The label selector (string form) of the serving Deployments a promotion rolls."""
    terms = [f"{REGISTERED_MODEL_LABEL}={registered_model}"]
    selector = serving_selector or {}
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        terms.append(f"{key}={value}")
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = ",".join(expression.get("values") or [])
        if operator == "In":
            terms.append(f"{key} in ({values})")
        elif operator == "NotIn":
            terms.append(f"{key} notin ({values})")
        elif operator == "Exists":
            terms.append(key)
        elif operator == "DoesNotExist":
            terms.append(f"!{key}")
        else:
            raise ValueError(f"unsupported label selector operator {operator!r}")
    return ",".join(terms)


def pinned_model_uri(registered_model: str, version: str) -> str:
    """The exact registry reference a rollout writes into the serving pods' environment."""
    return f"models:/{registered_model}/{version}"


def serving_containers(deployment: Mapping[str, Any]) -> dict[str, str]:
    """Container name → literal SERVING_MODEL_URI of each container of the pod template that has one."""
    pod_spec = deployment.get("spec", {}).get("template", {}).get("spec", {}) or {}
    found: dict[str, str] = {}
    for container in pod_spec.get("containers") or []:
        for item in container.get("env") or []:
            if item.get("name") == SERVING_MODEL_URI_ENV and item.get("value") is not None:
                found[str(container["name"])] = str(item["value"])
    return found


def model_uri_of(deployment: Mapping[str, Any]) -> str | None:
    """The model URI the serving pods load (the first serving container's), or None without one."""
    uris = serving_containers(deployment)
    return next(iter(uris.values()), None) if uris else None


def served_version(deployment: Mapping[str, Any], registered_model: str) -> str | None:
    """The version the pod template serves: its pinned URI, else the annotation (alias-served pods)."""
    pinned = re.compile(rf"models:/{re.escape(registered_model)}/(?P<version>[0-9]+)")
    for uri in serving_containers(deployment).values():
        match = pinned.fullmatch(uri)
        if match is not None:
            return match["version"]
    return model_version_annotation(deployment)


def build_rollout_patch(
    version: str | None, model_uri: str | None = None, containers: Sequence[str] = ()
) -> dict[str, Any]:
    """A strategic merge patch of the pod template: the version annotation (None removes it, and
    the ServiceMonitor labels series with it) and, in each named container, SERVING_MODEL_URI.

    The URI is pinned (models:/<name>/<version>) rather than left on the alias, so every pod of a
    ReplicaSet loads the same version whenever it starts, and the Deployment's revision history is
    the model's history: `kubectl rollout undo` goes back to the previous model. Strategic merge
    merges `containers` and `env` by name, so nothing else in the template is touched.
    """
    template: dict[str, Any] = {"metadata": {"annotations": {MODEL_VERSION_ANNOTATION: version}}}
    if model_uri is not None and containers:
        template["spec"] = {
            "containers": [
                {"name": name, "env": [{"name": SERVING_MODEL_URI_ENV, "value": model_uri}]}
                for name in sorted(containers)
            ]
        }
    return {"spec": {"template": template}}


def model_version_annotation(deployment: Mapping[str, Any]) -> str | None:
    template_meta = deployment.get("spec", {}).get("template", {}).get("metadata", {})
    value = (template_meta.get("annotations") or {}).get(MODEL_VERSION_ANNOTATION)
    return None if value is None else str(value)
