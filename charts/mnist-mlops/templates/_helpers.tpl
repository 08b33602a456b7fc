{{/*
Names. Every resource name derives from "mnist-mlops.fullname" so two releases never collide, and
each component appends its own suffix ("-operator", "-mlflow", "-serving").
*/}}
{{- define "mnist-mlops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mnist-mlops.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's resource name; the base is cut short enough for the longest suffix to fit in 63. */}}
{{- define "mnist-mlops.componentName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- printf "%s-%s" (include "mnist-mlops.fullname" $root | trunc 50 | trimSuffix "-") $component }}
{{- end }}

{{- define "mnist-mlops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels. The part-of label is what the NetworkPolicies match as "the platform's own pods": the
operator puts it on the training pods it creates as well.
*/}}
{{- define "mnist-mlops.labels" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
helm.sh/chart: {{ include "mnist-mlops.chart" $root }}
{{ include "mnist-mlops.selectorLabels" (list $root $component) }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: mnist-mlops
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mnist-mlops.selectorLabels" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
app.kubernetes.io/name: {{ include "mnist-mlops.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{/* Image reference: a digest, when given, pins the image exactly and wins over the tag. */}}
{{- define "mnist-mlops.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (toString (default $root.Chart.AppVersion $image.tag)) }}
{{- end }}
{{- end }}

{{/*
checkov wants images pinned by digest and pulled with "Always". Both only make sense with a
registry; images side-loaded into kind have neither, so the skip is written only when no digest is
set, and says why right on the resource.
*/}}
{{- define "mnist-mlops.imageCheckSkips" -}}
{{- $image := index . 0 -}}
{{- if not $image.digest }}
checkov.io/skip1: CKV_K8S_43=Images are pinned by tag (the chart appVersion); set image.digest to pin by digest, which also drops this skip.
{{- end }}
{{- if ne $image.pullPolicy "Always" }}
checkov.io/skip2: CKV_K8S_15=IfNotPresent lets side-loaded images (kind load, minikube image load) run without a registry; set pullPolicy Always when pulling from one.
{{- end }}
{{- end }}

{{/* MLflow clients read the basic-auth credentials only from MLFLOW_TRACKING_USERNAME/PASSWORD. */}}
{{- define "mnist-mlops.clientSecretSkip" -}}
{{- if .Values.mlflow.auth.enabled }}
checkov.io/skip4: CKV_K8S_35=The MLflow client reads basic-auth credentials only from the MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD variables, so they come from the Secret through secretKeyRef.
{{- end }}
{{- end }}

{{- define "mnist-mlops.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "mnist-mlops.componentName" (list . "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mnist-mlops.mlflow.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "mnist-mlops.componentName" (list . "mlflow")) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- end }}

{{- define "mnist-mlops.serving.modelUri" -}}
{{- printf "models:/%s@%s" .Values.serving.registeredModel .Values.serving.modelAlias }}
{{- end }}

{{- define "mnist-mlops.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "mnist-mlops.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end }}

{{/*
Environment for every MLflow client of the chart (operator, serving): where the tracking server
is and, with basic auth on, the credentials from the auth Secret.
*/}}
{{- define "mnist-mlops.mlflowClientEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "mnist-mlops.mlflow.url" . | quote }}
{{- if .Values.mlflow.auth.enabled }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "mnist-mlops.mlflow.authSecretName" . }}
      key: {{ .Values.mlflow.auth.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "mnist-mlops.mlflow.authSecretName" . }}
      key: {{ .Values.mlflow.auth.passwordKey }}
{{- end }}
{{- end }}

{{- define "mnist-mlops.mlflow.authSecretName" -}}
{{- required "mlflow.auth.existingSecret is required when mlflow.auth.enabled is true" .Values.mlflow.auth.existingSecret }}
{{- end }}

{{/* The namespaces the operator's RBAC covers in namespaced mode. */}}
{{- define "mnist-mlops.watchNamespaces" -}}
{{- join "," .Values.operator.watchNamespaces }}
{{- end }}

{{/*
The MLflow image. PostgreSQL, S3 and basic auth need packages (psycopg2, boto3, Flask-WTF) that
only the official image's "-full" variant carries, so with any of them on, extrasSuffix is
appended to the tag. A digest pins the image exactly and is used as given.
*/}}
{{- define "mnist-mlops.mlflow.image" -}}
{{- $m := .Values.mlflow }}
{{- $needsExtras := or (eq $m.backendStore.type "postgresql") (eq $m.artifacts.type "s3") $m.auth.enabled }}
{{- if $m.image.digest }}
{{- printf "%s@%s" $m.image.repository $m.image.digest }}
{{- else if and $needsExtras $m.image.extrasSuffix (not (hasSuffix $m.image.extrasSuffix $m.image.tag)) }}
{{- printf "%s:%s%s" $m.image.repository $m.image.tag $m.image.extrasSuffix }}
{{- else }}
{{- printf "%s:%s" $m.image.repository $m.image.tag }}
{{- end }}
{{- end }}

{{/* The secretKeyRef (name, key) of the HMAC secret MLflow signs its webhooks to the operator with. */}}
{{- define "mnist-mlops.operator.webhookSecretRef" -}}
{{- if .Values.operator.mlflowWebhook.secretName }}
name: {{ .Values.operator.mlflowWebhook.secretName }}
key: {{ .Values.operator.mlflowWebhook.secretKey }}
{{- else }}
name: {{ include "mnist-mlops.componentName" (list . "mlflow-webhook") }}
key: secret
{{- end }}
{{- end }}

{{/* Non-empty when the operator serves a webhook, so its Service is needed. */}}
{{- define "mnist-mlops.operator.webhooks" -}}
{{- if or .Values.operator.mlflowWebhook.enabled .Values.operator.alertmanagerWebhook.enabled }}true{{ end }}
{{- end }}

{{/* Where in-cluster callers reach the operator's health port (its Service, service.yaml). */}}
{{- define "mnist-mlops.operator.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "mnist-mlops.componentName" (list . "operator")) .Release.Namespace (int .Values.operator.healthPort) }}
{{- end }}

{{/* The secretKeyRef (name, key) of the bearer token Alertmanager presents to the operator. */}}
{{- define "mnist-mlops.operator.alertmanagerTokenRef" -}}
name: {{ .Values.operator.alertmanagerWebhook.existingSecret | default (include "mnist-mlops.componentName" (list . "alertmanager-webhook")) }}
key: {{ .Values.operator.alertmanagerWebhook.secretKey }}
{{- end }}

{{/*
The secretKeyRef (name, key) of the prediction log's SQLAlchemy URL: serving.predictionLog's Secret,
which serving writes through, the drift job reads and the operator counts feedback in (a component's
own predictionLog.existingSecret wins, for a reader with other database credentials).
*/}}
{{- define "mnist-mlops.predictionLogSecretRef" -}}
{{- $root := index . 0 }}
{{- $own := index . 1 }}
{{- $log := $root.Values.serving.predictionLog }}
name: {{ $own.existingSecret | default $log.existingSecret | required "serving.predictionLog.existingSecret is required: the Secret holding the prediction log's SQLAlchemy URL" }}
key: {{ $own.urlKey | default $log.urlKey }}
{{- end }}
