{{/*
Expand the name of the chart.
*/}}
{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "rlhf.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "rlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels (root context).
*/}}
{{- define "rlhf.labels" -}}
helm.sh/chart: {{ include "rlhf.chart" . }}
{{ include "rlhf.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-mesh
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (root context).
*/}}
{{- define "rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
A component's labels and selector labels. Context: dict "root" $ "name" COMPONENT.
*/}}
{{- define "rlhf.componentLabels" -}}
{{ include "rlhf.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "rlhf.componentSelectorLabels" -}}
{{ include "rlhf.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/*
A component's object name: <fullname>-<component>.
*/}}
{{- define "rlhf.componentName" -}}
{{- printf "%s-%s" (include "rlhf.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The ServiceAccount of the model services and training Jobs (root context).
*/}}
{{- define "rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The controller's ServiceAccount (root context).
*/}}
{{- define "rlhf.controllerServiceAccountName" -}}
{{- $sa := .Values.controller.serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-controller" (include "rlhf.fullname" .)) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/*
The image of a component: its own image block over the global one.
Context: dict "root" $ "c" COMPONENT_VALUES.
*/}}
{{- define "rlhf.image" -}}
{{- $img := merge (deepCopy (default dict .c.image)) .root.Values.image }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) }}
{{- end }}

{{- define "rlhf.imagePullPolicy" -}}
{{- $img := merge (deepCopy (default dict .c.image)) .root.Values.image }}
{{- $img.pullPolicy }}
{{- end }}

{{/*
The model services this chart can run, in port order.
*/}}
{{- define "rlhf.modelServices" -}}
policy reference reward value
{{- end }}

{{/*
Where a component's weights are inside its pod, from model.source.
Context: dict "root" $ "name" COMPONENT "c" COMPONENT_VALUES.
*/}}
{{- define "rlhf.modelPath" -}}
{{- $src := .c.model.source }}
{{- if hasPrefix "hf://" $src }}
{{- trimPrefix "hf://" $src }}
{{- else if hasPrefix "pvc://" $src }}
{{- $parts := append (regexSplit "/" (trimPrefix "pvc://" $src) 2) "" }}
{{- printf "/models/%s" (index $parts 1 | trimSuffix "/") | trimSuffix "/" }}
{{- else if hasPrefix "checkpoints://" $src }}
{{- printf "%s/%s" .root.Values.checkpoints.mountPath (trimPrefix "checkpoints://" $src | trimSuffix "/") | trimSuffix "/" }}
{{- else if or (hasPrefix "https://" $src) (hasPrefix "http://" $src) }}
{{- print "/models/model" }}
{{- else }}
{{- $src }}
{{- end }}
{{- end }}

{{/*
The training Job (sft or rewardModel) whose output a checkpoints:// source
names, or "" when none of the enabled Jobs writes it.
*/}}
{{- define "rlhf.producingJob" -}}
{{- $src := .c.model.source }}
{{- if hasPrefix "checkpoints://" $src }}
{{- $dir := trimPrefix "checkpoints://" $src | trimSuffix "/" }}
{{- range $job := list "sft" "rewardModel" }}
{{- $j := index $.root.Values.training $job }}
{{- if and $j.enabled (eq (trimSuffix "/" $j.outputDir) $dir) }}
{{- $job }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The YAML file a model service reads (services/config.py ServiceConfig):
the chart's defaults, then the user's `config`, then what the chart owns
(role, model.path, ports).
*/}}
{{- define "rlhf.serviceConfig" -}}
{{- $server := merge (dict "host" "0.0.0.0") (include "rlhf.serverSecurity" . | fromYaml) }}
{{- $base := dict "server" $server }}
{{- if has .name (list "policy" "value") }}
{{- $_ := set $base.server "checkpoint_dir" (printf "%s/%s" .root.Values.checkpoints.mountPath .name) }}
{{- /* a restarted pod comes back at the run's last saved state (the controller restores it anyway) */}}
{{- $_ := set $base "training" (dict "restore_from" (printf "runs/%s" (include "rlhf.runId" .root))) }}
{{- end }}
{{- $owned := dict "role" .name "model" (dict "path" (include "rlhf.modelPath" .)) "server" (dict "port" .c.ports.grpc "metrics_port" .c.ports.metrics) }}
{{- $cfg := mergeOverwrite $base (deepCopy (default dict .c.config)) $owned }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The run id: the controller's config.run_id, or the release's full name. It is
fixed for the release, so a restarted controller Job resumes its own run.
*/}}
{{- define "rlhf.runId" -}}
{{- default (include "rlhf.fullname" .) (default dict .Values.controller.config).run_id }}
{{- end }}

