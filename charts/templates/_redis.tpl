{{/* Redis: names, URLs, credentials, the ACL and the galaxies' Redis settings. */}}
{{- define "protogalaxy.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s-redis" (include "protogalaxy.fullname" .) }}
{{- else }}
{{- default (printf "%s-external-redis" (include "protogalaxy.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{/* "true" when the galaxies authenticate to Redis with a password ("" if not). */}}
{{- define "protogalaxy.redisHasPassword" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.password .Values.externalRedis.existingSecret }}true{{ end }}
{{- end }}

{{/* The external Redis's CA is mounted into galaxy pods (TLS with tlsCaSecret). */}}
{{- define "protogalaxy.redisCaMounted" -}}
{{- $x := .Values.externalRedis }}
{{- if and (not .Values.redis.enabled) $x.tls $x.tlsCaSecret }}true{{ end }}
{{- end }}

{{- define "protogalaxy.redisCaDir" -}}
/etc/protogalaxy-redis-ca
{{- end }}

{{/*
The Redis URL of galaxy .galaxy: the user, never the password (the galaxy reads
that from the file PG_REDIS_PASSWORD_FILE names, a mounted Secret, and sends it
as is, so it need not be URL-safe). Without a password (Memorystore's default)
nothing is mounted.
*/}}
{{- define "protogalaxy.redisUrl" -}}
{{- $v := .root.Values }}
{{- if $v.redis.enabled }}
{{- $user := ternary (printf "galaxy-%d" (int .galaxy)) "default" $v.redis.perGalaxyUsers }}
{{- printf "redis://%s@%s:6379/0" $user (include "protogalaxy.redisName" .root) }}
{{- else }}
{{- $x := $v.externalRedis }}
{{- $scheme := ternary "rediss" "redis" $x.tls }}
{{- $auth := "" }}
{{- if $x.username }}
{{- $auth = printf "%s@" $x.username }}
{{- end }}
{{- printf "%s://%s%s:%d/%d" $scheme $auth $x.host (int $x.port) (int $x.db) }}
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

{{- define "protogalaxy.redisPasswordDir" -}}
/etc/protogalaxy-redis
{{- end }}

{{/*
The Redis settings of galaxy .galaxy's container: its URL, the file with its own
password (none without one), the CA file with TLS.
*/}}
{{- define "protogalaxy.redisEnv" -}}
{{- if include "protogalaxy.redisHasPassword" .root }}
- name: PG_REDIS_PASSWORD_FILE
  value: {{ printf "%s/password" (include "protogalaxy.redisPasswordDir" .root) | quote }}
{{- end }}
- name: PG_REDIS_URL
  value: {{ include "protogalaxy.redisUrl" . | quote }}
{{- if include "protogalaxy.redisCaMounted" .root }}
- name: PG_REDIS_CA_FILE
  value: {{ printf "%s/ca.crt" (include "protogalaxy.redisCaDir" .root) | quote }}
{{- end }}
{{- end }}

{{/* Volume mounts of galaxy .galaxy's container for Redis: its password, the CA. */}}
{{- define "protogalaxy.redisVolumeMounts" -}}
{{- if include "protogalaxy.redisHasPassword" .root }}
- name: redis-password
  mountPath: {{ include "protogalaxy.redisPasswordDir" .root }}
  readOnly: true
{{- end }}
{{- if include "protogalaxy.redisCaMounted" .root }}
- name: redis-ca
  mountPath: {{ include "protogalaxy.redisCaDir" .root }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Volumes of galaxy .galaxy's pod for Redis: its own password (only its own key of
the Secret), the Secret holding the external Redis's CA.
*/}}
{{- define "protogalaxy.redisVolumes" -}}
{{- if include "protogalaxy.redisHasPassword" .root }}
- name: redis-password
  secret:
    secretName: {{ include "protogalaxy.redisSecretName" .root }}
    defaultMode: 0400
    items:
      - key: {{ include "protogalaxy.redisPasswordKey" . }}
        path: password
{{- end }}
{{- if include "protogalaxy.redisCaMounted" .root }}
- name: redis-ca
  secret:
    secretName: {{ .root.Values.externalRedis.tlsCaSecret }}
    items:
      - key: {{ .root.Values.externalRedis.tlsCaSecretKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{/*
The in-release Redis's passwords as JSON (key in the Secret -> password): the admin
(default user) and one per galaxy. The values already in the Secret are kept (one
lookup for all of them); missing ones are fresh random ones.
*/}}
{{- define "protogalaxy.redisPasswords" -}}
{{- $name := include "protogalaxy.redisSecretName" . }}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace $name).data | default dict }}
{{- $keys := list "redis-password" }}
{{- range $g := until (int .Values.galaxies.count) }}
{{- $keys = append $keys (printf "galaxy-%d-password" $g) }}
{{- end }}
{{- $out := dict }}
{{- range $key := $keys }}
{{- $pw := index $existing $key | default "" | b64dec }}
{{- $_ := set $out $key (default (randAlphaNum 32) $pw) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
The commands a galaxy's ACL user may run: exactly what services/redis_store.py and
redis-py send (scripts run with the same permissions, so their commands are
listed too). No SCAN, KEYS or RANDOMKEY (key names of other galaxies), no other
SCRIPT subcommand (FLUSH, KILL), no FUNCTION, CLIENT, CONFIG or admin command.
*/}}
{{- define "protogalaxy.redisGalaxyCommands" -}}
{{- $cmds := list
  "auth" "ping"
  "get" "set" "mget" "setrange" "append" "strlen" "incrby"
  "exists" "unlink" "rename"
  "hget" "hset" "hsetnx" "hexists" "hlen" "hkeys" "hgetall"
  "rpush" "lrange"
  "sadd" "srem" "smembers"
  "multi" "exec" "discard" "watch" "unwatch"
  "evalsha" "script|load" }}
{{- range $cmds }} +{{ . }}{{ end }}
{{- end }}

