#!/usr/bin/env bash
# dlrflow's local stack without Docker: Redis, PostgreSQL and a Kafka-protocol
# broker (Tansu 0.6.0 on SQLite) on 127.0.0.1, plus dlrflow's topics.
#
#   deploy/local/stack.sh up       start what is missing, create topics, wait
#   deploy/local/stack.sh down     stop only what `up` started
#   deploy/local/stack.sh deps     install the build prerequisites (curl, OpenSSL headers, pkg-config)
#   deploy/local/stack.sh status   what answers, and where the logs are
#   deploy/local/stack.sh restart-broker   kill -9 and restart the broker (fault drills)
#
# Idempotent. Services that already answer are used as they are. Missing
# Debian packages are installed when running as root. State lives in
# $DLRFLOW_STACK_DIR (default: <repo>/.stack).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STACK=${DLRFLOW_STACK_DIR:-$REPO/.stack}
REDIS_PORT=${DLRFLOW_REDIS_PORT:-6379}
PG_PORT=${DLRFLOW_PG_PORT:-5432}
KAFKA_PORT=${DLRFLOW_KAFKA_PORT:-9092}
TANSU_VERSION=0.6.0
PARTITIONS=${DLRFLOW_PARTITIONS:-6}
TOPICS=(dlrflow.webhooks.raw.v1 dlrflow.status.v1 dlrflow.webhooks.dlq.v1 dlrflow.delivery.v1)
DB_NAME=${DLRFLOW_DB_NAME:-dlrflow}
STARTED=$STACK/started

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  die "$2 did not answer on 127.0.0.1:$1 within $3 s"
}

mark_started() { grep -qx "$1" "$STARTED" 2>/dev/null || echo "$1" >>"$STARTED"; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (run as root or install them)"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$STACK/apt.log" 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$STACK/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$STACK/apt.log" 2>&1
  } || die "apt-get install ${missing[*]} failed; see $STACK/apt.log"
}

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

