{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "dsm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "dsm-operator.fullname" -}}
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

{{- define "dsm-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "dsm-operator.labels" -}}
helm.sh/chart: {{ include "dsm-operator.chart" . }}
{{ include "dsm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dsm
{{- end }}

{{/* Labels that select the operator pod (immutable once installed). */}}
{{- define "dsm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dsm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dsm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dsm-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The rules the operator needs in every namespace it serves: exactly what it does, each rule with
what for (operator/dsm_operator/gateways/kubeapi.py, handlers/, and kopf itself).
tests/operator/test_cluster_operator_chart.py checks each is granted and nothing more on Secrets;
tests/operator/test_cluster_operator_reconcile.py runs the operator with this account.
*/}}
{{- define "dsm-operator.namespacedRules" -}}
# The resources it serves: kopf lists and watches them, patches its finalizer and annotations.
- apiGroups: [security.dsm.dev]
  resources: [deepsecuritymanagers]
  verbs: [get, list, watch, patch]
# The status it writes (merge patches).
- apiGroups: [security.dsm.dev]
  resources: [deepsecuritymanagers/status]
  verbs: [get, patch]
# Children carry a controller owner reference with blockOwnerDeletion; with the
# OwnerReferencesPermissionEnforcement admission plugin (OpenShift's default) setting it needs
# update on the owner's finalizers.
- apiGroups: [security.dsm.dev]
  resources: [deepsecuritymanagers/finalizers]
  verbs: [update]
# Events on the resources (kopf posts them through either API).
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Node pods: watched to wake a pass, listed each pass, deleted one at a time for a rollout.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
# Secrets: reads the Secrets a resource names (database URL, local secret, TLS pair; names are
# chosen by users, so no resourceNames) and creates the bootstrap API key Secret. Never lists,
# watches, changes or deletes one (the API key Secret goes with its owner).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
# Children: read to check they are ours, created, server-side applied (patch); the ones the
# spec can switch off (load balancer Service, PodDisruptionBudget, ServiceMonitor) deleted.
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, patch]
# The StatefulSet is also watched (its events wake a pass); never deleted (it goes with its owner).
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors, prometheusrules]
  verbs: [get, create, patch, delete]
{{- end }}
