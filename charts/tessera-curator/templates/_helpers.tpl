{{/*
Names. The full name is cut to 52 characters so that `<name>-metrics` and the ReplicaSet's pod names
stay within Kubernetes' limits.
*/}}
{{- define "tessera-curator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera-curator.fullname" -}}
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

{{- define "tessera-curator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera-curator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera-curator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tessera-curator.labels" -}}
helm.sh/chart: {{ include "tessera-curator.chart" . }}
{{ include "tessera-curator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: curator
app.kubernetes.io/part-of: tessera
tessera.io/federation: {{ .Values.federation.id | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- define "tessera-curator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tessera-curator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tessera-curator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) -}}
{{- end -}}
{{- end -}}

{{- define "tessera-curator.rosterConfigMapName" -}}
{{- default (printf "%s-roster" (include "tessera-curator.fullname" .)) .Values.roster.existingConfigMap -}}
{{- end -}}

{{- define "tessera-curator.rosterKey" -}}
{{- if .Values.roster.existingConfigMap -}}{{ .Values.roster.existingConfigMapKey }}{{- else -}}roster.json{{- end -}}
{{- end -}}

{{- define "tessera-curator.claimName" -}}
{{- default (printf "%s-state" (include "tessera-curator.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* The port of broker.url: explicit, else 5671 for amqps and 5672 for amqp. */}}
{{- define "tessera-curator.brokerPort" -}}
{{- $u := urlParse (toString .Values.broker.url) -}}
{{- $port := regexFind ":[0-9]+$" (toString $u.host) | trimPrefix ":" -}}
{{- if $port -}}{{ $port }}{{- else if eq $u.scheme "amqps" -}}5671{{- else -}}5672{{- end -}}
{{- end -}}

{{/*
A probe from values: passed through as a Kubernetes Probe object; when it names no handler, an httpGet
on the health server's `path` and port is filled in. Arguments: dict "probe" <values> "path" <path>.
*/}}
{{- define "tessera-curator.probe" -}}
{{- $probe := deepCopy .probe -}}
{{- if not (or $probe.httpGet $probe.exec $probe.tcpSocket $probe.grpc) -}}
{{- $_ := set $probe "httpGet" (dict "path" .path "port" "metrics") -}}
{{- end -}}
{{- toYaml $probe -}}
{{- end -}}

{{/*
Fail early, with a message that says how to fix the values. values.schema.json catches types and
patterns; these checks cover what a schema cannot say, and hold under --skip-schema-validation too.
*/}}
{{- define "tessera-curator.validateValues" -}}
{{- $idPattern := "^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$" -}}
{{- $msgs := list -}}
{{- $fed := toString (.Values.federation.id | default "") -}}
{{- if not $fed -}}
{{- $msgs = append $msgs "federation.id is empty: set it to the federation's id, e.g. --set federation.id=cardio-2025 (the same id as in the roster and the broker release)." -}}
{{- else if not (regexMatch $idPattern $fed) -}}
{{- $msgs = append $msgs (printf "federation.id %q is invalid: use 1-32 lowercase letters, digits or '-', starting and ending with a letter or digit." $fed) -}}
{{- end -}}
{{- $user := toString (.Values.broker.auth.username | default "") -}}
{{- if or (not (regexMatch $idPattern $user)) (has $user (list "guest" "all")) -}}
{{- $msgs = append $msgs (printf "broker.auth.username %q is invalid: use the curator's broker user (default `curator`, the roster's curator_user)." $user) -}}
{{- end -}}
{{- if and .Values.roster.content .Values.roster.existingConfigMap -}}
{{- $msgs = append $msgs "roster.content and roster.existingConfigMap are both set: use one (the roster file via --set-file roster.content=roster.json, or the name of a ConfigMap that holds it)." -}}
{{- else if not (or .Values.roster.content .Values.roster.existingConfigMap) -}}
{{- $msgs = append $msgs "no roster: pass the roster from `tessera roster build` with --set-file roster.content=roster.json, or set roster.existingConfigMap." -}}
{{- else if .Values.roster.content -}}
{{- $roster := fromJson (toString .Values.roster.content) -}}
{{- if or (hasKey $roster "Error") (not (hasKey $roster "members")) -}}
{{- $msgs = append $msgs "roster.content is not a roster: it must be the JSON file written by `tessera roster build` (with federation, curator_user and members)." -}}
{{- else -}}
{{- if ne (toString $roster.federation) $fed -}}
{{- $msgs = append $msgs (printf "roster.content is the roster of federation %q but federation.id is %q: use the matching roster or id." (toString $roster.federation) $fed) -}}
{{- end -}}
{{- $rosterUser := toString ($roster.curator_user | default "curator") -}}
{{- if ne $rosterUser $user -}}
{{- $msgs = append $msgs (printf "the roster's curator_user is %q but broker.auth.username is %q: they must be the same broker user." $rosterUser $user) -}}
{{- end -}}
{{- if lt (len $roster.members) (int .Values.rounds.minParticipants) -}}
{{- $msgs = append $msgs (printf "rounds.minParticipants is %d but the roster lists only %d organisations: no round could ever run." (int .Values.rounds.minParticipants) (len $roster.members)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $url := toString (.Values.broker.url | default "") -}}
{{- if not $url -}}
{{- $msgs = append $msgs "broker.url is empty: set the broker's address without credentials, e.g. amqps://broker.example.org:5671/ (or amqp://<broker release>-tessera-broker.<namespace>.svc:5672/ inside the cluster)." -}}
{{- else if not (regexMatch "^amqps?://[^/@?#:]+(:[0-9]+)?(/[^?#]*)?$" $url) -}}
{{- $msgs = append $msgs (printf "broker.url %q is invalid: use amqp://host:port/ or amqps://host:port/ without user, password or query options (credentials come from broker.auth.existingSecret)." $url) -}}
{{- else if and (hasPrefix "amqp://" $url) (or .Values.broker.tls.existingSecret .Values.broker.tls.clientCertSecret) -}}
{{- $msgs = append $msgs "broker.tls.* is set but broker.url is amqp://: use amqps:// (the service refuses TLS files with a plain URL)." -}}
{{- end -}}
{{- if not .Values.broker.auth.existingSecret -}}
{{- $msgs = append $msgs "broker.auth.existingSecret is empty: name the Secret with the curator's broker password (tessera-broker creates <broker release>-tessera-broker-user-curator)." -}}
{{- end -}}
{{- if not .Values.numClasses -}}
{{- $msgs = append $msgs "numClasses is not set: set the number of classes of the task, e.g. --set numClasses=2." -}}
{{- else if and (hasKey .Values.model.kwargs "num_classes") (ne (int .Values.model.kwargs.num_classes) (int .Values.numClasses)) -}}
{{- $msgs = append $msgs (printf "model.kwargs.num_classes is %d but numClasses is %d: make them equal." (int .Values.model.kwargs.num_classes) (int .Values.numClasses)) -}}
{{- end -}}
{{- if and (eq (toString .Values.model.name) "mlp") (not (and (hasKey .Values.model.kwargs "input_dim") (hasKey .Values.model.kwargs "num_classes"))) -}}
{{- $msgs = append $msgs "model.name is mlp but model.kwargs lacks input_dim or num_classes: set them, e.g. model.kwargs={input_dim: 30, hidden: [32], num_classes: 2} (identical on the curator and every participant)." -}}
{{- end -}}
{{- if and .Values.validation.enabled (not (and .Values.validation.existingClaim .Values.validation.file)) -}}
{{- $msgs = append $msgs "validation.enabled is true but validation.existingClaim or validation.file is empty: name the claim holding the validation set and the file's path inside it." -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.brokerPeers) -}}
{{- $msgs = append $msgs "networkPolicy.enabled is true but networkPolicy.brokerPeers is empty, so the curator could not reach the broker: list the broker's pods/namespace or its ipBlock." -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- $msgs = append $msgs "metrics.serviceMonitor.enabled needs metrics.service.enabled=true (the ServiceMonitor selects that Service)." -}}
{{- end -}}
{{- if $msgs -}}
{{- fail (printf "\n\nINVALID VALUES for tessera-curator:\n  - %s\n" (join "\n  - " $msgs)) -}}
{{- end -}}
{{- end -}}
