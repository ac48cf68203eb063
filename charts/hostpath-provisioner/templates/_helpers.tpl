{{/* Labels every object carries. */}}
{{- define "hpp.labels" -}}
app.kubernetes.io/name: hpp-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "hpp.selector" -}}
app.kubernetes.io/name: hpp-csi
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hpp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Kubernetes names made from a pool's name: a StorageClass and a pod volume. */}}
{{- define "hpp.poolVolume" -}}pool-{{ .name }}{{- end }}

{{/* Refuses values the driver or Kubernetes would refuse later, with a message that says what to change. */}}
{{- define "hpp.validate" -}}
{{- if not .Values.storagePools }}
{{- fail "storagePools is empty: give at least one pool, e.g. --set 'storagePools[0].name=local,storagePools[0].path=/var/hpvolumes'" }}
{{- end }}
{{- $names := dict }}
{{- $paths := dict }}
{{- range $i, $pool := .Values.storagePools }}
{{- $name := required (printf "storagePools[%d].name is required" $i) $pool.name | toString }}
{{- $path := required (printf "storagePools[%d].path is required" $i) $pool.path | toString }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "storagePools[%d].name %q: use lower-case letters, digits and '-' (it names a StorageClass and a pod volume)" $i $name) }}
{{- end }}
{{- if gt (len $name) 50 }}
{{- fail (printf "storagePools[%d].name %q is longer than 50 characters" $i $name) }}
{{- end }}
{{- if not (isAbs $path) }}
{{- fail (printf "storagePools[%d].path %q must be absolute" $i $path) }}
{{- end }}
{{- if hasKey $names $name }}
{{- fail (printf "storagePools[%d].name %q is used more than once" $i $name) }}
{{- end }}
{{- if hasKey $paths (clean $path) }}
{{- fail (printf "storagePools[%d].path %q is used more than once" $i $path) }}
{{- end }}
{{- $_ := set $names $name true }}
{{- $_ := set $paths (clean $path) true }}
{{- if $pool.size }}
{{- fail (printf "storagePools[%d] (%s): size: pools (a loop file made by the driver) are for local use; in a cluster give the disk as device:" $i $name) }}
{{- end }}
{{- if $pool.pvcTemplate }}
{{- fail (printf "storagePools[%d] (%s): pvcTemplate pools need a PVC and a mounter on every node (the HPP operator makes them); this chart does not yet: give the disk as device: instead" $i $name) }}
{{- end }}
{{- if and $pool.device (not (hasPrefix "/dev/" (toString $pool.device))) }}
{{- fail (printf "storagePools[%d] (%s): device %q must be under /dev (the driver's pod sees the host's /dev)" $i $name (toString $pool.device)) }}
{{- end }}
{{- end }}
{{- if and .Values.storageClass.defaultPool (not (hasKey $names .Values.storageClass.defaultPool)) }}
{{- fail (printf "storageClass.defaultPool %q is not the name of a pool in storagePools" .Values.storageClass.defaultPool) }}
{{- end }}
{{- if and .Values.snapshots.enabled (not .Values.snapshots.controllerDistributed) }}
{{- fail `
snapshots need the cluster's snapshot-controller started with --enable-distributed-snapshotting=true:
hpp-csi volumes live on one node, so only that node's csi-snapshotter (--node-deployment=true) can cut them,
and it only handles VolumeSnapshotContents the distributed snapshot-controller labels with the node's name.
With a stock snapshot-controller snapshots stay ReadyToUse=false and their deletion hangs.
Either
  - add --enable-distributed-snapshotting=true to the snapshot-controller's arguments, then install with
    --set snapshots.controllerDistributed=true (the chart grants that controller read access to Nodes), or
  - install with --set snapshots.enabled=false (no snapshots).` }}
{{- end }}
{{- if and .Values.metrics.tls.enabled (not .Values.metrics.tls.secretName) }}
{{- fail "metrics.tls.enabled needs metrics.tls.secretName: a kubernetes.io/tls Secret in the release namespace (tls.crt, tls.key)" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.create (not .Values.metrics.service.create) }}
{{- fail "metrics.serviceMonitor.create needs metrics.service.create=true (the ServiceMonitor selects that Service)" }}
{{- end }}
{{- if and (or .Values.metrics.service.create .Values.metrics.tls.enabled) (not .Values.metrics.enabled) }}
{{- fail "metrics.service.create and metrics.tls.enabled need metrics.enabled=true" }}
{{- end }}
{{- end }}
