#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside the shared broker on 5672 (which it never touches):
#
#   bash scripts/rabbitmq-cluster.sh start    # three nodes, joined with rabbitmqctl join_cluster
#   bash scripts/rabbitmq-cluster.sh status   # which nodes run, and the cluster as node 1 sees it
#   bash scripts/rabbitmq-cluster.sh stop     # shutdown (SIGKILL what will not stop), remove the data
#
# Each node has its own node name (${TESSERA_CLUSTER_NAME}1@localhost ...), AMQP port (TESSERA_CLUSTER_PORT,
# +1, +2) and distribution port (+100 each), below the kernel's ephemeral range so that no client socket can
# take a stopped node's port (see tests/integration/private_broker.py), and its own config, data and log
# directories under TESSERA_CLUSTER_DIR. No plugins (no management listener). The nodes run as the rabbitmq
# user (Debian's wrappers switch to it when called as root), so they share its Erlang cookie, which
# clustering needs, with rabbitmqctl. Needs root and Debian's rabbitmq-server.
#
# start prints the nodes' AMQP URLs and writes them, one per line, to $TESSERA_CLUSTER_DIR/urls.
set -euo pipefail

command=${1:-status}
base_port=${TESSERA_CLUSTER_PORT:-27101}
dir=${TESSERA_CLUSTER_DIR:-/tmp/tessera-rmq-cluster}
name=${TESSERA_CLUSTER_NAME:-tessera-c}
start_timeout=${TESSERA_CLUSTER_START_TIMEOUT:-120}
nodes=(1 2 3)

node_name() { echo "${name}$1@localhost"; }
amqp_port() { echo $((base_port + $1 - 1)); }
dist_port() { echo $((base_port + 100 + $1 - 1)); }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Run "$@" with node $1's environment (the same variables tests/integration/private_broker.py sets).
with_node() {
  local i=$1 d="$dir/node$1"
  shift
  env -u RABBITMQ_NODENAME -u RABBITMQ_NODE_PORT \
    RABBITMQ_NODENAME="$(node_name "$i")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(amqp_port "$i")" \
    RABBITMQ_DIST_PORT="$(dist_port "$i")" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_PID_FILE="$d/node.pid" \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$@"
}
ctl() { local i=$1; shift; with_node "$i" rabbitmqctl -q -n "$(node_name "$i")" "$@"; }

await_node() {
  local i=$1 deadline=$((SECONDS + start_timeout))
  # Poll the AMQP port (cheap) before asking rabbitmqctl, whose own Erlang VM would compete with the
  # booting nodes for the CPU; await_startup then fails at once while the node is not registered yet.
  until port_open "$(amqp_port "$i")" && ctl "$i" await_startup --timeout 10 >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "rabbitmq-cluster: node $(node_name "$i") did not start in ${start_timeout} s" >&2
      tail -n 30 "$dir/node$i"/log/*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.3
  done
}

start() {
  [ "$(id -u)" = 0 ] || { echo "rabbitmq-cluster: needs root (the nodes run as the rabbitmq user)" >&2; exit 2; }
  command -v rabbitmq-server >/dev/null && command -v rabbitmqctl >/dev/null \
    || { echo "rabbitmq-cluster: needs rabbitmq-server and rabbitmqctl on PATH" >&2; exit 2; }
  id rabbitmq >/dev/null 2>&1 || { echo "rabbitmq-cluster: needs the rabbitmq user" >&2; exit 2; }
  for i in "${nodes[@]}"; do
    for port in "$(amqp_port "$i")" "$(dist_port "$i")"; do
      if port_open "$port"; then echo "rabbitmq-cluster: port $port is taken" >&2; exit 1; fi
    done
  done
  mkdir -p "$dir"
  for i in "${nodes[@]}"; do
    local d="$dir/node$i"
    mkdir -p "$d/mnesia" "$d/log"
    cat >"$d/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$i")
loopback_users = none
# The machine is shared and busy; a tiny disk or memory alarm would block publishers mid-test.
disk_free_limit.absolute = 10MB
CONF
    echo "[]." >"$d/enabled_plugins"
    echo "ERL_EPMD_ADDRESS=127.0.0.1" >"$d/rabbitmq-env.conf"
  done
  chown -R rabbitmq:rabbitmq "$dir"
  chmod 755 "$dir"
  # Start all three at once (each boot takes seconds on a busy machine), then join 2 and 3 to 1.
  for i in "${nodes[@]}"; do with_node "$i" rabbitmq-server -detached >/dev/null; done
  for i in "${nodes[@]}"; do await_node "$i"; done
  echo "rabbitmq-cluster: nodes up after ${SECONDS} s" >&2
  # One node at a time: two nodes joining at once race in the schema database (a clean CI run once failed
  # start_app with {badmatch,{error,{normal,{mnesia_app,start,...}}}} that way).
  for i in "${nodes[@]:1}"; do
    ctl "$i" stop_app >/dev/null
    ctl "$i" join_cluster "$(node_name 1)" >/dev/null
    ctl "$i" start_app >/dev/null
  done
  echo "rabbitmq-cluster: joined after ${SECONDS} s" >&2
  : >"$dir/urls"
  for i in "${nodes[@]}"; do echo "amqp://127.0.0.1:$(amqp_port "$i")/" | tee -a "$dir/urls"; done
  running=$(ctl 1 eval 'length(rabbit_nodes:all_running()).')
  if [ "$running" != 3 ]; then echo "rabbitmq-cluster: $running nodes running, not 3" >&2; exit 1; fi
}

stop() {
  # All three at once; whatever has not stopped after shutdown (or a minute) is SIGKILLed.
  for i in "${nodes[@]}"; do
    if port_open "$(amqp_port "$i")" || [ -s "$dir/node$i/node.pid" ]; then
      ctl "$i" --timeout 60 shutdown >/dev/null 2>&1 &
    fi
  done
  wait || true
  for i in "${nodes[@]}"; do
    local pidfile="$dir/node$i/node.pid"
    if [ -s "$pidfile" ]; then kill -9 "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
  case "$dir" in /tmp/*) rm -rf "$dir" ;; *) echo "rabbitmq-cluster: left $dir in place" ;; esac
}

status() {
  local up=0
  for i in "${nodes[@]}"; do
    if port_open "$(amqp_port "$i")"; then
      echo "$(node_name "$i") amqp://127.0.0.1:$(amqp_port "$i")/ running"
      up=$((up + 1))
    else
      echo "$(node_name "$i") amqp://127.0.0.1:$(amqp_port "$i")/ down"
    fi
  done
  for i in "${nodes[@]}"; do
    if port_open "$(amqp_port "$i")"; then ctl "$i" cluster_status; break; fi
  done
  [ $up -gt 0 ]
}

case "$command" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
