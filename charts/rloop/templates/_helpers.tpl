{{- define "rloop.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rloop.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-operator" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "rloop.labels" -}}
{{ include "rloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: rloop
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "rloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rloop.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rloop.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "rloop.stageImage" -}}
{{- printf "%s:%s" .Values.stageImage.repository (default .Chart.AppVersion .Values.stageImage.tag) -}}
{{- end -}}

{{/* The namespace whose RLoopRuns the operator serves, or "" for all. */}}
{{- define "rloop.watchNamespace" -}}
{{- .Values.watchNamespace -}}
{{- end -}}

{{/* The leader-election Lease (in the release namespace): one per release. */}}
{{- define "rloop.leaseName" -}}
{{- include "rloop.fullname" . -}}
{{- end -}}
