{{- define "npf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "npf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "npf.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "npf.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "npf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "npf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "npf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "npf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "npf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "npf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The cluster name in the ownership markers: required for a cloud provider. */}}
{{- define "npf.clusterName" -}}
{{- if .Values.clusterName -}}
{{- .Values.clusterName -}}
{{- else if eq .Values.provider "memory" -}}
{{- .Release.Name -}}
{{- else -}}
{{- fail (printf "clusterName is required with provider %s: it goes into the ownership marker of every rule" .Values.provider) -}}
{{- end -}}
{{- end -}}

{{- define "npf.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The config file the operator reads: clusterName first, then .Values.config. */}}
{{- define "npf.config" -}}
clusterName: {{ include "npf.clusterName" . | quote }}
{{- if .Values.config }}
{{ toYaml .Values.config }}
{{- end }}
{{- end -}}

{{/* PromQL label matchers that pick this release's series (alerts): by default what the
chart's ServiceMonitor scrapes. */}}
{{- define "npf.metricSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
{{- printf "job=%q,namespace=%q" (printf "%s-metrics" (include "npf.fullname" .)) .Release.Namespace -}}
{{- end -}}
{{- end -}}