{{/*
The controller's YAML file (controller/config.py ControllerConfig). A run
resumes from its last complete checkpoint when the Job's pod is retried.
*/}}
{{- define "rlhf.controllerConfig" -}}
{{- $root := . }}
{{- $services := dict }}
{{- range $name := splitList " " (include "rlhf.modelServices" .) }}
{{- $c := index $root.Values $name }}
{{- $headless := printf "%s-headless" (include "rlhf.componentName" (dict "root" $root "name" $name)) }}
{{- if eq $root.Values.controller.discovery "dns" }}
{{- $_ := set $services $name (printf "dns:///%s:%d" $headless (int $c.ports.grpc)) }}
{{- else }}
{{- $_ := set $services $name (printf "kubernetes:///%s:grpc" $headless) }}
{{- end }}
{{- end }}
{{- $services = merge $services (include "rlhf.clientSecurity" . | fromYaml) }}
{{- $server := merge (dict "host" "0.0.0.0") (include "rlhf.serverSecurity" (dict "root" . "name" "controller") | fromYaml) }}
{{- $base := dict "services" $services "server" $server "output_dir" (printf "%s/runs" .Values.checkpoints.mountPath) "run_id" (include "rlhf.runId" .) "checkpoint" (dict "resume" "auto") }}
{{- $c := .Values.controller }}
{{- $owned := dict "server" (dict "port" $c.ports.grpc "metrics_port" $c.ports.metrics) }}
{{- $cfg := mergeOverwrite $base (deepCopy (default dict $c.config)) $owned }}
{{- toYaml $cfg }}
{{- end }}

