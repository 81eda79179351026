#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on their usual local ports,
# starting any that is down with the commands of ../shared/DESIGN.md.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # name port seconds
  for _ in $(seq 1 $(( $3 * 5 ))); do
    if port_open "$2"; then echo "services: $1 is up on :$2"; return 0; fi
    sleep 0.2
  done
  echo "services: $1 did not come up on :$2 within $3 s" >&2
  return 1
}

if ! port_open 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
fi
if ! port_open 6379; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! port_open 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached
fi

wait_for PostgreSQL 5432 60
wait_for Redis 6379 30
wait_for RabbitMQ 5672 120
if command -v pg_isready >/dev/null; then
  for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
