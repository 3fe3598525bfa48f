{{/* Chart name, truncated to 63 chars. */}}
{{- define "cex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name (63 chars; the release name alone when it already holds the chart name). */}}
{{- define "cex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cex.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels; dict "root" . "component" name. */}}
{{- define "cex.labels" -}}
helm.sh/chart: {{ include "cex.chart" .root }}
{{ include "cex.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cex
{{- end -}}

{{/* Selector labels; dict "root" . "component" name [ "group" matchGroup ]. */}}
{{- define "cex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cex.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .group }}
cex.io/match-group: {{ . }}
{{- end }}
{{- end -}}

{{/* A service's resource name: dict "root" . "name" svc. */}}
{{- define "cex.svcName" -}}
{{- printf "%s-%s" (include "cex.fullname" .root | trunc 50 | trimSuffix "-") .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The in-mesh address every service calls others through (CEX_MESH_ADDR's host). */}}
{{- define "cex.meshHost" -}}
{{- include "cex.svcName" (dict "root" . "name" "mesh") -}}
{{- end -}}

{{/* SPIFFE-style principal of a caller name ("gateway" expands to the gateway's principals). */}}
{{- define "cex.principals" -}}
{{- $root := .root -}}
{{- range .callers }}
{{- if eq . "gateway" }}
{{- range $root.Values.istio.gateway.principals }}
- {{ . | quote }}
{{- end }}
{{- else }}
{{- if not (hasKey $root.Values.services .) }}
{{- fail (printf "authorization names an unknown caller %q" .) }}
{{- end }}
- {{ printf "%s/ns/%s/sa/%s" $root.Values.istio.trustDomain $root.Release.Namespace (include "cex.svcName" (dict "root" $root "name" .)) | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "cex.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