{{/*
A component's probes: the global `probes` with its own over them.
*/}}
{{- define "rlhf.probes" -}}
{{- $p := mergeOverwrite (deepCopy .root.Values.probes) (deepCopy (default dict .c.probes)) }}
{{- $port := int .c.ports.grpc }}
{{- range $probe := list "startup" "readiness" "liveness" }}
{{ $probe }}Probe:
  {{- if $.root.Values.tls.enabled }}
  {{- /* kubelet's gRPC probes speak only plain text (before Kubernetes 1.37) */}}
  exec:
    command:
      {{- $args := list "python" "/etc/rlhf/health_check.py" (printf "127.0.0.1:%d" $port) (toString (default 1 (index $p $probe).timeoutSeconds)) }}
      {{- concat $args (include "rlhf.tlsClientArgs" $.root | fromYamlArray) | toYaml | nindent 6 }}
  {{- else }}
  grpc:
    port: {{ $port }}
  {{- end }}
  {{- toYaml (index $p $probe) | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Environment of every rlhf container: writable caches under the emptyDirs,
the Hugging Face token and the pod's identity.
*/}}
{{- define "rlhf.env" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /cache/huggingface
- name: TORCH_EXTENSIONS_DIR
  value: /tmp/torch_extensions
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: PYTHONUNBUFFERED
  value: "1"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- if .root.Values.huggingface.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with .root.Values.huggingface.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.root.Values.huggingface.tokenSecretKey }}
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .root.Values.env }}
{{ toYaml . }}
{{- end }}
{{- with .c.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes every rlhf pod has: /tmp, the Hugging Face cache, /dev/shm and the
checkpoints volume. Context: dict "root" $ "c" VALUES ["checkpoints" false:
no checkpoints volume].
*/}}
{{- define "rlhf.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  {{- if .root.Values.huggingface.cacheClaim }}
  persistentVolumeClaim:
    claimName: {{ .root.Values.huggingface.cacheClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .root.Values.huggingface.cacheSizeLimit }}
  {{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .c.shmSize }}
{{- if or (not (hasKey . "checkpoints")) .checkpoints }}
- name: checkpoints
  {{- if .root.Values.checkpoints.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "rlhf.checkpointsClaim" .root }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
{{- with .c.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "rlhf.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
- name: dshm
  mountPath: /dev/shm
{{- if or (not (hasKey . "checkpoints")) .checkpoints }}
- name: checkpoints
  mountPath: {{ .root.Values.checkpoints.mountPath }}
{{- end }}
{{- with .c.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The checkpoints PersistentVolumeClaim's name (root context).
*/}}
{{- define "rlhf.checkpointsClaim" -}}
{{- default (printf "%s-checkpoints" (include "rlhf.fullname" .)) .Values.checkpoints.existingClaim }}
{{- end }}

{{/*
Scheduling and pod-level fields shared by every rlhf pod.
*/}}
{{- define "rlhf.podCommon" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The pod template of a model service (Deployment or StatefulSet).
Context: dict "root" $ "name" COMPONENT "c" VALUES "stateful" BOOL.
*/}}
{{- define "rlhf.modelPodTemplate" -}}
{{- $root := .root }}
{{- $src := .c.model.source }}
{{- /* policy and value save checkpoints; the others need the volume only to load from it. */}}
{{- $_ := set . "checkpoints" (or .stateful (hasPrefix "checkpoints://" $src)) }}
{{- $job := include "rlhf.producingJob" . }}
metadata:
  labels:
    {{- include "rlhf.componentLabels" . | nindent 4 }}
    {{- with .c.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "rlhf.serviceConfig" . | sha256sum }}
    {{- with .c.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "rlhf.serviceAccountName" $root }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ .c.terminationGracePeriodSeconds }}
  {{- include "rlhf.podCommon" . | trim | nindent 2 }}
  {{- if or $job (hasPrefix "http://" $src) (hasPrefix "https://" $src) }}
  initContainers:
    {{- if $job }}
    {{- include "rlhf.waitForJob" (dict "root" $root "c" .c "job" $job) | trim | nindent 4 }}
    {{- else }}
    # Fetch and unpack the model archive into the models emptyDir.
    - name: fetch-model
      image: {{ include "rlhf.image" . }}
      imagePullPolicy: {{ include "rlhf.imagePullPolicy" . }}
      command: ["python", "-c"]
      args:
        - {{ $root.Files.Get "files/scripts/fetch_model.py" | quote }}
        - {{ $src | quote }}
        - /models/model
      resources:
        requests:
          cpu: 500m
          memory: 512Mi
        limits:
          memory: 2Gi
      env:
        {{- include "rlhf.env" . | trim | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: /models
        - name: tmp
          mountPath: /tmp
    {{- end }}
  {{- end }}
  containers:
    - name: {{ .name }}
      image: {{ include "rlhf.image" . }}
      imagePullPolicy: {{ include "rlhf.imagePullPolicy" . }}
      args: ["serve", {{ .name | quote }}, "--config", "/etc/rlhf/{{ .name }}.yaml"]
      ports:
        - name: grpc
          containerPort: {{ .c.ports.grpc }}
          protocol: TCP
        - name: metrics
          containerPort: {{ .c.ports.metrics }}
          protocol: TCP
        {{- if .stateful }}
        - name: dist
          containerPort: {{ .c.distributedPort }}
          protocol: TCP
        {{- end }}
      env:
        {{- include "rlhf.env" . | trim | nindent 8 }}
        {{- if and .stateful (gt (int .c.replicaCount) 1) }}
        {{- $name := include "rlhf.componentName" . }}
        # One torch.distributed world per StatefulSet; rank = pod ordinal.
        - name: MASTER_ADDR
          value: {{ printf "%s-0.%s-headless" $name $name }}
        - name: MASTER_PORT
          value: {{ .c.distributedPort | quote }}
        - name: WORLD_SIZE
          value: {{ .c.replicaCount | quote }}
        - name: RANK
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        - name: LOCAL_RANK
          value: "0"
        {{- end }}
      {{- include "rlhf.probes" . | trim | nindent 6 }}
      resources:
        {{- toYaml .c.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/rlhf
          readOnly: true
        {{- with include "rlhf.securityVolumeMounts" . }}{{ . | trim | nindent 8 }}{{ end }}
        {{- include "rlhf.commonVolumeMounts" . | trim | nindent 8 }}
        {{- if hasPrefix "pvc://" $src }}
        - name: models
          mountPath: /models
          readOnly: true
        {{- else if or (hasPrefix "http://" $src) (hasPrefix "https://" $src) }}
        - name: models
          mountPath: /models
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "rlhf.componentName" . }}
    {{- with include "rlhf.securityVolumes" . }}{{ . | trim | nindent 4 }}{{ end }}
    {{- include "rlhf.commonVolumes" . | trim | nindent 4 }}
    {{- if hasPrefix "pvc://" $src }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ index (regexSplit "/" (trimPrefix "pvc://" $src) 2) 0 }}
        readOnly: true
    {{- else if or (hasPrefix "http://" $src) (hasPrefix "https://" $src) }}
    - name: models
      emptyDir: {}
    {{- end }}
{{- end }}

{{/*
An init container that waits for a training Job's completion marker.
Context: dict "root" $ "c" VALUES (for the image) "job" sft|rewardModel.
*/}}
{{- define "rlhf.waitForJob" -}}
{{- $j := index .root.Values.training .job }}
{{- $dir := printf "%s/%s" .root.Values.checkpoints.mountPath (trimSuffix "/" $j.outputDir) }}
# Wait for the {{ .job }} Job to write {{ $dir }}/.rlhf-complete.
- name: wait-for-{{ .job | kebabcase }}
  image: {{ include "rlhf.image" . }}
  imagePullPolicy: {{ include "rlhf.imagePullPolicy" . }}
  command: ["/bin/sh", "-c"]
  args:
    - until [ -f "$0/.rlhf-complete" ]; do echo "waiting for $0/.rlhf-complete"; sleep 15; done
    - {{ $dir }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: checkpoints
      mountPath: {{ .root.Values.checkpoints.mountPath }}
      readOnly: true
{{- end }}

{{/*
--- Who may call the services: TLS, bearer tokens (docs/kubernetes.md "Security").
*/}}

{{/*
The Secret of the bearer tokens: auth.existingSecret or <fullname>-auth (root context).
*/}}
{{- define "rlhf.authSecretName" -}}
{{- default (printf "%s-auth" (include "rlhf.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/*
The kubernetes.io/tls Secret every pod mounts: tls.secretName, or with
cert-manager <fullname>-tls (root context).
*/}}
{{- define "rlhf.tlsSecretName" -}}
{{- $t := .Values.tls }}
{{- if $t.secretName }}
{{- $t.secretName }}
{{- else if $t.certManager.enabled }}
{{- printf "%s-tls" (include "rlhf.fullname" .) }}
{{- else }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with ca.crt) or tls.certManager.enabled" }}
{{- end }}
{{- end }}

{{/*
The name the chart's own TLS clients (controller, probes, helm test) check the
servers' certificate against: <fullname>.<namespace>.svc. The controller dials
the pod addresses that discovery finds, not a Service name, and every server
of the release presents the same certificate, so one name serves them all.
*/}}
{{- define "rlhf.tlsServerName" -}}
{{- printf "%s.%s.svc" (include "rlhf.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
The tokens a component's server accepts: every model service the
controller's, the reward service also the clients', the controller the
admin's. Context: dict "root" $ "name" COMPONENT.
*/}}
{{- define "rlhf.acceptedTokens" -}}
{{- if eq .name "controller" }}admin
{{- else if eq .name "reward" }}controller client
{{- else if has .name (splitList " " (include "rlhf.modelServices" .root)) }}controller
{{- end }}
{{- end }}

{{/*
The token files a component's pod gets at /etc/rlhf/auth/<file>: those it
accepts, and for the controller the one it sends.
*/}}
{{- define "rlhf.authFiles" -}}
{{- include "rlhf.acceptedTokens" . }}{{ if eq .name "controller" }} controller{{ end }}
{{- end }}

{{/*
`server:` fields of a process's YAML: TLS and the tokens it accepts, with their
scopes (services/auth.py). Context: dict "root" $ "name" COMPONENT.
*/}}
{{- define "rlhf.serverSecurity" -}}
{{- $v := .root.Values }}
{{- if $v.tls.enabled }}
tls:
  cert_file: /etc/rlhf/tls/tls.crt
  key_file: /etc/rlhf/tls/tls.key
  {{- if $v.tls.mutual }}
  client_ca_file: /etc/rlhf/tls/ca.crt
  {{- end }}
{{- end }}
{{- if $v.auth.enabled }}
{{- $scopes := dict "controller" (list "score" "infer" "train") "client" (list "score") "admin" (list "admin") }}
{{- $holders := dict "controller" "controller" "client" "clients" "admin" "admin" }}
auth:
  tokens:
    {{- range $file := splitList " " (include "rlhf.acceptedTokens" .) }}
    - name: {{ index $holders $file }}
      scopes: {{ index $scopes $file | toJson }}
      file: /etc/rlhf/auth/{{ $file }}
    {{- end }}
{{- end }}
{{- end }}

{{/*
`services:` fields of the controller's YAML: how it reaches the model
services (TLS, its token). Root context.
*/}}
{{- define "rlhf.clientSecurity" -}}
{{- if .Values.tls.enabled }}
tls:
  ca_file: /etc/rlhf/tls/ca.crt
  server_name: {{ include "rlhf.tlsServerName" . }}
  {{- if .Values.tls.mutual }}
  cert_file: /etc/rlhf/tls/tls.crt
  key_file: /etc/rlhf/tls/tls.key
  {{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
token_file: /etc/rlhf/auth/controller
{{- end }}
{{- end }}

{{/*
health_check.py's TLS arguments, as a YAML list (root context).
*/}}
{{- define "rlhf.tlsClientArgs" -}}
{{- $args := list "--ca" "/etc/rlhf/tls/ca.crt" "--server-name" (include "rlhf.tlsServerName" .) }}
{{- if .Values.tls.mutual }}
{{- $args = concat $args (list "--cert" "/etc/rlhf/tls/tls.crt" "--key" "/etc/rlhf/tls/tls.key") }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
The TLS and token Secrets a pod mounts, read-only and readable by the pod's
group only (fsGroup). Context: dict "root" $ "name" COMPONENT.
*/}}
{{- define "rlhf.securityVolumes" -}}
{{- $v := .root.Values }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "rlhf.tlsSecretName" .root }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- $files := include "rlhf.authFiles" . }}
{{- if and $v.auth.enabled $files }}
- name: auth
  secret:
    secretName: {{ include "rlhf.authSecretName" .root }}
    defaultMode: 0440
    items:
      {{- range $file := splitList " " $files }}
      - key: {{ index $v.auth.keys $file }}
        path: {{ $file }}
      {{- end }}
{{- end }}
{{- end }}

{{- define "rlhf.securityVolumeMounts" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  mountPath: /etc/rlhf/tls
  readOnly: true
{{- end }}
{{- if and .root.Values.auth.enabled (include "rlhf.authFiles" .) }}
- name: auth
  mountPath: /etc/rlhf/auth
  readOnly: true
{{- end }}
{{- end }}

{{/*
With TLS on, the probe script in each process's ConfigMap (root context).
*/}}
{{- define "rlhf.probeScript" -}}
{{- if .Values.tls.enabled }}
health_check.py: |
  {{- .Files.Get "files/scripts/health_check.py" | nindent 2 }}
{{- end }}
{{- end }}
