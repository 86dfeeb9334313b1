{{/* The namespaces served: .Values.namespaces, or the release's own. */}}
{{- define "kt.namespaces" -}}
{{- toJson (.Values.namespaces | default (list .Release.Namespace)) -}}
{{- end -}}

{{- define "kt.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "kt.labels" -}}
app.kubernetes.io/name: kt
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What finds the gateway's pods: its Service, the network policy, and kt's drivers
     (kt.k8s.manifests.GATEWAY_SELECTOR) when they open a port-forward to it. */}}
{{- define "kt.gatewaySelector" -}}
app.kubernetes.io/name: kt
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "kt.gatewayName" -}}
{{- printf "%s-gateway" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
