{{/* The worker pod template, shared by the Deployment and the Indexed Job. Called with
(dict "root" $ "resources" <merged resources> "restartPolicy" <Always|OnFailure>, and for the
Indexed Job "exitWhenIdle" <seconds>). */}}
{{- define "defuse.worker.podTemplate" -}}
metadata:
  labels:
    {{- include "defuse.selectorLabels" .root | nindent 4 }}
    app.kubernetes.io/component: worker
    {{- with .root.Values.worker.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
    checksum/secret: {{ include (print .root.Template.BasePath "/secret.yaml") .root | sha256sum }}
    {{- if .root.Values.metrics.scrapeAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ .root.Values.worker.metricsPort | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with .root.Values.worker.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  restartPolicy: {{ .restartPolicy }}
  serviceAccountName: {{ include "defuse.serviceAccountName" .root }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ int64 .root.Values.worker.terminationGracePeriodSeconds }}
  {{- with .root.Values.worker.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- with .root.Values.worker.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: worker
      image: {{ include "defuse.worker.image" .root }}
      imagePullPolicy: {{ .root.Values.image.pullPolicy }}
      args:
        - worker
        - --device={{ .root.Values.worker.device }}
        - --cache-dir={{ .root.Values.worker.cacheDir }}
        - --threads={{ int64 .root.Values.worker.threads }}
        - --metrics-listen=0.0.0.0:{{ .root.Values.worker.metricsPort }}
        {{- with .exitWhenIdle }}
        - --exit-when-idle={{ . }}
        {{- end }}
        {{- range .root.Values.worker.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "defuse.fullname" .root }}
      {{- $env := include "defuse.commonEnv" .root | trim }}
      {{- if or $env .root.Values.worker.extraEnv }}
      env:
        {{- with $env }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with .root.Values.worker.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        - name: metrics
          containerPort: {{ .root.Values.worker.metricsPort }}
          protocol: TCP
      {{- with .root.Values.worker.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- toYaml .root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ .root.Values.worker.cacheDir }}
        - name: tmp
          mountPath: /tmp
        {{- with include "defuse.dataMount" .root | trim }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    - name: cache
      emptyDir:
        sizeLimit: {{ .root.Values.worker.cacheSizeLimit }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- with include "defuse.dataVolume" .root | trim }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- with .root.Values.worker.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .root.Values.worker.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .root.Values.worker.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
