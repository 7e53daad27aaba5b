{{/*
Names. The full name is cut to 52 characters so that `<name>-metrics` and the ReplicaSet's pod names
stay within Kubernetes' limits.
*/}}
{{- define "tessera-participant.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera-participant.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tessera-participant.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera-participant.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera-participant.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tessera-participant.labels" -}}
helm.sh/chart: {{ include "tessera-participant.chart" . }}
{{ include "tessera-participant.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: participant
tessera.io/organisation: {{ .Values.organisation.id | quote }}
app.kubernetes.io/part-of: tessera
tessera.io/federation: {{ .Values.federation.id | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- define "tessera-participant.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tessera-participant.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tessera-participant.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) -}}
{{- end -}}
{{- end -}}

{{- define "tessera-participant.rosterConfigMapName" -}}
{{- default (printf "%s-roster" (include "tessera-participant.fullname" .)) .Values.roster.existingConfigMap -}}
{{- end -}}

{{- define "tessera-participant.rosterKey" -}}
{{- if .Values.roster.existingConfigMap -}}{{ .Values.roster.existingConfigMapKey }}{{- else -}}roster.json{{- end -}}
{{- end -}}

{{- define "tessera-participant.claimName" -}}
{{- default (printf "%s-state" (include "tessera-participant.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* The port of broker.url: explicit, else 5671 for amqps and 5672 for amqp. */}}
{{- define "tessera-participant.brokerPort" -}}
{{- $u := urlParse (toString .Values.broker.url) -}}
{{- $port := regexFind ":[0-9]+$" (toString $u.host) | trimPrefix ":" -}}
{{- if $port -}}{{ $port }}{{- else if eq $u.scheme "amqps" -}}5671{{- else -}}5672{{- end -}}
{{- end -}}

{{/*
A probe from values: passed through as a Kubernetes Probe object; when it names no handler, an httpGet
on the health server's `path` and port is filled in. Arguments: dict "probe" <values> "path" <path>.
*/}}
{{- define "tessera-participant.probe" -}}
{{- $probe := deepCopy .probe -}}
{{- if not (or $probe.httpGet $probe.exec $probe.tcpSocket $probe.grpc) -}}
{{- $_ := set $probe "httpGet" (dict "path" .path "port" "metrics") -}}
{{- end -}}
{{- toYaml $probe -}}
{{- end -}}


{{- define "tessera-participant.encodingConfigMapName" -}}
{{- default (printf "%s-encoding" (include "tessera-participant.fullname" .)) .Values.data.encoding.existingConfigMap -}}
{{- end -}}

{{- define "tessera-participant.encodingKey" -}}
{{- if .Values.data.encoding.existingConfigMap -}}{{ .Values.data.encoding.existingConfigMapKey }}{{- else -}}encoding.json{{- end -}}
{{- end -}}

{{- define "tessera-participant.hasEncoding" -}}
{{- if or .Values.data.encoding.content .Values.data.encoding.existingConfigMap -}}true{{- end -}}
{{- end -}}

{{/*
Fail early, with a message that says how to fix the values. values.schema.json catches types and
patterns; these checks cover what a schema cannot say, and hold under --skip-schema-validation too.
*/}}
{{- define "tessera-participant.validateValues" -}}
{{- $idPattern := "^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$" -}}
{{- $msgs := list -}}
{{- $fed := toString (.Values.federation.id | default "") -}}
{{- $org := toString (.Values.organisation.id | default "") -}}
{{- if not $fed -}}
{{- $msgs = append $msgs "federation.id is empty: set the federation's id from the coordinator, e.g. --set federation.id=cardio-2025 (it is in the roster)." -}}
{{- else if not (regexMatch $idPattern $fed) -}}
{{- $msgs = append $msgs (printf "federation.id %q is invalid: use 1-32 lowercase letters, digits or '-', starting and ending with a letter or digit." $fed) -}}
{{- end -}}
{{- if not $org -}}
{{- $msgs = append $msgs "organisation.id is empty: set this company's id as listed in the roster, e.g. --set organisation.id=hospital-a." -}}
{{- else if not (regexMatch $idPattern $org) -}}
{{- $msgs = append $msgs (printf "organisation.id %q is invalid: use 1-32 lowercase letters, digits or '-', starting and ending with a letter or digit." $org) -}}
{{- else if has $org (list "curator" "all" "selected" "guest") -}}
{{- $msgs = append $msgs (printf "organisation.id %q is reserved (curator, all, selected, guest): use the id the roster gives this company." $org) -}}
{{- end -}}
{{- if not .Values.bootstrap -}}
{{- if not .Values.roster.fingerprint -}}
{{- $msgs = append $msgs "roster.fingerprint is empty: set the roster fingerprint the coordinator printed (`tessera roster build`), after comparing it out of band with the coordinator and the other companies, e.g. --set roster.fingerprint=<64 hex digits>. The participant refuses any other roster." -}}
{{- else if not (regexMatch "^[0-9a-fA-F :]{64,95}$" (toString .Values.roster.fingerprint)) -}}
{{- $msgs = append $msgs (printf "roster.fingerprint %q is not a fingerprint: it is 64 hex digits (spaces or colons between groups are allowed)." (toString .Values.roster.fingerprint)) -}}
{{- end -}}
{{- if and .Values.roster.content .Values.roster.existingConfigMap -}}
{{- $msgs = append $msgs "roster.content and roster.existingConfigMap are both set: use one (the roster file via --set-file roster.content=roster.json, or the name of a ConfigMap that holds it)." -}}
{{- else if not (or .Values.roster.content .Values.roster.existingConfigMap) -}}
{{- $msgs = append $msgs "no roster: pass the roster the coordinator sent with --set-file roster.content=roster.json, or set roster.existingConfigMap." -}}
{{- else if .Values.roster.content -}}
{{- $roster := fromJson (toString .Values.roster.content) -}}
{{- if or (hasKey $roster "Error") (not (hasKey $roster "members")) -}}
{{- $msgs = append $msgs "roster.content is not a roster: it must be the JSON file written by `tessera roster build` (with federation, curator_user and members)." -}}
{{- else -}}
{{- if ne (toString $roster.federation) $fed -}}
{{- $msgs = append $msgs (printf "roster.content is the roster of federation %q but federation.id is %q: use the matching roster or id." (toString $roster.federation) $fed) -}}
{{- end -}}
{{- $members := list -}}
{{- range $roster.members -}}{{- $members = append $members (toString .organisation) -}}{{- end -}}
{{- if and $org (not (has $org $members)) -}}
{{- $msgs = append $msgs (printf "organisation.id %q is not in the roster (members: %s): use the id the coordinator gave this company, or ask for an updated roster." $org (join ", " $members)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $url := toString (.Values.broker.url | default "") -}}
{{- if not $url -}}
{{- $msgs = append $msgs "broker.url is empty: set the broker address the coordinator gave you, without credentials, e.g. amqps://broker.example.org:5671/." -}}
{{- else if not (regexMatch "^amqps?://[^/@?#:]+(:[0-9]+)?(/[^?#]*)?$" $url) -}}
{{- $msgs = append $msgs (printf "broker.url %q is invalid: use amqp://host:port/ or amqps://host:port/ without user, password or query options (the password comes from broker.auth.existingSecret)." $url) -}}
{{- else if and (hasPrefix "amqp://" $url) (or .Values.broker.tls.existingSecret .Values.broker.tls.clientCertSecret) -}}
{{- $msgs = append $msgs "broker.tls.* is set but broker.url is amqp://: use amqps:// (the service refuses TLS files with a plain URL)." -}}
{{- end -}}
{{- if not .Values.broker.auth.existingSecret -}}
{{- $msgs = append $msgs "broker.auth.existingSecret is empty: create a Secret with the broker password the coordinator sent (kubectl create secret generic <org>-broker --from-literal=password=...) and name it here." -}}
{{- end -}}
{{- if not .Values.numClasses -}}
{{- $msgs = append $msgs "numClasses is not set: set the number of classes of the task, e.g. --set numClasses=2 (the same as the curator's)." -}}
{{- else if and (hasKey .Values.model.kwargs "num_classes") (ne (int .Values.model.kwargs.num_classes) (int .Values.numClasses)) -}}
{{- $msgs = append $msgs (printf "model.kwargs.num_classes is %d but numClasses is %d: make them equal." (int .Values.model.kwargs.num_classes) (int .Values.numClasses)) -}}
{{- end -}}
{{- if and (eq (toString .Values.model.name) "mlp") (not (and (hasKey .Values.model.kwargs "input_dim") (hasKey .Values.model.kwargs "num_classes"))) -}}
{{- $msgs = append $msgs "model.name is mlp but model.kwargs lacks input_dim or num_classes: set them, e.g. model.kwargs={input_dim: 30, hidden: [32], num_classes: 2} (identical on the curator and every participant)." -}}
{{- end -}}
{{- if and (hasPrefix "import:" (toString .Values.model.name)) (not (has (trimPrefix "import:" (toString .Values.model.name)) .Values.allowedImports)) -}}
{{- $msgs = append $msgs (printf "model.name is %s but %s is not in allowedImports: add it if you trust that code (the participant refuses to build it otherwise)." .Values.model.name (trimPrefix "import:" (toString .Values.model.name))) -}}
{{- end -}}
{{- if and .Values.data.existingClaim .Values.data.hostPath -}}
{{- $msgs = append $msgs "data.existingClaim and data.hostPath are both set: use one for the company's data volume." -}}
{{- else if not (or .Values.data.existingClaim .Values.data.hostPath) -}}
{{- $msgs = append $msgs "no data volume: set data.existingClaim (a PersistentVolumeClaim with the company's data) or data.hostPath (a directory on the node)." -}}
{{- else if and .Values.data.hostPath (not (hasPrefix "/" (toString .Values.data.hostPath))) -}}
{{- $msgs = append $msgs (printf "data.hostPath %q must be an absolute path on the node." .Values.data.hostPath) -}}
{{- end -}}
{{- if not .Values.data.file -}}
{{- $msgs = append $msgs "data.file is empty: set the data file's path inside the data volume, e.g. data.file=records.csv." -}}
{{- end -}}
{{- if and .Values.data.encoding.content .Values.data.encoding.existingConfigMap -}}
{{- $msgs = append $msgs "data.encoding.content and data.encoding.existingConfigMap are both set: use one." -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.brokerPeers) -}}
{{- $msgs = append $msgs "networkPolicy.enabled is true but networkPolicy.brokerPeers is empty, so the participant could not reach the broker: list the broker's address as an ipBlock (or its pods/namespace in this cluster)." -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- $msgs = append $msgs "metrics.serviceMonitor.enabled needs metrics.service.enabled=true (the ServiceMonitor selects that Service)." -}}
{{- end -}}
{{- else if .Values.identity.existingSecret -}}
{{- $msgs = append $msgs "bootstrap is true but identity.existingSecret is set: bootstrap creates the key on the state volume; with a key made elsewhere, skip bootstrap." -}}
{{- end -}}
{{- if $msgs -}}
{{- fail (printf "\n\nINVALID VALUES for tessera-participant:\n  - %s\n" (join "\n  - " $msgs)) -}}
{{- end -}}
{{- end -}}

{{/*
The container that creates this organisation's identity key on the state volume, unless it exists. The
kubelet may have made an existing key group-readable (fsGroup), which the key loader refuses: here the
volume's ownership protects it at rest (the service itself only reads the 0400 copy), hence the override.
*/}}
{{- define "tessera-participant.identityInitContainer" -}}
image: {{ include "tessera-participant.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
command: ["tessera"]
args: ["identity", "init", "--key", "/var/lib/tessera/identity/key", "--if-missing", "--public-out", "/var/lib/tessera/identity/public.hex"]
env:
  - name: TESSERA_ALLOW_SHARED_KEY_FILE
    value: "1"
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
resources:
  requests:
    cpu: 10m
    memory: 64Mi
  limits:
    memory: 256Mi
volumeMounts:
  - name: state
    mountPath: /var/lib/tessera
  - name: tmp
    mountPath: /tmp
{{- end -}}
