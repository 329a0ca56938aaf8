{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "chamelaion-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, unless the release name already contains the chart name.
Truncated to 50 characters so that suffixes such as "-worker-metrics" still fit in 63.
*/}}
{{- define "chamelaion-relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chamelaion-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels of every resource.
*/}}
{{- define "chamelaion-relay.labels" -}}
helm.sh/chart: {{ include "chamelaion-relay.chart" . }}
{{ include "chamelaion-relay.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chamelaion-relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels shared by all of the release's pods; add a component to tell them apart.
*/}}
{{- define "chamelaion-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chamelaion-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component: (dict "ctx" $ "component" "api").
*/}}
{{- define "chamelaion-relay.componentLabels" -}}
{{ include "chamelaion-relay.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "chamelaion-relay.componentSelectorLabels" -}}
{{ include "chamelaion-relay.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "chamelaion-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chamelaion-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest wins over the tag.
Call with (dict "image" .Values.image "default" .Chart.AppVersion).
*/}}
{{- define "chamelaion-relay.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .default | toString) }}
{{- end }}
{{- end }}

{{- define "chamelaion-relay.image" -}}
{{- include "chamelaion-relay.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{/*
Name of the Secret holding CHAMELAION_API_KEY, RELAY_API_KEYS and RELAY_WEBHOOK_SECRETS.
*/}}
{{- define "chamelaion-relay.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "chamelaion-relay.fullname" .) }}
{{- end }}

{{/*
Whether the chart writes its own Secret: for the app's credentials, or for redis.url.
*/}}
{{- define "chamelaion-relay.createSecret" -}}
{{- if or (not .Values.secrets.existingSecret) (include "chamelaion-relay.redisUrlInSecret" .) }}true{{ end }}
{{- end }}

{{- define "chamelaion-relay.redisUrlInSecret" -}}
{{- if and .Values.redis.url (not .Values.redis.existingSecret) (not .Values.redis.standalone.enabled) }}true{{ end }}
{{- end }}

{{- define "chamelaion-relay.redisName" -}}
{{- printf "%s-redis" (include "chamelaion-relay.fullname" .) }}
{{- end }}

{{/*
The standalone Redis password: the value given, else the one already in the cluster (so
upgrades keep it), else a new random one. Evaluated once, in the Redis Secret only.
*/}}
{{- define "chamelaion-relay.redisPassword" -}}
{{- if .Values.redis.standalone.auth.password }}
{{- .Values.redis.standalone.auth.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "chamelaion-relay.redisName" .) }}
{{- if and $existing (hasKey ($existing.data | default dict) "redis-password") }}
{{- index $existing.data "redis-password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of both relay processes: the ConfigMap, the credentials Secret and the Redis URL.
Secret keys come in through envFrom so that a missing key is reported by the relay's own
start-up check, with its own message, rather than as CreateContainerConfigError.
*/}}
{{- define "chamelaion-relay.envFrom" -}}
- configMapRef:
    name: {{ include "chamelaion-relay.fullname" . }}
- secretRef:
    name: {{ include "chamelaion-relay.secretName" . }}
{{- end }}

{{- define "chamelaion-relay.env" -}}
{{- if .Values.redis.existingSecret }}
- name: RELAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else if .Values.redis.standalone.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "chamelaion-relay.redisName" . }}
      key: redis-password
- name: RELAY_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "chamelaion-relay.redisName" .) | quote }}
{{- else if .Values.redis.url }}
- name: RELAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "chamelaion-relay.fullname" . }}
      key: RELAY_REDIS_URL
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Checksums that roll the pods when the chart's ConfigMap or Secret changes.
*/}}
{{- define "chamelaion-relay.checksums" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if include "chamelaion-relay.createSecret" . }}
checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Render-time checks that the schema cannot express.
*/}}
{{- define "chamelaion-relay.validate" -}}
{{- if and .Values.callers.existingSecret .Values.secrets.apiKeys }}
{{- fail "callers: set callers.existingSecret or secrets.apiKeys, not both (give those keys a caller in the callers file)" }}
{{- end }}
{{- $redis := 0 }}
{{- if .Values.redis.url }}{{ $redis = add1 $redis }}{{ end }}
{{- if .Values.redis.existingSecret }}{{ $redis = add1 $redis }}{{ end }}
{{- if .Values.redis.standalone.enabled }}{{ $redis = add1 $redis }}{{ end }}
{{- if gt $redis 1 }}
{{- fail "redis: set only one of redis.url, redis.existingSecret and redis.standalone.enabled" }}
{{- end }}
{{- $drain := int .Values.config.shutdownTimeout }}
{{- $apiGrace := add .Values.api.preStopSleepSeconds $drain 5 }}
{{- if lt (int .Values.api.terminationGracePeriodSeconds) (int $apiGrace) }}
{{- fail (printf "api.terminationGracePeriodSeconds (%v) must be at least api.preStopSleepSeconds + config.shutdownTimeout + 5 = %v" .Values.api.terminationGracePeriodSeconds $apiGrace) }}
{{- end }}
{{- /* The worker drains for shutdownTimeout, then hands unfinished work back and closes. */}}
{{- $workerGrace := add $drain 15 }}
{{- if lt (int .Values.worker.terminationGracePeriodSeconds) (int $workerGrace) }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%v) must be at least config.shutdownTimeout + 15 = %v: the worker drains, then hands its work back" .Values.worker.terminationGracePeriodSeconds $workerGrace) }}
{{- end }}
{{- if and .Values.worker.keda.enabled (gt (int .Values.worker.keda.minReplicaCount) (int .Values.worker.keda.maxReplicaCount)) }}
{{- fail "worker.keda.minReplicaCount must not exceed worker.keda.maxReplicaCount" }}
{{- end }}
{{- if and .Values.api.autoscaling.enabled (gt (int .Values.api.autoscaling.minReplicas) (int .Values.api.autoscaling.maxReplicas)) }}
{{- fail "api.autoscaling.minReplicas must not exceed api.autoscaling.maxReplicas" }}
{{- end }}
{{- /* Callers choose where callbacks go: the receivers' networks are asked for, never assumed. */}}
{{- $c := .Values.config }}
{{- if and $c.callbackAllowedNetworks $c.callbackAllowAnyNetwork }}
{{- fail "config: set config.callbackAllowedNetworks or config.callbackAllowAnyNetwork, not both" }}
{{- end }}
{{- if not (or $c.callbackAllowedNetworks $c.callbackAllowAnyNetwork) }}
{{- fail "config.callbackAllowedNetworks is required: the comma-separated CIDRs your webhook receivers live in, e.g. --set config.callbackAllowedNetworks=10.20.30.0/24. Callbacks and test events reach only those. To let them reach every network but the special-purpose ones (every Service and Pod of the cluster included), set config.callbackAllowAnyNetwork=true instead" }}
{{- end }}
{{- end }}

