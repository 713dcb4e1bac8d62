{{/* Labels on every object of the release. */}}
{{- define "order-operator.labels" -}}
app.kubernetes.io/name: order-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: orderpipeline
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator's image. */}}
{{- define "order-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
The watched namespaces, comma separated ("" = every namespace): watchNamespace
is one name, a comma-separated list, or a list.
*/}}
{{- define "order-operator.watchNamespaces" -}}
{{- $ns := .Values.watchNamespace -}}
{{- if kindIs "string" $ns }}{{ $ns = splitList "," $ns }}{{ end -}}
{{- $out := list -}}
{{- range $ns }}{{ $t := trim . }}{{ if $t }}{{ $out = append $out $t }}{{ end }}{{ end -}}
{{- join "," (uniq $out) -}}
{{- end }}
