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

{{/* The upload daemon's pods: labels of their own, so neither the driver's DaemonSet nor its metrics Service
selects them. */}}
{{- define "hpp.uploadSelector" -}}
app.kubernetes.io/name: hpp-csi-upload-daemon
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hpp.uploadImage" -}}
{{- $image := .Values.uploadDaemon.image -}}
{{ $image.repository }}:{{ $image.tag | default .Chart.AppVersion }}
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
{{- if and .Values.metrics.tls.secretName (not (regexMatch "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" (toString .Values.metrics.tls.secretName))) }}
{{- fail (printf "metrics.tls.secretName %q is not a Secret name" (toString .Values.metrics.tls.secretName)) }}
{{- end }}
{{- if and .Values.metrics.tls.secretName (not .Values.metrics.tls.enabled) }}
{{- fail "metrics.tls.secretName is set but metrics.tls.enabled is false: set metrics.tls.enabled=true to serve metrics over HTTPS" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.create (not .Values.metrics.service.create) }}
{{- fail "metrics.serviceMonitor.create needs metrics.service.create=true (the ServiceMonitor selects that Service)" }}
{{- end }}
{{- if and (or .Values.metrics.service.create .Values.metrics.tls.enabled) (not .Values.metrics.enabled) }}
{{- fail "metrics.service.create and metrics.tls.enabled need metrics.enabled=true" }}
{{- end }}
{{- if .Values.uploadDaemon.enabled }}
{{- include "hpp.validateUploadDaemon" . }}
{{- end }}
{{- include "hpp.validateCdi" . }}
{{- end }}

{{/* The upload daemon's values, checked with the grammar the daemon itself applies at start, so a typo fails the
install instead of crash-looping a pod on every node. */}}
{{- define "hpp.validateUploadDaemon" -}}
{{- $d := .Values.uploadDaemon }}
{{- range $key := list "port" "healthzPort" }}
{{- $port := get $d $key | toString }}
{{- if or (not (regexMatch "^[0-9]{1,5}$" $port)) (lt (atoi $port) 1) (gt (atoi $port) 65535) }}
{{- fail (printf "uploadDaemon.%s %q: give a TCP port, 1 to 65535" $key $port) }}
{{- end }}
{{- end }}
{{- if eq (toString $d.port) (toString $d.healthzPort) }}
{{- fail (printf "uploadDaemon.port and uploadDaemon.healthzPort are both %v: the daemon listens on both" $d.port) }}
{{- end }}
{{- $state := required "uploadDaemon.stateDir is required (the node folder for the token signing key)" $d.stateDir | toString }}
{{- if not (isAbs $state) }}
{{- fail (printf "uploadDaemon.stateDir %q must be absolute" $state) }}
{{- end }}
{{- range .Values.storagePools }}
{{- $pool := clean (toString .path) }}
{{- if or (eq (clean $state) $pool) (hasPrefix (printf "%s/" (trimSuffix "/" $pool)) (clean $state)) }}
{{- fail (printf "uploadDaemon.stateDir %q is inside pool %q (%s): keep the token signing key out of volume storage" $state (toString .name) $pool) }}
{{- end }}
{{- end }}
{{- if and $d.listenAddress (not (regexMatch "^[0-9A-Za-z.:-]+$" (toString $d.listenAddress))) }}
{{- fail (printf "uploadDaemon.listenAddress %q: give an IP address or host name without brackets or port (empty: the node's IP)" (toString $d.listenAddress)) }}
{{- end }}
{{- if and $d.tls.secretName (not (regexMatch "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" (toString $d.tls.secretName))) }}
{{- fail (printf "uploadDaemon.tls.secretName %q is not a Secret name" (toString $d.tls.secretName)) }}
{{- end }}
{{- $number := "^[0-9]+(\\.[0-9]+)?$" }}
{{- if and (ne (toString $d.filesystemOverhead) "") (not (regexMatch "^0(\\.[0-9]+)?$" (toString $d.filesystemOverhead))) }}
{{- fail (printf "uploadDaemon.filesystemOverhead %q: a fraction at least 0 and below 1, such as 0.055" (toString $d.filesystemOverhead)) }}
{{- end }}
{{- range $key := list "stallTimeout" "resumeHold" }}
{{- $v := get $d $key | toString }}
{{- if and (ne $v "") (not (regexMatch $number $v)) }}
{{- fail (printf "uploadDaemon.%s %q: a number of seconds, such as 60 (0 disables)" $key $v) }}
{{- end }}
{{- end }}
{{- $window := toString $d.minRateWindow }}
{{- if and (ne $window "") (or (not (regexMatch $number $window)) (not (regexMatch "[1-9]" $window))) }}
{{- fail (printf "uploadDaemon.minRateWindow %q: a positive number of seconds, such as 30" $window) }}
{{- end }}
{{- $rate := toString $d.minRate }}
{{- if and (ne $rate "") (not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$" $rate)) }}
{{- fail (printf "uploadDaemon.minRate %q: bytes per second as a Kubernetes quantity, such as 1Mi (0 disables)" $rate) }}
{{- end }}
{{- end }}

{{/* CDI's image values end up in a shell command in NOTES.txt: only image-reference characters pass. */}}
{{- define "hpp.validateCdi" -}}
{{- range $key := list "importerImage" "uploadServerImage" }}
{{- $ref := get $.Values.cdi $key | toString }}
{{- if and $ref (not (regexMatch "^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$" $ref)) }}
{{- fail (printf "cdi.%s %q is not an image reference (registry/name:tag or name@sha256:digest)" $key $ref) }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString .Values.cdi.namespace)) }}
{{- fail (printf "cdi.namespace %q is not a namespace name" (toString .Values.cdi.namespace)) }}
{{- end }}
{{- end }}
