{{/* Names, labels, images and the checks of values that have no safe default. */}}

{{- define "defuse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "defuse.fullname" -}}
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

{{- define "defuse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "defuse.labels" -}}
helm.sh/chart: {{ include "defuse.chart" . }}
{{ include "defuse.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "defuse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "defuse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "defuse.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "defuse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "defuse.worker.fullname" -}}
{{- printf "%s-worker" (include "defuse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Service workers register through: publishes not-ready addresses. */}}
{{- define "defuse.registration.fullname" -}}
{{- printf "%s-registration" (include "defuse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The runner Job: <fullname>-run-<job file name, as a DNS label>. */}}
{{- define "defuse.runner.fullname" -}}
{{- printf "%s-run-%s" (include "defuse.fullname" .) (trimSuffix ".toml" .Values.runner.job | replace "." "-" | replace "_" "-" | lower | trunc 30 | trimSuffix "-") }}
{{- end }}

{{- define "defuse.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "defuse.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "defuse.image" -}}
{{- $repo := required "image.repository is required: the Defuse image built from deploy/docker/Dockerfile (e.g. --set image.repository=registry.example.com/defuse)" .Values.image.repository }}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "defuse.worker.image" -}}
{{- $repo := .Values.worker.image.repository | default .Values.image.repository }}
{{- $repo = required "image.repository (or worker.image.repository) is required: the Defuse image built from deploy/docker/Dockerfile or Dockerfile.cuda" $repo }}
{{- printf "%s:%s" $repo (.Values.worker.image.tag | default .Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Secret names: an existing Secret when given, else the chart's own. */}}
{{- define "defuse.secretName" -}}
{{- include "defuse.fullname" . }}
{{- end }}

{{- define "defuse.auth.secretName" -}}
{{- .Values.auth.existingSecret | default (include "defuse.secretName" .) }}
{{- end }}
{{- define "defuse.auth.secretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}
{{- define "defuse.auth.workerSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretWorkerKey }}{{ else }}worker-token{{ end }}
{{- end }}

{{/* The key of the metrics token in the auth Secret; empty: there is none. */}}
{{- define "defuse.auth.metricsSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretMetricsKey }}{{ else if .Values.auth.metricsToken }}metrics-token{{ end }}
{{- end }}

{{- define "defuse.redis.secretName" -}}
{{- .Values.redis.existingSecret | default (include "defuse.secretName" .) }}
{{- end }}
{{- define "defuse.redis.secretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{- define "defuse.s3.secretName" -}}
{{- .Values.s3.existingSecret | default (include "defuse.secretName" .) }}
{{- end }}

{{/* Whether the pods get S3 keys from a Secret at all (none: the pod's own role). */}}
{{- define "defuse.s3.hasKeys" -}}
{{- if or .Values.s3.existingSecret .Values.s3.accessKeyId .Values.s3.secretAccessKey }}true{{ end }}
{{- end }}

{{/* Whether the chart must create its own Secret. */}}
{{- define "defuse.createSecret" -}}
{{- if or (and .Values.auth.enabled (not .Values.auth.existingSecret)) (not .Values.redis.existingSecret) (and (not .Values.s3.existingSecret) (or .Values.s3.accessKeyId .Values.s3.secretAccessKey)) }}true{{ end }}
{{- end }}

{{/*
Checks of values that have no safe default, or that contradict each other. Included
by every template that needs them, so the message comes whichever file renders first.
*/}}
{{- define "defuse.validate" -}}
{{- $_ := include "defuse.image" . }}
{{- $_ := required "artifacts.location is required: where models and results go, e.g. s3://my-bucket/defuse (or file:///path on a shared volume)" .Values.artifacts.location }}
{{- if not (or (hasPrefix "s3://" .Values.artifacts.location) (hasPrefix "file:///" .Values.artifacts.location)) }}
{{- fail (printf "artifacts.location must start with s3:// or file:///, got %q" .Values.artifacts.location) }}
{{- end }}
{{- if not (or .Values.redis.url .Values.redis.existingSecret) }}
{{- fail "redis.url or redis.existingSecret is required: the coordinator keeps job, shard and worker state in Redis (e.g. redis.url=redis://redis:6379/0)" }}
{{- end }}
{{- if and .Values.auth.enabled (not (or .Values.auth.token .Values.auth.existingSecret)) }}
{{- fail "auth.token or auth.existingSecret is required while auth.enabled is true (the bearer token of every gRPC and HTTP call); set auth.enabled=false only on a trusted network" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- if not .Values.auth.workerToken }}
{{- fail "auth.workerToken is required with auth.token: the workers' own token, which opens only the worker API (openssl rand -hex 32)" }}
{{- end }}
{{- if or (lt (len .Values.auth.token) 32) (lt (len .Values.auth.workerToken) 32) }}
{{- fail "auth.token and auth.workerToken need at least 32 characters each (openssl rand -hex 32)" }}
{{- end }}
{{- if eq .Values.auth.token .Values.auth.workerToken }}
{{- fail "auth.token and auth.workerToken must differ: a worker's token must not open the job API" }}
{{- end }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) .Values.auth.metricsToken }}
{{- if lt (len .Values.auth.metricsToken) 32 }}
{{- fail "auth.metricsToken needs at least 32 characters (openssl rand -hex 32)" }}
{{- end }}
{{- if or (eq .Values.auth.metricsToken .Values.auth.token) (eq .Values.auth.metricsToken .Values.auth.workerToken) }}
{{- fail "auth.metricsToken must differ from auth.token and auth.workerToken: it opens only /metrics" }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.auth.enabled (not (include "defuse.auth.metricsSecretKey" .)) }}
{{- fail "metrics.serviceMonitor with auth on needs a metrics token: auth.metricsToken (or auth.existingSecretMetricsKey), which opens only /metrics" }}
{{- end }}
{{- if .Values.runner.enabled }}
{{- if not .Values.runner.job }}
{{- fail "runner.job is required when runner.enabled is true: the entry of jobs to run" }}
{{- end }}
{{- if not (hasKey .Values.jobs .Values.runner.job) }}
{{- fail (printf "runner.job %q is not an entry of jobs (entries: %s)" .Values.runner.job (keys .Values.jobs | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- if and (not .Values.s3.existingSecret) (ne (empty .Values.s3.accessKeyId) (empty .Values.s3.secretAccessKey)) }}
{{- fail "s3.accessKeyId and s3.secretAccessKey go together: set both, or neither (to use the pod's own credentials), or s3.existingSecret" }}
{{- end }}
{{- if and (eq .Values.data.type "pvc") (not .Values.data.claimName) }}
{{- fail "data.claimName is required when data.type is pvc" }}
{{- end }}
{{- if and (eq .Values.data.type "hostPath") (not .Values.data.hostPath) }}
{{- fail "data.hostPath is required when data.type is hostPath" }}
{{- end }}
{{- if and (gt (int .Values.coordinator.replicas) 1) .Values.coordinator.workClaimName }}
{{- fail "coordinator.replicas above 1 needs coordinator.workClaimName empty: each coordinator pod keeps its own cache (an emptyDir); what matters is in Redis and the artifact store" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) }}
{{- fail "ingress.host is required when ingress.enabled is true (the host name of the labelling page, e.g. defuse.example.com)" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.parentRefs is required when httpRoute.enabled is true: the Gateway the route attaches to, e.g. [{name: my-gateway, namespace: gateway-system}]" }}
{{- end }}
{{- if and (gt (int .Values.worker.gpu.count) 0) (eq .Values.worker.device "cpu") }}
{{- fail "worker.gpu.count is above 0 but worker.device is cpu: set worker.device=cuda (and a CUDA worker image, worker.image.repository)" }}
{{- end }}
{{- end }}

{{/* The user token: the coordinator's (and the Helm test's), never a worker's. */}}
{{- define "defuse.userTokenEnv" -}}
{{- if .Values.auth.enabled }}
- name: DEFUSE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "defuse.auth.secretName" . }}
      key: {{ include "defuse.auth.secretKey" . }}
{{- end }}
{{- end }}

{{/* The folders submitted jobs may read on the coordinator. */}}
{{- define "defuse.allowPaths" -}}
{{- $paths := list }}
{{- if ne .Values.data.type "none" }}{{ $paths = append $paths .Values.data.mountPath }}{{ end }}
{{- range .Values.coordinator.allowPaths }}{{ $paths = append $paths . }}{{ end }}
{{- join ":" $paths }}
{{- end }}

{{/* Environment shared by the coordinator and the workers: the worker token, S3 keys. */}}
{{- define "defuse.commonEnv" -}}
{{- if .Values.auth.enabled }}
- name: DEFUSE_WORKER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "defuse.auth.secretName" . }}
      key: {{ include "defuse.auth.workerSecretKey" . }}
{{- end }}
{{- if include "defuse.s3.hasKeys" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "defuse.s3.secretName" . }}
      key: {{ if .Values.s3.existingSecret }}{{ .Values.s3.accessKeyIdKey }}{{ else }}aws-access-key-id{{ end }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "defuse.s3.secretName" . }}
      key: {{ if .Values.s3.existingSecret }}{{ .Values.s3.secretAccessKeyKey }}{{ else }}aws-secret-access-key{{ end }}
{{- end }}
{{- end }}

{{/* The data volume (data.type), shared by the coordinator and the workers. */}}
{{- define "defuse.dataVolume" -}}
{{- if eq .Values.data.type "pvc" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .Values.data.claimName }}
    readOnly: {{ .Values.data.readOnly }}
{{- else if eq .Values.data.type "hostPath" }}
- name: data
  hostPath:
    path: {{ .Values.data.hostPath }}
    type: Directory
{{- else if eq .Values.data.type "emptyDir" }}
- name: data
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "defuse.dataMount" -}}
{{- if ne .Values.data.type "none" }}
- name: data
  mountPath: {{ .Values.data.mountPath }}
  readOnly: {{ and .Values.data.readOnly (ne .Values.data.type "emptyDir") }}
{{- end }}
{{- end }}
