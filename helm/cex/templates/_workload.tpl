{{/*
One Deployment for a service (or for one match group).
dict "root" . "name" service "svc" its values "workload" resource suffix
     "group" match group name (or "") "markets" list
*/}}
{{- define "cex.deployment" -}}
{{- $root := .root -}}
{{- $svc := .svc -}}
{{- $cfg := mergeOverwrite (deepCopy $root.Values.defaults) (omit (deepCopy $svc) "api" "authorization" "groups" "env" "needs") -}}
{{- $sel := dict "root" $root "component" .name "group" .group -}}
{{- $isMatch := eq .name "match" -}}
{{- $secret := $root.Values.infrastructure -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "cex.svcName" (dict "root" $root "name" .workload) }}
  labels:
    {{- include "cex.labels" $sel | nindent 4 }}
spec:
  {{- if $isMatch }}
  # One writer (it holds the group's lease) and its standbys, which follow the
  # journal and are ready only once they take over (ADR 0013). Without a standby
  # a rollout replaces the writer (never surges it); with one, pods go one at a
  # time and a standby takes over from the writer that goes.
  replicas: {{ add 1 ($svc.standbys | default 0) }}
  strategy:
    {{- if $svc.standbys }}
    type: RollingUpdate
    rollingUpdate: { maxSurge: 0, maxUnavailable: 1 }
    {{- else }}
    type: Recreate
    {{- end }}
  {{- else if not $cfg.autoscaling.enabled }}
  replicas: {{ $cfg.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "cex.selectorLabels" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "cex.selectorLabels" $sel | nindent 8 }}
        # What the RequestAuthentication selects (every service; not the edge).
        app.kubernetes.io/part-of: cex
        {{- if $root.Values.istio.enabled }}
        sidecar.istio.io/inject: "true"
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- if $root.Values.istio.enabled }}
        # The app's first mesh call (its service token from auth) waits for the sidecar.
        proxy.istio.io/config: '{"holdApplicationUntilProxyStarts": true}'
        {{- end }}
        {{- with $cfg.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "cex.svcName" (dict "root" $root "name" .name) }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $cfg.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        seccompProfile:
          type: RuntimeDefault
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: {{ $cfg.topologySpread.zoneKey }}
          whenUnsatisfiable: {{ $cfg.topologySpread.whenUnsatisfiable }}
          labelSelector:
            matchLabels:
              {{- include "cex.selectorLabels" $sel | nindent 14 }}
          matchLabelKeys: [pod-template-hash]
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: {{ $cfg.topologySpread.whenUnsatisfiable }}
          labelSelector:
            matchLabels:
              {{- include "cex.selectorLabels" $sel | nindent 14 }}
          matchLabelKeys: [pod-template-hash]
      {{- with $cfg.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $cfg.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $cfg.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "cex.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", "services.{{ .name }}.main"]
          ports:
            - name: grpc
              containerPort: {{ $root.Values.ports.grpc }}
              protocol: TCP
            - name: http-metrics
              containerPort: {{ $root.Values.ports.metrics }}
              protocol: TCP
            {{- if eq .name "auth" }}
            - name: http-jwks
              containerPort: {{ $root.Values.ports.jwks }}
              protocol: TCP
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "cex.svcName" (dict "root" $root "name" "config") }}
          env:
            - name: OTEL_SERVICE_NAME
              value: {{ .name | quote }}
            {{- if has "database" $svc.needs }}
            - name: DATABASE_URL
              valueFrom:
                secretKeyRef: { name: {{ $secret.existingSecret | quote }}, key: {{ $secret.databaseUrlKey | quote }} }
            {{- end }}
            {{- if has "nats" $svc.needs }}
            - name: NATS_URL
              valueFrom:
                secretKeyRef: { name: {{ $secret.existingSecret | quote }}, key: {{ $secret.natsUrlKey | quote }} }
            {{- end }}
            {{- if has "redis" $svc.needs }}
            - name: REDIS_URL
              valueFrom:
                secretKeyRef: { name: {{ $secret.existingSecret | quote }}, key: {{ $secret.redisUrlKey | quote }} }
            {{- end }}
            - name: CEX_SERVICE_SECRET
              valueFrom:
                secretKeyRef: { name: {{ $secret.existingSecret | quote }}, key: {{ $secret.serviceSecretKey | quote }} }
            {{- if eq .name "auth" }}
            - name: CEX_JWKS_PORT
              value: {{ $root.Values.ports.jwks | quote }}
            {{- end }}
            {{- if eq .name "order" }}
            # One match-event consumer per pod, named for it (so every pod's sessions
            # get every report), and the pod name as the owner of its sessions' lease.
            - name: ORDER_REPLICA
              valueFrom:
                fieldRef: { fieldPath: metadata.name }
            - name: ORDER_CONSUMER_NAME
              value: "order-state-$(ORDER_REPLICA)"
            # A pod gone for good (every rollout names new ones) leaves no consumer behind.
            - name: ORDER_CONSUMER_INACTIVE_S
              value: "3600"
            {{- end }}
            {{- if $isMatch }}
            - name: CEX_MATCH_GROUP
              value: {{ .group | quote }}
            - name: CEX_MATCH_MARKETS
              value: {{ join "," .markets | quote }}
            {{- end }}
            {{- range $k, $v := $svc.env }}
            - name: {{ $k }}
              value: {{ $v | quote }}
            {{- end }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $cfg.preStopSleepSeconds }}
          # Started and alive: the process answers (its overall health). Ready: it
          # serves its service (a writer's standby does not until it takes over).
          startupProbe:
            grpc: { port: {{ $root.Values.ports.grpc }} }
            {{- toYaml $cfg.probes.startup | nindent 12 }}
          readinessProbe:
            grpc:
              port: {{ $root.Values.ports.grpc }}
              {{- with (hasKey $svc "healthService" | ternary $svc.healthService $svc.grpcService) }}
              service: {{ . }}
              {{- end }}
            {{- toYaml $cfg.probes.readiness | nindent 12 }}
          livenessProbe:
            grpc: { port: {{ $root.Values.ports.grpc }} }
            {{- toYaml $cfg.probes.liveness | nindent 12 }}
          resources:
            {{- toYaml $cfg.resources | nindent 12 }}
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            privileged: false
            capabilities:
              drop: [ALL]
            seccompProfile:
              type: RuntimeDefault
          volumeMounts:
            - { name: tmp, mountPath: /tmp }
            - { name: state, mountPath: /var/lib/cex }
            {{- if $root.Values.markets }}
            - { name: markets, mountPath: /etc/cex, readOnly: true }
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: { sizeLimit: 64Mi }
        - name: state
          emptyDir: { sizeLimit: 256Mi }
        {{- if $root.Values.markets }}
        - name: markets
          configMap:
            name: {{ include "cex.svcName" (dict "root" $root "name" "markets") }}
            items:
              - { key: markets.yaml, path: markets.yaml }
        {{- end }}
{{- end -}}