{{/*
Checkov exemptions that hold for every relay pod; each reason is listed in docs/kubernetes.md.
Checkov splits annotation values on "=", so no reason may contain one.
*/}}
{{- define "chamelaion-relay.checkovSkips" -}}
checkov.io/skip1: "CKV_K8S_35=The relay reads its credentials from environment variables at start-up (the process contract); secrets as files would need support in the app"
{{- if not .Values.image.digest }}
checkov.io/skip2: "CKV_K8S_43=No digest is known for a chart default; set image.digest per release (values-production.yaml does)"
checkov.io/skip3: "CKV_K8S_15=IfNotPresent on a tag is only the default before image.digest is set; with a digest the image is immutable"
{{- end }}
{{- end }}

{{/*
topologySpreadConstraints of one component; a constraint without a labelSelector gets the
component's selector labels: (dict "ctx" $ "component" "api" "constraints" list).
*/}}
{{- define "chamelaion-relay.topologySpread" -}}
{{- $selector := include "chamelaion-relay.componentSelectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml }}
{{- range .constraints }}
{{- $tsc := deepCopy . }}
{{- if not (hasKey $tsc "labelSelector") }}
{{- $_ := set $tsc "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
{{ list $tsc | toYaml }}
{{- end }}
{{- end }}

{{/*
Where the callers file's Secret is mounted in the API and worker pods.
*/}}
{{- define "chamelaion-relay.callersDir" -}}
/etc/relay/callers
{{- end }}