{{/*
The ACL file: the admin (default) user, and one user per galaxy that can touch
only its own keys (pg:galaxy:<g>:*) with only the commands above. Passwords are
stored as SHA-256 hashes, never in the clear.
*/}}
{{- define "protogalaxy.redisAcl" -}}
{{- $pw := .passwords }}
{{- printf "user default reset on #%s ~* &* +@all" (sha256sum (index $pw "redis-password")) }}
{{- $cmds := include "protogalaxy.redisGalaxyCommands" .root }}
{{- range $g := until (int .root.Values.galaxies.count) }}
{{- $key := printf "galaxy-%d-password" $g }}
{{ printf "user galaxy-%d reset on #%s ~pg:galaxy:%d:* -@all%s" $g (sha256sum (index $pw $key)) $g $cmds }}
{{- end }}
{{ end }}

{{/*
A Redis probe from values: Helm merges a user's probe into the default one, so a
handler the user sets (tcpSocket, httpGet, grpc) replaces the default exec.
*/}}
{{- define "protogalaxy.redisProbe" -}}
{{- $p := deepCopy . }}
{{- if or (hasKey $p "tcpSocket") (hasKey $p "httpGet") (hasKey $p "grpc") }}
{{- $_ := unset $p "exec" }}
{{- end }}
{{- toYaml $p }}
{{- end }}

{{/* A memory size in bytes: Kubernetes quantities (Ki..Ti, k..T) or Redis units
(kb..gb, k..g); "" when it cannot tell. .value, .redis (Redis units). */}}
{{- define "protogalaxy.bytes" -}}
{{- $s := toString .value }}
{{- $m := regexFind "^[0-9]+" $s }}
{{- $unit := trimPrefix $m $s }}
{{- $mult := dict }}
{{- if .redis }}
{{- $mult = dict "" 1 "b" 1 "k" 1000 "kb" 1024 "m" 1000000 "mb" 1048576 "g" 1000000000 "gb" 1073741824 }}
{{- $unit = lower $unit }}
{{- else }}
{{- $mult = dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- end }}
{{- if and $m (hasKey $mult $unit) }}
{{- mul (int64 $m) (index $mult $unit) }}
{{- end }}
{{- end }}

{{/* Fail on Redis settings that cannot work or are known to be unsafe. */}}
{{- define "protogalaxy.validateRedisValues" -}}
{{- $v := .Values }}
{{- $x := $v.externalRedis }}
{{- if $v.redis.enabled }}
{{- $tag := toString $v.redis.image.tag }}
{{- $ver := regexFind "^[0-9]+\\.[0-9]+\\.[0-9]+" $tag }}
{{- if $ver }}
{{- $p := splitList "." $ver }}
{{- $line := printf "%s.%s" (index $p 0) (index $p 1) }}
{{- /* The first release of each line with the fixes for CVE-2025-49844 and
       CVE-2025-46817/8/9 (and the older CVE-2025-21605, CVE-2024-46981). */}}
{{- $fixed := dict "7.2" 11 "7.4" 6 "8.0" 4 "8.2" 2 }}
{{- $major := int (index $p 0) }}
{{- $minor := int (index $p 1) }}
{{- $newer := or (gt $major 8) (and (eq $major 8) (gt $minor 2)) }}
{{- if not (or $newer (and (hasKey $fixed $line) (ge (int (index $p 2)) (int (index $fixed $line))))) }}
{{- fail (printf "redis.image.tag %s predates the fixes for CVE-2025-49844, CVE-2025-46817, CVE-2025-46818 and CVE-2025-46819 (Lua scripts, which galaxy users run): use 7.2.11, 7.4.6, 8.0.4, 8.2.2 or later in their lines" $tag) }}
{{- end }}
{{- end }}
{{- $max := include "protogalaxy.bytes" (dict "value" $v.redis.maxmemory "redis" true) }}
{{- $limit := "" }}
{{- with $v.redis.resources }}{{ with .limits }}{{ with .memory }}
{{- $limit = include "protogalaxy.bytes" (dict "value" .) }}
{{- end }}{{ end }}{{ end }}
{{- if and $max $limit (ge (int64 $max) (int64 $limit)) }}
{{- fail (printf "redis.maxmemory (%v) must be below redis.resources.limits.memory (%v): Redis needs room beyond its data for clients and the append-only file rewrite, or the kernel kills it instead of Redis refusing writes" $v.redis.maxmemory $v.redis.resources.limits.memory) }}
{{- end }}
{{- else }}
{{- if and $x.username (not (include "protogalaxy.redisHasPassword" .)) }}
{{- fail "externalRedis.username is set without a password or existingSecret: an ACL user needs its password" }}
{{- end }}
{{- if and $x.tlsCaSecret (not $x.tls) }}
{{- fail "externalRedis.tlsCaSecret is set but externalRedis.tls is false: the CA is only used over TLS" }}
{{- end }}
{{- end }}
{{- end }}