redis_up() {
  if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    log "redis: already running on 127.0.0.1:$REDIS_PORT"
    return
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$STACK/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STACK/redis" --logfile "$STACK/redis.log" --pidfile "$STACK/redis.pid"
  wait_port "$REDIS_PORT" redis 20
  mark_started redis
  log "redis: started on 127.0.0.1:$REDIS_PORT (log $STACK/redis.log)"
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

postgres_up() {
  if ! port_open "$PG_PORT"; then
    [ -n "$(pg_bin)" ] || apt_install postgresql
    local bin; bin=$(pg_bin)
    [ -n "$bin" ] || die "postgresql binaries not found under /usr/lib/postgresql"
    mkdir -p "$STACK"
    if [ ! -f "$STACK/pg/PG_VERSION" ]; then
      mkdir -p "$STACK/pg"
      [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$STACK/pg"
      as_postgres "$bin/initdb" -D "$STACK/pg" -U postgres --auth=trust >"$STACK/initdb.log" 2>&1 \
        || die "initdb failed; see $STACK/initdb.log"
    fi
    touch "$STACK/postgres.log"
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$STACK/postgres.log"
    as_postgres "$bin/pg_ctl" -D "$STACK/pg" -l "$STACK/postgres.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k /tmp" start >/dev/null \
      || die "postgres did not start; see $STACK/postgres.log"
    mark_started postgres
    log "postgres: started on 127.0.0.1:$PG_PORT (data $STACK/pg, log $STACK/postgres.log)"
  else
    log "postgres: already running on 127.0.0.1:$PG_PORT"
  fi
  command -v psql >/dev/null || apt_install postgresql-client
  local i
  for ((i = 0; i < 100; i++)); do
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null \
    || die "cannot connect as postgres to 127.0.0.1:$PG_PORT without a password (trust auth needed)"
  if [ "$(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc "select 1 from pg_database where datname = '$DB_NAME'")" != 1 ]; then
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "create database \"$DB_NAME\"" >/dev/null
    log "postgres: created database $DB_NAME"
  fi
}

tansu_bin() {
  local b
  for b in "$(command -v tansu 2>/dev/null || true)" "$HOME/.cargo/bin/tansu"; do
    [ -n "$b" ] && [ -x "$b" ] && "$b" --version 2>/dev/null | grep -q "$TANSU_VERSION" && { echo "$b"; return 0; }
  done
  return 1
}

tansu_install() {
  tansu_bin >/dev/null && return 0
  log "building tansu $TANSU_VERSION (once; about 8 minutes on 2 cores; log $STACK/tansu-build.log)"
  command -v cmake >/dev/null && [ -n "$(ls /usr/lib/llvm-*/lib/libclang.so* 2>/dev/null)" ] || apt_install libclang-dev cmake
  cargo install tansu --locked --version "$TANSU_VERSION" --features libsql >"$STACK/tansu-build.log" 2>&1 \
    || die "cargo install tansu failed; see $STACK/tansu-build.log"
  tansu_bin >/dev/null || die "tansu $TANSU_VERSION not found after install"
}

broker_start() {
  local bin; bin=$(tansu_bin)
  mkdir -p "$STACK/tansu"
  # The SQLite path is resolved against the working directory.
  (
    cd "$STACK/tansu" || exit 1
    nohup "$bin" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine sqlite://tansu.db >>"$STACK/tansu.log" 2>&1 </dev/null &
    echo $! >"$STACK/tansu.pid"
  )
  wait_port "$KAFKA_PORT" tansu 30
  index_headers
}

# Tansu 0.6.0's `header` table has no index, so every fetch of a record with
# headers scans all header rows of all topics: consumers slow down as the
# database grows. This adds the index (idempotent).
index_headers() {
  # apt_install exits on failure (die): a subshell keeps a missing sqlite3 optional.
  command -v sqlite3 >/dev/null || (apt_install sqlite3) || true
  command -v sqlite3 >/dev/null || { log "kafka: sqlite3 missing; Tansu's header table stays unindexed (slow fetches)"; return 0; }
  local i
  for ((i = 0; i < 100; i++)); do
    sqlite3 "$STACK/tansu/tansu.db" \
      "create index if not exists dlrflow_header_record on header (topition, offset_id);" 2>/dev/null && return 0
    sleep 0.1
  done
  log "kafka: could not index Tansu's header table in $STACK/tansu/tansu.db"
}

# A Kafka API call, not just an open port: Tansu 0.6.0 keeps listening after
# its storage task panicked, then fails every request.
broker_healthy() {
  local bin; bin=$(tansu_bin) || return 0
  create_topic "$bin" dlrflow.healthcheck 1 >/dev/null
}

# Creates a topic; an existing one is fine. One small request, however many
# topics the broker holds.
create_topic() { # bin name partitions
  local out
  if out=$(timeout 20 "$1" topic create "$2" --partitions "$3" --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>&1); then
    echo created
  elif grep -q "already exists" <<<"$out"; then
    echo exists
  else
    printf '%s\n' "$out" >>"$STACK/tansu.log"
    return 1
  fi
}

broker_up() {
  if port_open "$KAFKA_PORT" && ! broker_healthy; then
    if [ -f "$STACK/tansu.pid" ] && kill -0 "$(cat "$STACK/tansu.pid")" 2>/dev/null; then
      log "kafka: the broker on 127.0.0.1:$KAFKA_PORT listens but fails requests; restarting it (log $STACK/tansu.log)"
      cp "$STACK/tansu.log" "$STACK/tansu.log.$(date +%s)" 2>/dev/null || true
      kill -9 "$(cat "$STACK/tansu.pid")" 2>/dev/null || true
      local i
      for ((i = 0; i < 50; i++)); do port_open "$KAFKA_PORT" || break; sleep 0.1; done
    else
      die "a broker listens on 127.0.0.1:$KAFKA_PORT but fails requests, and this script did not start it"
    fi
  fi
  if port_open "$KAFKA_PORT"; then
    log "kafka: a broker already answers on 127.0.0.1:$KAFKA_PORT"
    [ -f "$STACK/tansu/tansu.db" ] && index_headers
  else
    tansu_install
    broker_start
    mark_started tansu
    log "kafka: tansu $TANSU_VERSION started on 127.0.0.1:$KAFKA_PORT (data $STACK/tansu/tansu.db, log $STACK/tansu.log)"
  fi
  topics_up
}

topics_up() {
  local bin; bin=$(tansu_bin) || { log "kafka: tansu CLI not available; create topics ${TOPICS[*]} yourself"; return; }
  local t res
  for t in "${TOPICS[@]}"; do
    res=$(create_topic "$bin" "$t" "$PARTITIONS") || die "creating topic $t failed; see $STACK/tansu.log"
    [ "$res" = created ] && log "kafka: created topic $t ($PARTITIONS partitions)"
  done
  return 0
}

stop_pidfile() { # name pidfile
  [ -f "$2" ] || return 0
  local pid; pid=$(cat "$2")
  if kill "$pid" 2>/dev/null; then
    local i
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "$1: stopped"
  fi
  rm -f "$2"
}

# What building dlrflow and running its scripts needs besides Rust.
cmd_deps() {
  # The demo and the benchmarks talk HTTP with curl.
  command -v curl >/dev/null || apt_install curl
  # dlrflow's Kafka client (librdkafka with TLS/SASL) links the system's
  # OpenSSL: building it needs the headers and pkg-config.
  { [ -f /usr/include/openssl/ssl.h ] && command -v pkg-config >/dev/null; } || apt_install libssl-dev pkg-config
}

cmd_up() {
  mkdir -p "$STACK"
  cmd_deps
  redis_up
  postgres_up
  broker_up
  cat >&2 <<INFO
[stack] ready:
[stack]   DLRFLOW_KAFKA__BROKERS=127.0.0.1:$KAFKA_PORT
[stack]   DLRFLOW_REDIS__URL=redis://127.0.0.1:$REDIS_PORT
[stack]   DLRFLOW_POSTGRES__URL=postgres://postgres@127.0.0.1:$PG_PORT/$DB_NAME
INFO
}

cmd_down() {
  [ -f "$STARTED" ] || { log "nothing was started by this script"; return 0; }
  if grep -qx tansu "$STARTED"; then stop_pidfile tansu "$STACK/tansu.pid"; fi
  if grep -qx redis "$STARTED"; then stop_pidfile redis "$STACK/redis.pid"; fi
  if grep -qx postgres "$STARTED"; then
    as_postgres "$(pg_bin)/pg_ctl" -D "$STACK/pg" -m fast stop >/dev/null 2>&1 && log "postgres: stopped"
  fi
  rm -f "$STARTED"
}

cmd_status() {
  local ok=0
  if port_open "$REDIS_PORT"; then log "redis: up on 127.0.0.1:$REDIS_PORT"; else log "redis: down"; ok=1; fi
  if port_open "$PG_PORT"; then log "postgres: up on 127.0.0.1:$PG_PORT"; else log "postgres: down"; ok=1; fi
  if port_open "$KAFKA_PORT" && broker_healthy; then log "kafka: up on 127.0.0.1:$KAFKA_PORT"
  elif port_open "$KAFKA_PORT"; then log "kafka: listening on 127.0.0.1:$KAFKA_PORT but failing requests (run: $0 up)"; ok=1
  else log "kafka: down"; ok=1; fi
  [ -f "$STARTED" ] && log "started by this script: $(tr '\n' ' ' <"$STARTED") (logs in $STACK)"
  return $ok
}

cmd_restart_broker() {
  [ -f "$STACK/tansu.pid" ] || die "the broker was not started by this script"
  kill -9 "$(cat "$STACK/tansu.pid")" 2>/dev/null || true
  local i
  for ((i = 0; i < 50; i++)); do port_open "$KAFKA_PORT" || break; sleep 0.1; done
  broker_start
  log "kafka: broker restarted"
}

case "${1:-}" in
  up) cmd_up ;;
  deps) cmd_deps ;;
  down) cmd_down ;;
  status) cmd_status ;;
  restart-broker) cmd_restart_broker ;;
  *) echo "usage: $0 up|deps|down|status|restart-broker" >&2; exit 2 ;;
esac
