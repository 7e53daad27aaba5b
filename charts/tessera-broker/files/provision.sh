#!/bin/bash
# Provisioning sidecar of tessera-broker: makes the broker match the plan rendered from the chart's
# values (docs/topology.md), then does it again every PROVISION_INTERVAL_SECONDS.
#
# Why a sidecar and not RabbitMQ's load_definitions: definitions need every password (or its salted
# hash) inside the definitions file at render time, which means either copying passwords into another
# object or reading companies' existing Secrets with `lookup`. Here the plan (names and permission
# regexes only) lives in a ConfigMap and each password is read from its own Secret, mounted into this
# container only. Each pass is idempotent, runs on every pod start (so a restored or empty data volume
# is re-provisioned), and picks up rotated passwords without a restart.
#
# Plan lines (fields separated by one tab; '#' starts a comment):
#   vhost              <vhost>
#   user               <name>
#   permissions        <user> <configure> <write> <read>
#   topic_permissions  <user> <exchange> <write> <read>
# The password of user <name> is the file $SECRETS_DIR/<name>.
set -uo pipefail

PLAN="${PROVISION_PLAN:-/etc/tessera-provisioning/plan.tsv}"
SECRETS_DIR="${PROVISION_SECRETS_DIR:-/var/run/tessera/users}"
STATE_DIR="${PROVISION_STATE_DIR:-/var/run/tessera/state}"
INTERVAL="${PROVISION_INTERVAL_SECONDS:-300}"
PRUNE="${PROVISION_PRUNE_USERS:-true}"
# Tag on every user this sidecar creates; pruning only ever deletes users carrying it.
MANAGED_TAG="tessera-managed"

log() { printf '%s provision: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
ctl() { rabbitmqctl -q "$@"; }

trap 'log "stopping"; exit 0' TERM INT

vhost=""
users=()
perms=()
topics=()

load_plan() {
    vhost=""; users=(); perms=(); topics=()
    local kind a b c d
    while IFS=$'\t' read -r kind a b c d || [[ -n "${kind:-}" ]]; do
        case "$kind" in
            '' | '#'*) ;;
            vhost) vhost="$a" ;;
            user) users+=("$a") ;;
            permissions) perms+=("$a"$'\t'"$b"$'\t'"$c"$'\t'"$d") ;;
            topic_permissions) topics+=("$a"$'\t'"$b"$'\t'"$c"$'\t'"$d") ;;
            *) log "plan: unknown record '$kind'"; return 1 ;;
        esac
    done <"$PLAN"
    [[ -n "$vhost" && ${#users[@]} -gt 0 ]] || { log "plan $PLAN names no vhost or no user"; return 1; }
}

read_password() {
    local file="$SECRETS_DIR/$1" pw
    [[ -r "$file" ]] || { log "no password file for user $1 at $file (check the Secret named in the values)"; return 1; }
    pw="$(<"$file")"
    # rabbitmqctl reads the password from stdin and trims surrounding whitespace: refuse values it would alter.
    if [[ -z "$pw" || "$pw" =~ ^[[:space:]] || "$pw" =~ [[:space:]]$ || "$pw" == *$'\n'* ]]; then
        log "password of user $1 is empty, multi-line or has surrounding whitespace: fix its Secret"
        return 1
    fi
    printf '%s' "$pw"
}

ensure_user() {
    local name="$1" pw
    pw="$(read_password "$name")" || return 1
    if grep -Fxq -- "$name" <<<"$existing_users"; then
        # Passwords go through stdin, never argv, so they do not show up in the process list.
        if ! printf '%s\n' "$pw" | ctl authenticate_user "$name" >/dev/null 2>&1; then
            printf '%s\n' "$pw" | ctl change_password "$name" >/dev/null || return 1
            log "user $name: password updated from its Secret"
        fi
    else
        printf '%s\n' "$pw" | ctl add_user "$name" >/dev/null || return 1
        log "user $name: created"
    fi
    ctl set_user_tags "$name" "$MANAGED_TAG" >/dev/null
}

apply_once() {
    load_plan || return 1
    if ! ctl list_vhosts --no-table-headers | grep -Fxq -- "$vhost"; then
        ctl add_vhost "$vhost" >/dev/null || return 1
        log "vhost $vhost: created"
    fi
    existing_users="$(ctl list_users --no-table-headers | cut -f1)" || return 1

    # RabbitMQ's image creates guest/guest on a fresh node; nobody in a federation may use it.
    if grep -Fxq guest <<<"$existing_users"; then
        ctl delete_user guest >/dev/null && log "user guest: deleted"
    fi

    local u line user configure write read exchange
    for u in "${users[@]}"; do ensure_user "$u" || return 1; done

    for line in "${perms[@]}"; do
        IFS=$'\t' read -r user configure write read <<<"$line"
        ctl set_permissions -p "$vhost" "$user" "$configure" "$write" "$read" >/dev/null || return 1
    done
    # Set the wanted topic permissions first, then clear stale ones. Never clear-then-set: a user
    # without a topic permission on an exchange may publish any routing key to it.
    for line in "${topics[@]}"; do
        IFS=$'\t' read -r user exchange write read <<<"$line"
        ctl set_topic_permissions -p "$vhost" "$user" "$exchange" "$write" "$read" >/dev/null || return 1
    done
    for u in "${users[@]}"; do
        local have
        have="$(ctl list_user_topic_permissions "$u" --no-table-headers)" || return 1
        while IFS=$'\t' read -r pvhost exchange _; do
            [[ "$pvhost" == "$vhost" && -n "$exchange" ]] || continue
            if ! printf '%s\n' "${topics[@]}" | cut -f1,2 | grep -Fxq -- "$u"$'\t'"$exchange"; then
                ctl clear_topic_permissions -p "$vhost" "$u" "$exchange" >/dev/null || return 1
                log "user $u: cleared stale topic permission on $exchange"
            fi
        done <<<"$have"
    done

    if [[ "$PRUNE" == "true" ]]; then
        local name tags
        while IFS=$'\t' read -r name tags; do
            [[ -n "$name" && "$tags" == *"$MANAGED_TAG"* ]] || continue
            if ! printf '%s\n' "${users[@]}" | grep -Fxq -- "$name"; then
                ctl delete_user "$name" >/dev/null || return 1
                log "user $name: deleted (no longer in the chart's values)"
            fi
        done < <(ctl list_users --no-table-headers)
    fi
    log "vhost $vhost: ${#users[@]} users, ${#perms[@]} permissions, ${#topics[@]} topic permissions applied"
}

mkdir -p "$STATE_DIR"
log "waiting for the broker"
until rabbitmq-diagnostics -q check_running >/dev/null 2>&1; do sleep 3 & wait $!; done

while true; do
    if apply_once; then
        # The container's readiness probe checks this file: the pod serves only once users exist.
        touch "$STATE_DIR/provisioned"
        sleep "$INTERVAL" & wait $!
    else
        log "pass failed; retrying in 15 s"
        sleep 15 & wait $!
    fi
done
