{{/* Chart name, truncated to 63 characters. */}}
{{- define "protogalaxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, with the chart name unless it holds
it. At most 40 characters: the longest name composed from it (a StatefulSet's
controller-revision-hash label, "<fullname>-global-" plus 10 characters; a
galaxy "<fullname>-galaxy-NNN") then stays within Kubernetes' 63.
*/}}
{{- define "protogalaxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
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
{{- define "protogalaxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The client pods' image: the CUDA build when they run on GPUs (only they do). */}}
{{- define "protogalaxy.clientImage" -}}
{{- $v := .Values }}
{{- if $v.clients.gpu.enabled }}
{{- $tag := default (printf "%s-cuda" (default .Chart.AppVersion $v.image.tag)) $v.clients.gpu.image.tag }}
{{- printf "%s:%s" (default $v.image.repository $v.clients.gpu.image.repository) $tag }}
{{- else }}
{{- include "protogalaxy.image" . }}
{{- end }}
{{- end }}

{{/* In-cluster URLs. */}}
{{- define "protogalaxy.globalUrl" -}}
{{- printf "http://%s:8000" (include "protogalaxy.globalName" .) }}
{{- end }}
{{- define "protogalaxy.galaxyUrlTemplate" -}}
{{- printf "http://%s-galaxy-{galaxy}:%d" (include "protogalaxy.fullname" .) (int .Values.galaxies.service.port) }}
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
PG_HOST and PG_PORT are set outright (service links are off as well).
*/}}
{{- define "protogalaxy.commonEnv" -}}
- name: PG_CONFIG
  value: /etc/protogalaxy/config.yaml
- name: PG_RUN_ID
  value: {{ include "protogalaxy.runId" . | quote }}
# Public, but read from the mounted key Secret like every credential: no
# Secret value is in any container's environment.
- name: PG_GLOBAL_PUBLIC_KEY_FILE
  value: /etc/protogalaxy-keys/global.pub
- name: PG_MAX_UPDATE_BYTES
  value: {{ .Values.galaxies.maxUpdateBytes | int64 | quote }}
- name: PG_HOST
  value: "0.0.0.0"
- name: PG_PORT
  value: "8000"
{{- end }}

{{/*
The bearer token between galaxies and the global aggregator: it guards transport
only (what a galaxy says is signed with its own key). Client pods never get it.
*/}}
{{- define "protogalaxy.serviceTokenEnv" -}}
- name: PG_SERVICE_TOKEN_FILE
  value: /etc/protogalaxy-auth/service-token
{{- end }}

{{/* The auditors' bearer token (aggregators only; clients never get it). */}}
{{- define "protogalaxy.auditorTokenEnv" -}}
- name: PG_AUDITOR_TOKEN_FILE
  value: /etc/protogalaxy-auth/auditor-token
{{- end }}
{{- define "protogalaxy.auditorTokenHashEnv" -}}
- name: PG_AUDITOR_TOKEN_SHA256_FILE
  value: /etc/protogalaxy-auth/auditor-token-sha256
{{- end }}

{{/*
The aggregators' tokens as files (clients never mount them): the global
aggregator gets the auditors' token, a galaxy (.galaxy true) only its SHA-256.
*/}}
{{- define "protogalaxy.authVolume" -}}
- name: auth
  secret:
    secretName: {{ include "protogalaxy.authSecretName" .root }}
    defaultMode: 0400
    items:
      - key: service-token
        path: service-token
      {{- if .galaxy }}
      - key: auditor-token-sha256
        path: auditor-token-sha256
      {{- else }}
      - key: auditor-token
        path: auditor-token
      {{- end }}
{{- end }}
{{- define "protogalaxy.authVolumeMount" -}}
- name: auth
  mountPath: /etc/protogalaxy-auth
  readOnly: true
{{- end }}

{{/*
The run's config.yaml (as a dict, in YAML): the chart's values mapped onto the
config keys, then run.extraConfig merged over them.
*/}}
{{- define "protogalaxy.runConfig" -}}
{{- $v := .Values }}
{{- $dataset := dict "name" $v.run.dataset }}
{{- with $v.run.datasetRoot }}{{ $_ := set $dataset "root" . }}{{ end }}
{{- $config := dict
  "seed" (int $v.run.seed)
  "dataset" $dataset
  "model" $v.run.model
  "clients" (dict "count" (int $v.clients.count) "partition" $v.run.partition)
  "galaxies" (dict "count" (int $v.galaxies.count))
  "byzantine" (dict "fraction" $v.clients.byzantine.fraction "attack" $v.clients.byzantine.attack)
  "training" (dict "rounds" (int $v.run.rounds))
  "defense" (dict "aggregator" $v.defense.aggregator "byzantine_fraction" $v.defense.byzantineFraction "layers" $v.defense.layers)
}}
{{- $config = mustMergeOverwrite $config (deepCopy $v.run.extraConfig) }}
{{- toYaml $config }}
{{- end }}

{{/*
Python's round(): half to even (Sprig's round goes half away from zero, which
would count 0.5 Byzantine clients as 1 where the app counts 0).
*/}}
{{- define "protogalaxy.roundHalfEven" -}}
{{- $x := float64 . }}
{{- $lo := floor $x }}
{{- $frac := subf $x $lo }}
{{- if gt $frac 0.5 }}{{ add1 (int $lo) }}
{{- else if lt $frac 0.5 }}{{ int $lo }}
{{- else if eq (mod (int $lo) 2) 0 }}{{ int $lo }}
{{- else }}{{ add1 (int $lo) }}
{{- end }}
{{- end }}

{{/*
Refuse at render time what the app would refuse when it starts: the schema
(generated from the app's config model, scripts/chart-config.py) checks each
value; this checks what spans values, on the config the pods will load. Kept
equal to the app's rules by tests/deploy/test_chart_config.py.
*/}}
{{- define "protogalaxy.validateValues" -}}
{{- include "protogalaxy.init" . }}
{{- $v := .Values }}
{{- $c := .Values._pg.config }}
{{- $G := int $c.galaxies.count }}
{{- $N := int $c.clients.count }}
{{- $layers := list }}
{{- range (dig "defense" "layers" (list 1 2 3 4 5) $c) }}{{ $layers = append $layers (int .) }}{{ end }}
{{- range $key, $value := include "protogalaxy.ownedConfigKeys" . | fromJson }}
{{- $node := $v.run.extraConfig }}
{{- range $part := splitList "." $key }}
{{- if and (kindIs "map" $node) (hasKey $node $part) }}{{ $node = index $node $part }}{{ else }}{{ $node = "<absent>" }}{{ end }}
{{- end }}
{{- if not (and (kindIs "string" $node) (eq $node "<absent>")) }}
{{- fail (printf "run.extraConfig sets %s: set %s instead (the chart's objects follow it)" $key $value) }}
{{- end }}
{{- end }}
{{- if lt $N $G }}
{{- fail (printf "clients.count (%d) is smaller than galaxies.count (%d): every galaxy needs clients" $N $G) }}
{{- end }}
{{- $ds := dig "dataset" "name" "mnist" $c }}
{{- if and (ne $ds "mnist") (not (dig "dataset" "root" "" $c)) }}
{{- fail (printf "dataset %s is not in the image: mount its files (extraVolumes, extraVolumeMounts) and set run.datasetRoot" $ds) }}
{{- end }}
{{- if eq $ds "cifar10" }}
{{- fail "dataset cifar10 needs torchvision, which the image does not carry" }}
{{- end }}
{{- $attacked := dig "galaxy_attack" "galaxy" nil $c }}
{{- if and (not (kindIs "invalid" $attacked)) (ge (int $attacked) $G) }}
{{- fail (printf "galaxy_attack.galaxy %d does not exist (galaxies.count %d)" (int $attacked) $G) }}
{{- end }}
{{- $rep := dig "defense" "reputation" dict $c }}
{{- $w := addf (dig "w_integrity" 0.1 $rep) (dig "w_statistics" 0.3 $rep) (dig "w_selected" 0.4 $rep) (dig "w_history" 0.2 $rep) }}
{{- if gt (maxf (subf $w 1.0) (subf 1.0 $w)) 1e-9 }}
{{- fail (printf "defense.reputation weights must sum to 1, got %v" $w) }}
{{- end }}
{{- if gt (float64 (dig "ban_below" 0.1 $rep)) (float64 (dig "quarantine_below" 0.3 $rep)) }}
{{- fail "defense.reputation.ban_below must not exceed quarantine_below" }}
{{- end }}
{{- if and (not $v.redis.enabled) (not $v.externalRedis.host) }}
{{- fail "redis.enabled is false: set externalRedis.host" }}
{{- end }}
{{- if and (not $v.redis.enabled) $v.externalRedis.password $v.externalRedis.existingSecret }}
{{- fail "externalRedis: set password or existingSecret, not both" }}
{{- end }}
{{- $model := dig "model" "mnist_cnn" $c }}
{{- $reveal := int64 (index (include "protogalaxy.revealBytes" . | fromJson) $model) }}
{{- if lt (int64 $v.galaxies.maxUpdateBytes) $reveal }}
{{- fail (printf "galaxies.maxUpdateBytes (%d) is below one update of %s (%d bytes): every reveal would be refused" (int64 $v.galaxies.maxUpdateBytes) $model $reveal) }}
{{- end }}
{{- if gt (int $v.clients.perPod) $N }}
{{- fail (printf "clients.perPod (%d) exceeds clients.count (%d)" (int $v.clients.perPod) $N) }}
{{- end }}
{{- $agg := dig "defense" "aggregator" "multikrum" $c }}
{{- $offsets := include "protogalaxy.aggregatorMinClients" . | fromJson }}
{{- if and (ne $agg "fedavg") (has 3 $layers) }}
{{- /* The config's feasibility check, per galaxy: its Byzantine clients
       (round half to even of fraction x n) within f = floor(beta x n), and
       at least min_clients(f) = a f + c clients. */}}
{{- $beta := float64 (dig "defense" "byzantine_fraction" 0.3 $c) }}
{{- $frac := float64 (dig "byzantine" "fraction" 0.3 $c) }}
{{- $seen := dict }}
{{- range $g := until $G }}
{{- $n := div $N $G }}
{{- if lt $g (mod $N $G) }}{{- $n = add1 $n }}{{- end }}
{{- if not (hasKey $seen (toString $n)) }}
{{- $_ := set $seen (toString $n) true }}
{{- $b := include "protogalaxy.roundHalfEven" (mulf $frac (float64 $n)) | int }}
{{- $f := int (floor (mulf $beta (float64 $n))) }}
{{- $coef := index $offsets $agg }}
{{- $a := int (index $coef 0) }}
{{- $off := int (index $coef 1) }}
{{- if or (gt $b $f) (lt $n (add (mul $a $f) $off)) }}
{{- fail (printf "byzantine.fraction %v puts %d Byzantine clients in galaxy %d of %d clients, but %s tolerates f = %d there (defense.byzantineFraction %v; it needs at least %d clients)" $frac $b $g $n $agg $f $beta (add (mul $a (max $b $f)) $off)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The run's identity, computed once per render into .Values._pg (a lookup and a
random draw must not differ between the objects of one render):

- family: run.id when set, else the one this release already has (the
  <fullname>-run ConfigMap, kept across upgrades, deleted by uninstall), else a
  new random one. A reinstall under the same name is therefore a new run, never
  a resumed one.
- id, what every party signs with: the previous id when the run's config.yaml
  is unchanged (an upgrade of log levels, deadlines, resources or the image
  continues the run); "<family>-<8 random characters>" when it changed (a new
  run, also when a config comes back: the galaxies deleted the old run's state
  when the next one started); "<family>-<first 8 hex of the config's SHA-256>"
  where there is no previous one (a first install, or `helm template`, which
  cannot look anything up).
*/}}
{{- define "protogalaxy.init" -}}
{{- if not (hasKey .Values "_pg") }}
{{- $config := include "protogalaxy.runConfig" . | fromYaml }}
{{- $yaml := toYaml $config }}
{{- $hash := sha256sum $yaml }}
{{- $prev := (lookup "v1" "ConfigMap" .Release.Namespace (printf "%s-run" (include "protogalaxy.fullname" .))).data | default dict }}
{{- $family := .Values.run.id | default (get $prev "family") | default (randAlphaNum 8 | lower) }}
{{- $id := printf "%s-%s" $family (trunc 8 $hash) }}
{{- if and $prev (eq (get $prev "family") $family) (eq (get $prev "configHash") $hash) (get $prev "id") }}
{{- $id = get $prev "id" }}
{{- else if $prev }}
{{- $id = printf "%s-%s" $family (randAlphaNum 8 | lower) }}
{{- end }}
{{- $_ := set .Values "_pg" (dict "config" $config "configYaml" $yaml "configHash" $hash "family" $family "runId" $id) }}
{{- end }}
{{- end }}

{{/* The run id every party signs with (see protogalaxy.init). */}}
{{- define "protogalaxy.runId" -}}
{{- include "protogalaxy.init" . }}
{{- .Values._pg.runId }}
{{- end }}

{{/* A NetworkPolicy peer: pods of this release with the given component. */}}
{{- define "protogalaxy.peer" -}}
- podSelector:
    matchLabels:
      {{- include "protogalaxy.selectorLabels" .root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Egress to the cluster DNS: networkPolicy.dns.peers (kube-dns pods, and the
link-local addresses of NodeLocal DNSCache and GKE's Cloud DNS by default).
*/}}
{{- define "protogalaxy.dnsEgress" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns.peers | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/*
Pod-level settings every ProtoGalaxy pod shares: no service links (a Service
named like a PG_* variable would inject one), no API token, a service account
with no cloud identity (the clients, Byzantine ones included, Redis, the test).
*/}}
{{- define "protogalaxy.podCommon" -}}
enableServiceLinks: false
automountServiceAccountToken: false
serviceAccountName: {{ include "protogalaxy.workloadServiceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* The same for the aggregators: the service account serviceAccount.* names,
     with its annotations (e.g. a Workload Identity) for them alone. */}}
{{- define "protogalaxy.aggregatorPodCommon" -}}
enableServiceLinks: false
automountServiceAccountToken: false
serviceAccountName: {{ include "protogalaxy.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{- define "protogalaxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "protogalaxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "protogalaxy.workloadServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-workload" (include "protogalaxy.fullname" .) }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/*
Threads for torch from a container's CPU request (.cpu: "250m", "2", 1.5):
rounded up, at least 1. torch would otherwise start one per host core.
*/}}
{{- define "protogalaxy.threads" -}}
{{- $cpu := toString (default "1" .) }}
{{- if hasSuffix "m" $cpu }}
{{- max 1 (div (add (atoi (trimSuffix "m" $cpu)) 999) 1000) }}
{{- else }}
{{- max 1 (ceil (float64 $cpu) | int) }}
{{- end }}
{{- end }}

{{/* The user's extra env entries and mounts, for every ProtoGalaxy container. */}}
{{- define "protogalaxy.extraEnv" -}}
{{- with .Values.extraEnv }}
{{- toYaml . }}
{{- end }}
{{- end }}
{{- define "protogalaxy.extraVolumeMounts" -}}
{{- with .Values.extraVolumeMounts }}
{{- toYaml . }}
{{- end }}
{{- end }}
{{- define "protogalaxy.extraVolumes" -}}
{{- with .Values.extraVolumes }}
{{- toYaml . }}
{{- end }}
{{- end }}
