#!/usr/bin/env bash
# Ingest load benchmark (not part of the test suite).
#
# Starts the local stack, builds the ingest in release mode and, in one run,
# measures two producer settings side by side: linger.ms=0 (dlrflow's default)
# and linger.ms=5 (librdkafka's default). For each, wrk posts a Lisoloo event
# with HTTP Basic auth at 1, 10, 50 and 200 concurrent connections. Prints a table
# and writes reports/ingest-bench.md with requests/s, p50, p99 and the
# ingest's peak RSS.
#
#   deploy/bench/ingest.sh [seconds-per-step, default 10]
#   deploy/bench/ingest.sh --tracing [seconds-per-step]
#
# --tracing compares, in one run, traces off (the default), exported at
# ratio 0 (OTEL_TRACES_SAMPLER=traceidratio, ARG=0: a span per request,
# none sampled) and at ratio 1.0 (every request's span exported over
# OTLP/HTTP to a local sink that answers 200), at linger.ms=0; the report is
# reports/ingest-tracing-bench.md.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
MODE=linger
if [ "${1:-}" = "--tracing" ]; then MODE=tracing; shift; fi
DURATION=${1:-10}
PORT=${DLRFLOW_BENCH_PORT:-18080}
ADMIN_PORT=${DLRFLOW_BENCH_ADMIN_PORT:-18081}
OUT=reports/ingest-bench.md
[ "$MODE" = tracing ] && OUT=reports/ingest-tracing-bench.md
mkdir -p reports .stack

deploy/local/stack.sh up
command -v wrk >/dev/null || { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; }
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
cargo build --release -q -p dlrflow-ingest
BIN=target/release/dlrflow-ingest
TOPIC=dlrflow.bench.raw.v1
# A private broker with a fresh SQLite file: the load neither slows nor
# bloats the shared stack's broker that the tests use.
TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
KPORT=${DLRFLOW_BENCH_KAFKA_PORT:-19192}
BDIR=.stack/bench-tansu
rm -rf "$BDIR" && mkdir -p "$BDIR"
(cd "$BDIR" || exit 1
 nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$KPORT" --advertised-listener-url "tcp://127.0.0.1:$KPORT" \
   --storage-engine sqlite://tansu.db >tansu.log 2>&1 </dev/null &
 echo $! >tansu.pid)
trap 'kill "$(cat "$BDIR/tansu.pid")" 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$KPORT") 2>/dev/null && break; sleep 0.1; done
sqlite3 "$BDIR/tansu.db" "create index if not exists dlrflow_header_record on header (topition, offset_id);" 2>/dev/null || true
timeout 30 "$TANSU" topic create "$TOPIC" --partitions 6 --broker "tcp://127.0.0.1:$KPORT" >/dev/null

LUA=.stack/bench-lisoloo.lua
cat >"$LUA" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Basic YmVuY2g6YmVuY2gtcGFzc3dvcmQ="
wrk.body = '{"event_id":"f8a3b7c1-2e4d-4a9b-9d8f-7c6e5b4a3d2c","event_type":"sms.delivered","timestamp":"2026-05-27T10:15:08Z","message_id":"507f1f77bcf86cd799439011","data":{"recipient_phone":"+243998857000","carrier":"vodacom_drc","delivered_at":"2026-05-27T10:15:08Z","segments":1}}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.1f %.1f %.1f\n", summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA

# Each variant: a label, then the environment it adds.
if [ "$MODE" = tracing ]; then
  SINK_PORT=${DLRFLOW_BENCH_OTLP_PORT:-18318}
  python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
' "$SINK_PORT" &
  SINK=$!
  trap 'kill "$(cat "$BDIR/tansu.pid")" "$SINK" 2>/dev/null || true' EXIT
  OTLP="OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT"
  VARIANTS=("off|DLRFLOW_KAFKA__LINGER_MS=0"
    "ratio-0|DLRFLOW_KAFKA__LINGER_MS=0 $OTLP OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0"
    "ratio-1.0|DLRFLOW_KAFKA__LINGER_MS=0 $OTLP OTEL_TRACES_SAMPLER=always_on")
  COLUMN=traces
else
  VARIANTS=("0|DLRFLOW_KAFKA__LINGER_MS=0" "5|DLRFLOW_KAFKA__LINGER_MS=5")
  COLUMN=linger.ms
fi

rows=()
for variant in "${VARIANTS[@]}"; do
  linger=${variant%%|*}
  read -r -a extra <<<"${variant#*|}"
  env DLRFLOW_HTTP__LISTEN=127.0.0.1:$PORT DLRFLOW_HTTP__ADMIN_LISTEN=127.0.0.1:$ADMIN_PORT DLRFLOW_KAFKA__BROKERS=127.0.0.1:$KPORT DLRFLOW_KAFKA__RAW_TOPIC=$TOPIC "${extra[@]}" \
  DLRFLOW_SOURCES='[{name="lisoloo",provider="lisoloo",auth="basic",credentials=[{username="bench",password="bench-password"}]}]' \
  RUST_LOG=warn "$BIN" serve >.stack/bench-ingest.log 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break; sleep 0.1; done
  for c in 1 10 50 200; do
    threads=2; [ "$c" -lt 2 ] && threads=1
    line=$(wrk -t"$threads" -c"$c" -d"${DURATION}s" --latency -s "$LUA" "http://127.0.0.1:$PORT/lisoloo/webhook" | grep '^RESULT')
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    read -r _ reqs errs rps p50 p99 <<<"$line"
    rows+=("| $linger | $c | $rps | $p50 | $p99 | $errs | $((rss / 1024)) |")
    echo "$COLUMN=$linger c=$c: $rps req/s, p50 $p50 ms, p99 $p99 ms, non-2xx/errors $errs, peak RSS $((rss / 1024)) MiB" >&2
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

{
  echo "# Ingest benchmark ($(date -u +%FT%TZ), $(nproc) cores, ${DURATION}s per step)"
  echo
  echo "wrk posting one Lisoloo event with HTTP Basic auth; a private Tansu 0.6.0 (SQLite, fresh file) on 127.0.0.1; acks=all, idempotent."
  echo
  echo "| $COLUMN | connections | requests/s | p50 ms | p99 ms | errors | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT"
