{{/* Names and labels shared by the templates. */}}
{{- define "gantry-agent.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gantry-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gantry-agent.labels" -}}
{{ include "gantry-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gantry-agent.secretName" -}}
{{- .Values.enrollment.existingSecret | default (include "gantry-agent.fullname" .) -}}
{{- end -}}

{{/* enrollment.labels as `k=v k=v` for the image's GANTRY_LABELS. */}}
{{- define "gantry-agent.labelArgs" -}}
{{- $pairs := list -}}
{{- range $key, $value := .Values.enrollment.labels -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join " " $pairs -}}
{{- end -}}
