{{/* Chart name, truncated to the 63 characters Kubernetes allows in a label. */}}
{{- define "promptq.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; leaves room for the "-broker-headless" suffix. */}}
{{- define "promptq.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "promptq.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "promptq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "promptq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "promptq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "promptq.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The config as rendered into the ConfigMap: the user's config with broker.listen and
     broker.spool_dir set to what the pods expose and mount. */}}
{{- define "promptq.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $broker := dict -}}
{{- if hasKey $cfg "broker" -}}
{{- $broker = get $cfg "broker" | default dict -}}
{{- end -}}
{{- $_ := set $broker "listen" (printf "0.0.0.0:%d" (int .Values.broker.port)) -}}
{{- $_ := set $broker "spool_dir" "/var/lib/promptq/spool" -}}
{{- $_ := set $cfg "broker" $broker -}}
{{- if not (get $cfg "providers") -}}
{{- fail "config.providers is required" -}}
{{- end -}}
{{- if not (get $cfg "routes") -}}
{{- fail "config.routes is required" -}}
{{- end -}}
{{- toPrettyJson $cfg -}}
{{- end -}}

{{/* Environment shared by broker and worker pods. */}}
{{- define "promptq.env" -}}
- name: PROMPTQ_CONFIG
  value: /etc/promptq/config.json
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
