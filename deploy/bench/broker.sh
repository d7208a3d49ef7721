# Sourced by the benchmarks: a private Tansu 0.6.0 on a fresh SQLite file
# (with the header index the stack script adds), so a benchmark neither slows
# nor bloats the shared stack's broker, and no run pays for an earlier run's
# data. Needs the stack's tansu (deploy/local/stack.sh up builds it).
#
#   fresh_broker [topic partitions=6]...   (re)start it, create the topics
#   stop_broker
# KPORT (default 19192) is its port; BDIR its directory.
KPORT=${DLRFLOW_BENCH_KAFKA_PORT:-19192}
BDIR=${BDIR:-.stack/bench-tansu}
TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")

stop_broker() {
  if [ -f "$BDIR/tansu.pid" ]; then
    kill "$(cat "$BDIR/tansu.pid")" 2>/dev/null || true
    rm -f "$BDIR/tansu.pid"
    sleep 0.5
  fi
}

fresh_broker() {
  stop_broker
  rm -rf "$BDIR" && mkdir -p "$BDIR"
  (cd "$BDIR" || exit 1
   nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$KPORT" --advertised-listener-url "tcp://127.0.0.1:$KPORT" \
     --storage-engine sqlite://tansu.db >tansu.log 2>&1 </dev/null &
   echo $! >tansu.pid)
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$KPORT") 2>/dev/null && break; sleep 0.1; done
  sqlite3 "$BDIR/tansu.db" "create index if not exists dlrflow_header_record on header (topition, offset_id);" 2>/dev/null || true
  local t
  for t in "$@"; do
    timeout 30 "$TANSU" topic create "$t" --partitions 6 --broker "tcp://127.0.0.1:$KPORT" >/dev/null
  done
}
