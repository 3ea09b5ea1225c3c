{{/* The release's base name, at most 63 characters. */}}
{{- define "prozess.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "prozess.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: prozess
{{- end -}}

{{/* Selector labels of one component (api, a participant, migrate): pass (list $ "api"). */}}
{{- define "prozess.selectorLabels" -}}
app.kubernetes.io/name: {{ (index . 0).Chart.Name }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The chart's own Secret: the credentials given as values. */}}
{{- define "prozess.credentials" -}}
{{ include "prozess.fullname" . }}-credentials
{{- end -}}

{{/*
Where each credential comes from: (list SECRET KEY), the chart's Secret when
the value is given, else the existing Secret named in values.
*/}}
{{- define "prozess.databaseSecret" -}}
{{- if .Values.database.url -}}
{{ include "prozess.credentials" . }} database-url
{{- else -}}
{{ required "database.url or database.existingSecret is required" .Values.database.existingSecret }} {{ .Values.database.existingSecretKey }}
{{- end -}}
{{- end -}}

{{- define "prozess.kafkaSASLSecret" -}}
{{- if .Values.kafka.sasl.password -}}
{{ include "prozess.credentials" . }} kafka-sasl-password
{{- else -}}
{{ required "kafka.sasl.password or kafka.sasl.existingSecret is required with a SASL mechanism" .Values.kafka.sasl.existingSecret }} {{ .Values.kafka.sasl.existingSecretKey }}
{{- end -}}
{{- end -}}

{{- define "prozess.redisSecret" -}}
{{- if .Values.redis.password -}}
{{ include "prozess.credentials" . }} redis-password
{{- else -}}
{{ .Values.redis.existingSecret }} {{ .Values.redis.existingSecretKey }}
{{- end -}}
{{- end -}}

{{/* Whether Redis AUTH is configured (a password by value or by Secret). */}}
{{- define "prozess.redisAuth" -}}
{{- if or .Values.redis.password .Values.redis.existingSecret }}true{{ end -}}
{{- end -}}

{{- define "prozess.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
The connection settings every prozess container gets, as PROZESS_ variables
(each flag's fallback): the database URL from its Secret, Kafka, Redis, and
the password files mounted by prozess.volumeMounts.
*/}}
{{- define "prozess.env" -}}
{{- $db := include "prozess.databaseSecret" . | splitList " " }}
- name: PROZESS_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ index $db 0 }}
      key: {{ index $db 1 }}
- name: PROZESS_KAFKA_BROKERS
  value: {{ required "kafka.brokers is required" .Values.kafka.brokers | quote }}
- name: PROZESS_TOPIC
  value: {{ .Values.kafka.topic | quote }}
{{- if .Values.kafka.tls.enabled }}
- name: PROZESS_KAFKA_TLS
  value: "true"
{{- if .Values.kafka.tls.caSecret }}
- name: PROZESS_KAFKA_TLS_CA_FILE
  value: /etc/prozess/kafka-ca/ca.crt
{{- end }}
{{- end }}
{{- if .Values.kafka.sasl.mechanism }}
- name: PROZESS_KAFKA_SASL_MECHANISM
  value: {{ .Values.kafka.sasl.mechanism | quote }}
- name: PROZESS_KAFKA_SASL_USERNAME
  value: {{ required "kafka.sasl.username is required with a SASL mechanism" .Values.kafka.sasl.username | quote }}
- name: PROZESS_KAFKA_SASL_PASSWORD_FILE
  value: /etc/prozess/kafka-sasl/password
{{- end }}
- name: PROZESS_REDIS_ADDR
  value: {{ required "redis.addr is required" .Values.redis.addr | quote }}
- name: PROZESS_REDIS_PREFIX
  value: {{ .Values.redis.prefix | quote }}
{{- if .Values.redis.username }}
- name: PROZESS_REDIS_USERNAME
  value: {{ .Values.redis.username | quote }}
{{- end }}
{{- if include "prozess.redisAuth" . }}
- name: PROZESS_REDIS_PASSWORD_FILE
  value: /etc/prozess/redis/password
{{- end }}
{{- if .Values.redis.tls.enabled }}
- name: PROZESS_REDIS_TLS
  value: "true"
{{- if .Values.redis.tls.caSecret }}
- name: PROZESS_REDIS_TLS_CA_FILE
  value: /etc/prozess/redis-ca/ca.crt
{{- end }}
{{- end }}
- name: PROZESS_LOG_FORMAT
  value: json
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* The Secrets mounted as files, matching prozess.env's *_FILE variables. */}}
{{- define "prozess.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.database.caSecret }}
- name: db-ca
  mountPath: /etc/prozess/db-ca
  readOnly: true
{{- end }}
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/prozess/kafka-ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.sasl.mechanism }}
- name: kafka-sasl
  mountPath: /etc/prozess/kafka-sasl
  readOnly: true
{{- end }}
{{- if include "prozess.redisAuth" . }}
- name: redis
  mountPath: /etc/prozess/redis
  readOnly: true
{{- end }}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.caSecret }}
- name: redis-ca
  mountPath: /etc/prozess/redis-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "prozess.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.database.caSecret }}
- name: db-ca
  secret:
    secretName: {{ .Values.database.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if .Values.kafka.sasl.mechanism }}
{{- $sasl := include "prozess.kafkaSASLSecret" . | splitList " " }}
- name: kafka-sasl
  secret:
    secretName: {{ index $sasl 0 }}
    items:
      - key: {{ index $sasl 1 }}
        path: password
{{- end }}
{{- if include "prozess.redisAuth" . }}
{{- $redis := include "prozess.redisSecret" . | splitList " " }}
- name: redis
  secret:
    secretName: {{ index $redis 0 }}
    items:
      - key: {{ index $redis 1 }}
        path: password
{{- end }}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end -}}

{{/* Pod settings shared by every prozess pod. */}}
{{- define "prozess.podSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "prozess.volumes" . | nindent 2 }}
{{- end -}}
