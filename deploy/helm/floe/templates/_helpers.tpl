{{/* Names and labels shared by every manifest. */}}

{{- define "floe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "floe.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "floe.labels" -}}
{{ include "floe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "floe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "floe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* etcd://HOST:PORT,HOST:PORT[/PREFIX], etcds:// with TLS */}}
{{- define "floe.metaUrl" -}}
{{- $scheme := ternary "etcds" "etcd" (and .Values.meta.etcd.tls .Values.meta.etcd.tls.enabled | default false) -}}
{{- $url := printf "%s://%s" $scheme (join "," .Values.meta.etcd.endpoints) -}}
{{- if .Values.meta.etcd.prefix -}}
{{- $url = printf "%s/%s" $url (trimPrefix "/" .Values.meta.etcd.prefix) -}}
{{- end -}}
{{- $url -}}
{{- end -}}
