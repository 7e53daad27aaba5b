{{/*
Names. The StatefulSet name is cut to 52 characters because Kubernetes adds a controller-revision-hash
label `<name>-<hash>` that must fit in 63.
*/}}
{{- define "tessera-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera-broker.fullname" -}}
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

{{- define "tessera-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tessera-broker.labels" -}}
helm.sh/chart: {{ include "tessera-broker.chart" . }}
{{ include "tessera-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: broker
app.kubernetes.io/part-of: tessera
tessera.io/federation: {{ .Values.federation.id | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- define "tessera-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tessera-broker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tessera-broker.headlessServiceName" -}}
{{- printf "%s-headless" (include "tessera-broker.fullname" .) -}}
{{- end -}}

{{- define "tessera-broker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The federation's vhost (docs/topology.md: `tessera-<federation>`). */}}
{{- define "tessera-broker.vhost" -}}
{{- printf "tessera-%s" .Values.federation.id -}}
{{- end -}}

{{/* Is plain AMQP (5672) served? Always without TLS; with TLS only if not disabled. */}}
{{- define "tessera-broker.plainEnabled" -}}
{{- if or (not .Values.tls.enabled) (not .Values.tls.disablePlainListener) -}}true{{- end -}}
{{- end -}}

{{/* The curator's broker user name (docs/topology.md: `curator` unless the roster names another). */}}
{{- define "tessera-broker.curatorUser" -}}
{{- .Values.auth.curator.username | default "curator" -}}
{{- end -}}

{{/*
Broker users: the curator, then each organisation. Returns a YAML list of
{name, curator, secretName, secretKey, generated}. `generated` means the chart owns the Secret.
*/}}
{{- define "tessera-broker.users" -}}
{{- $fullname := include "tessera-broker.fullname" . -}}
{{- $users := list -}}
{{- $c := .Values.auth.curator -}}
{{- $users = append $users (dict "name" (include "tessera-broker.curatorUser" .) "curator" true "secretName" (default (printf "%s-user-curator" $fullname) $c.existingSecret) "secretKey" (ternary $c.existingSecretKey "password" (not (empty $c.existingSecret))) "generated" (empty $c.existingSecret)) -}}
{{- range .Values.organisations -}}
{{- $existing := .existingSecret | default "" -}}
{{- $key := .existingSecretKey | default "password" -}}
{{- $users = append $users (dict "name" .id "curator" false "secretName" (default (printf "%s-user-%s" $fullname .id) $existing) "secretKey" (ternary $key "password" (not (empty $existing))) "generated" (empty $existing)) -}}
{{- end -}}
{{- toYaml $users -}}
{{- end -}}

{{- define "tessera-broker.erlangCookieSecretName" -}}
{{- default (printf "%s-erlang-cookie" (include "tessera-broker.fullname" .)) .Values.auth.erlangCookie.existingSecret -}}
{{- end -}}

{{- define "tessera-broker.erlangCookieSecretKey" -}}
{{- if .Values.auth.erlangCookie.existingSecret -}}{{ .Values.auth.erlangCookie.existingSecretKey }}{{- else -}}erlang-cookie{{- end -}}
{{- end -}}

{{/*
A generated secret value that survives upgrades: reuse the value already stored in the live Secret
(the `lookup` pattern), otherwise draw a new random one. Returns it base64-encoded, ready for `data:`.
`helm template` and `--dry-run` cannot look up, so they always show a fresh random value.
Arguments: dict "ctx" $ "name" <secret name> "key" <data key>
*/}}
{{- define "tessera-broker.persistentSecretValue" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- $data := dict -}}
{{- if $live -}}{{- $data = $live.data | default dict -}}{{- end -}}
{{- if hasKey $data .key -}}
{{- index $data .key -}}
{{- else -}}
{{- randAlphaNum (int .ctx.Values.auth.passwordLength) | b64enc -}}
{{- end -}}
{{- end -}}

{{/*
Permissions and topic permissions of one broker user, exactly as in docs/topology.md (the contract
with tessera.transport; change all three together). Argument: one entry of "tessera-broker.users"
(its name is the curator's user or an organisation id; ids match ^[a-z0-9-]+$, so they need no regex
escaping). Output: TSV lines of the provisioning plan, see plan.tsv in configmap.yaml.
*/}}
{{- define "tessera-broker.grants" -}}
{{- $u := .name -}}
{{- $t := "\t" -}}
{{- if .curator -}}
{{- /* "Permissions": the curator declares the whole topology. "Topic permissions": to.<anything>. */ -}}
{{- list "permissions" $u `^(tessera\..*|participant\..*|curator\..*)$` `^(tessera\.to-participants|tessera\.dead-letter|participant\..*|curator\..*)$` `^(tessera\..*|participant\..*|curator\..*)$` | join $t }}
{{ list "topic_permissions" $u "tessera.to-participants" `^to\..+$` `^to\..+$` | join $t }}
{{- else -}}
{{- /* "Permissions": an organisation declares nothing, publishes only to tessera.to-curator (never
       amq.default) and reads only its own inbox. "Topic permissions": routing keys of its own only. */ -}}
{{- list "permissions" $u `^$` `^tessera\.to-curator$` (printf `^participant\.%s\.inbox$` $u) | join $t }}
{{ list "topic_permissions" $u "tessera.to-curator" (printf `^from\.%s(\..+)?$` $u) `^$` | join $t }}
{{- end -}}
{{- end -}}

{{/*
Fail early, with a message that says how to fix the values. values.schema.json catches most of this
before templates render; these checks also cover what a schema cannot say (unique ids, TLS needs a
Secret) and installs run with --skip-schema-validation.
*/}}
{{- define "tessera-broker.validateValues" -}}
{{- $idPattern := "^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$" -}}
{{- $reserved := list "curator" "guest" "all" "selected" -}}
{{- $msgs := list -}}
{{- $fed := toString (.Values.federation.id | default "") -}}
{{- if not $fed -}}
{{- $msgs = append $msgs "federation.id is empty: set it, e.g. --set federation.id=acme-2025 (the vhost becomes tessera-<id>)." -}}
{{- else if not (regexMatch $idPattern $fed) -}}
{{- $msgs = append $msgs (printf "federation.id %q is invalid: use 1-32 lowercase letters, digits or '-', starting and ending with a letter or digit." $fed) -}}
{{- end -}}
{{- if not .Values.organisations -}}
{{- $msgs = append $msgs "organisations is empty: list at least one, e.g. organisations: [{id: hospital-a}]." -}}
{{- end -}}
{{- $curatorUser := include "tessera-broker.curatorUser" . -}}
{{- if not (regexMatch $idPattern $curatorUser) -}}
{{- $msgs = append $msgs (printf "auth.curator.username %q is invalid: use 1-32 lowercase letters, digits or '-' (it must equal curator_user in the roster)." $curatorUser) -}}
{{- else if has $curatorUser (list "guest" "all") -}}
{{- $msgs = append $msgs (printf "auth.curator.username %q is reserved: keep the default `curator` or pick another name (and put it in the roster as curator_user)." $curatorUser) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $org := .Values.organisations -}}
{{- $id := toString ($org.id | default "") -}}
{{- if has $id $reserved -}}
{{- $msgs = append $msgs (printf "organisations[%d].id %q is reserved (the curator's broker user is `curator`; `guest` is RabbitMQ's default user; `to.all` and `to.selected` are routing keys to several organisations): rename the organisation." $i $id) -}}
{{- else if not (regexMatch $idPattern $id) -}}
{{- $msgs = append $msgs (printf "organisations[%d].id %q is invalid: use 1-32 lowercase letters, digits or '-', starting and ending with a letter or digit (it names a broker user and Kubernetes objects)." $i $id) -}}
{{- end -}}
{{- if and (eq $id $curatorUser) (ne $id "curator") -}}
{{- $msgs = append $msgs (printf "organisations[%d].id %q equals auth.curator.username: the curator's broker user and an organisation's must differ." $i $id) -}}
{{- end -}}
{{- if hasKey $seen $id -}}
{{- $msgs = append $msgs (printf "organisations[%d].id %q is listed twice: each organisation appears once." $i $id) -}}
{{- end -}}
{{- $_ := set $seen $id true -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- $msgs = append $msgs "tls.enabled is true but tls.existingSecret is empty: create a Secret with ca.crt, tls.crt and tls.key (e.g. with cert-manager) and set tls.existingSecret to its name." -}}
{{- end -}}
{{- if not (has (int .Values.replicas) (list 1 3 5 7)) -}}
{{- $msgs = append $msgs (printf "replicas %v is not supported: use 1 (one node) or 3, 5 or 7 (an odd number, so that a majority survives a partition)." .Values.replicas) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.allowedClients) -}}
{{- $msgs = append $msgs "networkPolicy.enabled is true but networkPolicy.allowedClients is empty, so nothing could reach the broker: list the curator's and the companies' peers (podSelector/namespaceSelector/ipBlock)." -}}
{{- end -}}
{{- if $msgs -}}
{{- fail (printf "\n\nINVALID VALUES for tessera-broker:\n  - %s\n" (join "\n  - " $msgs)) -}}
{{- end -}}
{{- end -}}

{{- /* A cluster (replicas > 1): RabbitMQ's Kubernetes peer discovery forms it. */ -}}
{{- define "tessera-broker.clustered" -}}
{{- if gt (int .Values.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{- /* ".<headless>.<namespace>.svc.<domain>": each pod's DNS name is its name followed by this. */ -}}
{{- define "tessera-broker.hostnameSuffix" -}}
{{- printf ".%s.%s.svc.%s" (include "tessera-broker.headlessServiceName" .) .Release.Namespace .Values.clustering.clusterDomain -}}
{{- end -}}

{{- /* The node-name environment of every container that runs RabbitMQ or talks to it with rabbitmqctl. One
node keeps the fixed rabbit@localhost (its data directory is found again on any pod); a cluster's nodes
need names their peers can resolve: rabbit@<pod DNS name>. */ -}}
{{- define "tessera-broker.nodeEnv" -}}
{{- if include "tessera-broker.clustered" . }}
- name: MY_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RABBITMQ_USE_LONGNAME
  value: "true"
- name: RABBITMQ_NODENAME
  value: rabbit@$(MY_POD_NAME){{ include "tessera-broker.hostnameSuffix" . }}
- name: K8S_SERVICE_NAME
  value: {{ include "tessera-broker.headlessServiceName" . }}
- name: K8S_HOSTNAME_SUFFIX
  value: {{ include "tessera-broker.hostnameSuffix" . }}
{{- else }}
- name: RABBITMQ_NODENAME
  value: rabbit@localhost
{{- end }}
{{- end -}}
