{{/* Chart name, truncated to 63 characters. */}}
{{- define "protogalaxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, with the chart name unless it holds it. */}}
{{- define "protogalaxy.fullname" -}}
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

{{- define "protogalaxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "protogalaxy.labels" -}}
helm.sh/chart: {{ include "protogalaxy.chart" . }}
{{ include "protogalaxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: protogalaxy
{{- end }}

{{/* Selector labels: name and instance only (components add their own). */}}
{{- define "protogalaxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "protogalaxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Names of the per-component objects. */}}
{{- define "protogalaxy.galaxyName" -}}
{{- printf "%s-galaxy-%d" (include "protogalaxy.fullname" .root) (int .galaxy) }}
{{- end }}
{{- define "protogalaxy.globalName" -}}
{{- printf "%s-global" (include "protogalaxy.fullname" .) }}
{{- end }}
{{- define "protogalaxy.redisName" -}}
{{- printf "%s-redis" (include "protogalaxy.fullname" .) }}
{{- end }}
{{- define "protogalaxy.clientsName" -}}
{{- printf "%s-clients" (include "protogalaxy.fullname" .) }}
{{- end }}
{{- define "protogalaxy.authSecretName" -}}
{{- default (printf "%s-auth" (include "protogalaxy.fullname" .)) .Values.auth.existingSecret }}
{{- end }}
{{/* Every party's identity (made by the keygen hook; see services/keygen.py). */}}
{{- define "protogalaxy.keySecretName" -}}
{{- printf "%s-keys" (include "protogalaxy.fullname" .) }}
{{- end }}
{{- define "protogalaxy.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s-redis" (include "protogalaxy.fullname" .) }}
{{- else }}
{{- default (printf "%s-external-redis" (include "protogalaxy.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "protogalaxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* In-cluster URLs. */}}
{{- define "protogalaxy.globalUrl" -}}
{{- printf "http://%s:8000" (include "protogalaxy.globalName" .) }}
{{- end }}
{{- define "protogalaxy.galaxyUrlTemplate" -}}
{{- printf "http://%s-galaxy-{galaxy}:%d" (include "protogalaxy.fullname" .) (int .Values.galaxies.service.port) }}
{{- end }}

{{/*
The Redis URL of galaxy .galaxy; the password comes from $(PG_REDIS_PASSWORD), which
Kubernetes expands from the env var set just before it (a secretKeyRef).
*/}}
{{- define "protogalaxy.redisUrl" -}}
{{- $v := .root.Values }}
{{- if $v.redis.enabled }}
{{- $user := ternary (printf "galaxy-%d" (int .galaxy)) "default" $v.redis.perGalaxyUsers }}
{{- printf "redis://%s:$(PG_REDIS_PASSWORD)@%s:6379/0" $user (include "protogalaxy.redisName" .root) }}
{{- else }}
{{- $scheme := ternary "rediss" "redis" $v.externalRedis.tls }}
{{- printf "%s://%s:$(PG_REDIS_PASSWORD)@%s:%d/%d" $scheme $v.externalRedis.username $v.externalRedis.host (int $v.externalRedis.port) (int $v.externalRedis.db) }}
{{- end }}
{{- end }}

{{/* The key in the Redis Secret holding galaxy .galaxy's password. */}}
{{- define "protogalaxy.redisPasswordKey" -}}
{{- if .root.Values.redis.enabled }}
{{- ternary (printf "galaxy-%d-password" (int .galaxy)) "redis-password" .root.Values.redis.perGalaxyUsers }}
{{- else }}
{{- .root.Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{/*
A password that stays the same across upgrades: the value already in the Secret
when there is one (lookup), else a fresh random one.
*/}}
{{- define "protogalaxy.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $existing (index ($existing.data | default dict) .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum (int (default 32 .length)) }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by the aggregators and Redis. */}}
{{- define "protogalaxy.podPlacement" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Environment every ProtoGalaxy process gets, clients included: the run's config and
id, and the global aggregator's public key, which everyone pins. No credential.
*/}}
{{- define "protogalaxy.commonEnv" -}}
- name: PG_CONFIG
  value: /etc/protogalaxy/config.yaml
- name: PG_RUN_ID
  value: {{ include "protogalaxy.runId" . | quote }}
- name: PG_GLOBAL_PUBLIC_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "protogalaxy.keySecretName" . }}
      key: global.pub
- name: PG_MAX_UPDATE_BYTES
  value: {{ .Values.galaxies.maxUpdateBytes | int64 | quote }}
{{- end }}

{{/*
The bearer token between galaxies and the global aggregator: it guards transport
only (what a galaxy says is signed with its own key). Client pods never get it.
*/}}
{{- define "protogalaxy.serviceTokenEnv" -}}
- name: PG_SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "protogalaxy.authSecretName" . }}
      key: service-token
{{- end }}

{{/* The auditors' bearer token (aggregators only; clients never get it). */}}
{{- define "protogalaxy.auditorTokenEnv" -}}
- name: PG_AUDITOR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "protogalaxy.authSecretName" . }}
      key: auditor-token
{{- end }}

{{/* Fail on settings that cannot work, before anything is installed. */}}
{{- define "protogalaxy.validateValues" -}}
{{- $v := .Values }}
{{- $G := int $v.galaxies.count }}
{{- $N := int $v.clients.count }}
{{- if lt $G 1 }}
{{- fail "galaxies.count must be at least 1" }}
{{- end }}
{{- if lt $N $G }}
{{- fail (printf "clients.count (%d) is smaller than galaxies.count (%d): every galaxy needs clients" $N $G) }}
{{- end }}
{{- if and (not $v.redis.enabled) (not $v.externalRedis.host) }}
{{- fail "redis.enabled is false: set externalRedis.host (and its password or existingSecret)" }}
{{- end }}
{{- if and (not $v.redis.enabled) $v.externalRedis.password $v.externalRedis.existingSecret }}
{{- fail "externalRedis: set password or existingSecret, not both" }}
{{- end }}
{{- if gt (int $v.clients.perPod) $N }}
{{- fail (printf "clients.perPod (%d) exceeds clients.count (%d)" (int $v.clients.perPod) $N) }}
{{- end }}
{{- $agg := $v.defense.aggregator }}
{{- $layers := list }}
{{- range $v.defense.layers }}{{ $layers = append $layers (int .) }}{{ end }}
{{- if and (has $agg (list "multikrum" "krum")) (has 3 $layers) }}
{{- /* The same check as the config's: per galaxy, the Byzantine clients placed
       there (round(fraction * n)) must be within f = floor(beta * n), and
       Multi-Krum needs n >= 2f + 3. */}}
{{- range $g := until $G }}
{{- $n := div $N $G }}
{{- if lt $g (mod $N $G) }}{{- $n = add1 $n }}{{- end }}
{{- $b := int (round (mulf (float64 $v.clients.byzantine.fraction) (float64 $n)) 0) }}
{{- $f := int (floor (mulf (float64 $v.defense.byzantineFraction) (float64 $n))) }}
{{- if or (gt $b $f) (lt $n (add (mul 2 $f) 3)) }}
{{- fail (printf "clients.byzantine.fraction %v puts %d Byzantine clients in galaxy %d of %d clients, but %s tolerates f = %d there (defense.byzantineFraction %v; it needs at least %d clients)" $v.clients.byzantine.fraction $b $g $n $agg $f $v.defense.byzantineFraction (add (mul 2 (max $b $f)) 3)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The run: one per release revision unless run.id pins it. */}}
{{- define "protogalaxy.runId" -}}
{{- default (printf "r%d" (int .Release.Revision)) .Values.run.id }}
{{- end }}

{{/* A NetworkPolicy peer: pods of this release with the given component. */}}
{{- define "protogalaxy.peer" -}}
- podSelector:
    matchLabels:
      {{- include "protogalaxy.selectorLabels" .root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Egress to the cluster DNS. */}}
{{- define "protogalaxy.dnsEgress" -}}
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}
