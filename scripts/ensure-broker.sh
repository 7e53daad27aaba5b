#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers for the integration tests.
# - TESSERA_TEST_AMQP_URL set: use that broker, only check that it answers.
# - otherwise the local broker on 127.0.0.1:5672: start it if installed and down, install it with apt-get
#   where it is absent and we are root; fail with instructions where neither works.
set -euo pipefail

url="${TESSERA_TEST_AMQP_URL:-}"
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if [ -n "$url" ]; then
  hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
  host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=5672
  if port_open "$host" "$port"; then echo "broker: using $host:$port from TESSERA_TEST_AMQP_URL"; exit 0; fi
  echo "broker: TESSERA_TEST_AMQP_URL points at $host:$port but nothing answers there" >&2; exit 1
fi

if port_open 127.0.0.1 5672 && rabbitmqctl -q await_startup >/dev/null 2>&1; then
  echo "broker: local RabbitMQ is running"; exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "broker: RabbitMQ is not installed; installing it with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  else
    cat >&2 <<MSG
broker: no RabbitMQ broker is reachable on 127.0.0.1:5672 and it cannot be installed here.
Provide one of:
  - a local RabbitMQ (e.g. 'apt-get install rabbitmq-server'), with rabbitmqctl on PATH; or
  - TESSERA_TEST_AMQP_URL=amqp://user:password@host:5672/ pointing at a broker whose user may create
    vhosts, users and permissions (the integration tests provision their own).
MSG
    exit 1
  fi
fi

echo "broker: starting RabbitMQ"
rabbitmq-server -detached >/dev/null 2>&1 || true
# A single await_startup right after start fails at once, so loop until it succeeds.
if ! timeout 90 sh -c 'until rabbitmqctl -q await_startup >/dev/null 2>&1; do sleep 1; done'; then
  echo "broker: RabbitMQ did not start within 90 s; see /var/log/rabbitmq/" >&2; exit 1
fi
timeout 30 sh -c 'until (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; do sleep 1; done' || {
  echo "broker: RabbitMQ started but 127.0.0.1:5672 does not answer" >&2; exit 1; }
echo "broker: RabbitMQ is up"
