{{/*
gRPC routes of the mesh address for every enabled service: streams with no
timeout, idempotent reads with retries, then the rest of the service's prefix
with its timeout and no retries (writes are not idempotent on the wire; clients
retry them with the same request id). The edge's calls take these routes too.
dict "root" .
*/}}
{{- define "cex.routes" -}}
{{- $root := .root -}}
{{- $ns := $root.Release.Namespace -}}
{{- $port := $root.Values.ports.grpc -}}
{{- $noRetries := dict "attempts" 0 -}}
{{- range $name, $svc := $root.Values.services }}
{{- if $svc.enabled }}
{{- $dest := include "cex.svcName" (dict "root" $root "name" $name) }}
{{- if eq $name "match" }}
{{- $dest = include "cex.svcName" (dict "root" $root "name" (printf "match-%s" (first $svc.groups).name)) }}
{{- end }}
{{- range $grpcService := prepend ($svc.alsoServes | default list) $svc.grpcService }}
{{- $slug := regexReplaceAll "[^a-z0-9]+" (lower $grpcService) "-" }}
{{- range $method := $svc.api.streams }}
- name: {{ printf "%s-%s" $slug $method | lower }}
  match:
    - uri: { exact: {{ printf "/%s/%s" $grpcService $method | quote }} }
  route:
    - destination:
        host: {{ printf "%s.%s.svc.cluster.local" $dest $ns }}
        port: { number: {{ $port }} }
  # A stream lives as long as the client keeps it.
  timeout: 0s
  retries: { attempts: 0 }
{{- end }}
{{- range $method := $svc.api.reads }}
- name: {{ printf "%s-%s" $slug $method | lower }}
  match:
    - uri: { exact: {{ printf "/%s/%s" $grpcService $method | quote }} }
  route:
    - destination:
        host: {{ printf "%s.%s.svc.cluster.local" $dest $ns }}
        port: { number: {{ $port }} }
  timeout: {{ $svc.timeout }}
  retries:
    attempts: {{ $root.Values.istio.readRetries.attempts }}
    perTryTimeout: {{ $root.Values.istio.readRetries.perTryTimeout }}
    retryOn: {{ $root.Values.istio.readRetries.retryOn | quote }}
{{- end }}
- name: {{ $slug }}
  match:
    - uri: { prefix: {{ printf "/%s/" $grpcService | quote }} }
  route:
    - destination:
        host: {{ printf "%s.%s.svc.cluster.local" $dest $ns }}
        port: { number: {{ $port }} }
  timeout: {{ $svc.timeout }}
  retries: { attempts: 0 }
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
