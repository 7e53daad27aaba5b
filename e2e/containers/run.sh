#!/usr/bin/env bash
# The container end-to-end run (e2e/containers/test_container_rollout.py): builds the images, then runs the
# rendered charts as docker containers (broker, curator, three companies in their own networks).
#
#   e2e/containers/run.sh                 # install docker.io/debootstrap and start dockerd if needed (root),
#                                         # build, test, stop what it started
#   TESSERA_KEEP_ENGINE=1 e2e/containers/run.sh    # leave a dockerd this script started running
#   e2e/containers/run.sh --stop-engine            # stop such a kept dockerd and restore the network rules
#   TESSERA_SKIP_BUILD=1 e2e/containers/run.sh     # images tessera-{curator,participant}:<version> exist
#
# Extra arguments go to pytest. Exits 2, running nothing, when no engine can be had (and says why).
# A dockerd started here is stopped at the end, and the iptables rules and the docker0 bridge it created
# are removed (the rule sets saved before it started are restored), so the host is left as it was.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing() { echo "e2e/containers: $1" >&2; exit 2; }
[[ -x .venv/bin/python ]] || missing "no virtualenv: run \`make venv\` first"

# The one-time engine setup, done here where it can be (root with apt-get): Debian's docker.io (dockerd, the
# CLI) and debootstrap (the base image of scripts/make-base-image.sh, since no image can be pulled here).
if { ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; } && ! docker info >/dev/null 2>&1 \
  && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "e2e/containers: installing Debian's docker.io and debootstrap with apt-get (one-time engine setup)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null 2>&1 \
      || echo "e2e/containers: apt-get could not install docker.io/debootstrap" >&2
  }
fi
command -v docker >/dev/null || missing "no docker CLI (Debian: apt-get install docker.io), so no container e2e"

state=".tools/e2e-engine"
stop_engine() {
  local pid
  pid="$(cat "$state/dockerd.pid" 2>/dev/null || true)"
  [[ -n "$pid" ]] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  # dockerd leaves its NAT/filter chains (and a FORWARD policy of DROP) and the default bridge behind: put
  # the host back as it was. iptables-restore only replaces the tables its input names, so every table is
  # emptied first (an empty saved dump, no rules before, restores nothing by itself).
  local tool table
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle raw; do
      "$tool" -t "$table" -F 2>/dev/null || true
      "$tool" -t "$table" -X 2>/dev/null || true
    done
    for chain in INPUT FORWARD OUTPUT; do "$tool" -P "$chain" ACCEPT 2>/dev/null || true; done
    "$tool-restore" <"$state/$tool.before" 2>/dev/null || true
  done
  # iptables-nft leaves the (now empty) nf_tables tables it created: delete those that were not there before.
  if command -v nft >/dev/null && [[ -e "$state/nft.before" ]]; then
    nft list tables 2>/dev/null | while read -r _ family name; do
      grep -qx "table $family $name" "$state/nft.before" || nft delete table "$family" "$name" 2>/dev/null || true
    done
  fi
  if [[ ! -e "$state/docker0.existed" ]]; then ip link delete docker0 2>/dev/null || true; fi
  rm -f "$state/dockerd.pid"
  echo "e2e/containers: stopped the dockerd it started and removed its network rules"
}
if [[ "${1:-}" == "--stop-engine" ]]; then stop_engine; exit 0; fi

if ! docker info >/dev/null 2>&1; then
  [[ "$(id -u)" == 0 ]] && command -v dockerd >/dev/null \
    || missing "no container engine answers \`docker info\`, and none can be started here (needs root and dockerd)"
  mkdir -p "$state"
  iptables-save >"$state/iptables.before" 2>/dev/null || true
  ip6tables-save >"$state/ip6tables.before" 2>/dev/null || true
  if command -v nft >/dev/null; then nft list tables >"$state/nft.before" 2>/dev/null || true; fi
  rm -f "$state/docker0.existed"; ip link show docker0 >/dev/null 2>&1 && : >"$state/docker0.existed"
  echo "e2e/containers: starting dockerd (log: $state/dockerd.log)"
  dockerd --pidfile "$state/dockerd.pid" >"$state/dockerd.log" 2>&1 &
  if [[ -z "${TESSERA_KEEP_ENGINE:-}" ]]; then trap stop_engine EXIT; fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || missing "dockerd did not come up: $(tail -3 "$state/dockerd.log")"
fi

if [[ -z "${TESSERA_SKIP_BUILD:-}" ]]; then bash scripts/build-images.sh; fi
if [[ ! -x .tools/bin/helm ]] && ! command -v helm >/dev/null; then bash scripts/install-helm.sh; fi

started=$SECONDS
# The image tests too: with an engine and the images here, a skip would hide a failure.
TESSERA_IMAGE_TESTS=require TESSERA_E2E_CONTAINERS=1 .venv/bin/python -m pytest tests/images e2e/containers \
  -v -rs -s -p no:cacheprovider "$@"
echo "e2e/containers: $((SECONDS - started)) s"
