#!/usr/bin/env bash
# Ingest load benchmark (not part of the test suite).
#
# Starts the local stack, builds the ingest in release mode and measures, in
# one run, several receivers or settings side by side. wrk posts one Lisoloo
# `sms.delivered` event with HTTP Basic auth; every receiver answers 2xx only
# after `acks=all` from an idempotent producer. Each variant gets a private
# Tansu 0.6.0 on a fresh SQLite file (with the header index), so the load
# neither slows nor bloats the shared stack's broker and no variant pays for
# an earlier one's data. Prints a table and writes a report under reports/
# with requests/s, p50, p99, errors and the receiver's peak RSS.
#
#   deploy/bench/ingest.sh [seconds-per-step, default 8]
#       --compare (the default): dlrflow-ingest (defaults) beside a
#       seed-style receiver — the Lisoloo configuration page's FastAPI snippet
#       plus a confluent-kafka producer (deploy/bench/seed_receiver.py, uvicorn,
#       2 workers) — at 10, 50 and 200 connections, wrk with 1 thread as in
#       issue 13's method. Report: reports/ingest-bench.md.
#       DLRFLOW_BENCH_BASELINE_BIN=path (and _LABEL=text) adds another
#       dlrflow-ingest build (an earlier commit, say) to the same run.
#   deploy/bench/ingest.sh --linger [seconds]
#       linger.ms=0, 1 and 5 (librdkafka's default) at 1, 10, 50 and
#       200 connections. Report: reports/ingest-linger-bench.md.
#   deploy/bench/ingest.sh --tracing [seconds]
#       traces off (the default), exported at ratio 0 (a span per request,
#       none sampled) and at ratio 1.0 (every span exported over OTLP/HTTP to
#       a local sink that answers 200). Report: reports/ingest-tracing-bench.md.
#
# The seed-style receiver needs Python 3 with venv; its packages (fastapi,
# uvicorn, confluent-kafka) go into .stack/seed-venv from PyPI, once.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
MODE=compare
case "${1:-}" in
  --compare) shift ;;
  --linger) MODE=linger; shift ;;
  --tracing) MODE=tracing; shift ;;
esac
DURATION=${1:-8}
PORT=${DLRFLOW_BENCH_PORT:-18080}
ADMIN_PORT=${DLRFLOW_BENCH_ADMIN_PORT:-18081}
KPORT=${DLRFLOW_BENCH_KAFKA_PORT:-19192}
mkdir -p reports .stack

deploy/local/stack.sh up
command -v wrk >/dev/null || { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; }
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
cargo build --release -q -p dlrflow-ingest
BIN=target/release/dlrflow-ingest
TOPIC=dlrflow.bench.raw.v1
# shellcheck source=deploy/bench/broker.sh
. deploy/bench/broker.sh
SINK=""
cleanup() {
  stop_broker
  [ -n "$SINK" ] && kill "$SINK" 2>/dev/null || true
}
trap cleanup EXIT

LUA=.stack/bench-lisoloo.lua
cat >"$LUA" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Basic YmVuY2g6YmVuY2gtcGFzc3dvcmQ="
wrk.body = '{"event_id":"f8a3b7c1-2e4d-4a9b-9d8f-7c6e5b4a3d2c","event_type":"sms.delivered","timestamp":"2026-05-27T10:15:08Z","message_id":"507f1f77bcf86cd799439011","data":{"recipient_phone":"+243998857000","carrier":"vodacom_drc","delivered_at":"2026-05-27T10:15:08Z","segments":1}}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.1f %.2f %.2f\n", summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA

SEED_VENV=.stack/seed-venv
seed_env() {
  if [ ! -x "$SEED_VENV/bin/uvicorn" ]; then
    echo "[bench] installing fastapi, uvicorn, confluent-kafka into $SEED_VENV (once)" >&2
    python3 -m venv "$SEED_VENV"
    "$SEED_VENV/bin/pip" install -q fastapi 'uvicorn[standard]' confluent-kafka >&2
  fi
}

INGEST_ENV=(DLRFLOW_HTTP__LISTEN=127.0.0.1:$PORT DLRFLOW_HTTP__ADMIN_LISTEN=127.0.0.1:$ADMIN_PORT
  DLRFLOW_KAFKA__BROKERS=127.0.0.1:$KPORT DLRFLOW_KAFKA__RAW_TOPIC=$TOPIC RUST_LOG=warn
  'DLRFLOW_SOURCES=[{name="lisoloo",provider="lisoloo",auth="basic",credentials=[{username="bench",password="bench-password"}]}]')

# Starts a variant's receiver in the background; sets PID (the process whose
# tree's RSS is measured) and waits until it answers.
start_receiver() {
  local kind=$1; shift
  case "$kind" in
    ingest|baseline)
      local bin=$BIN; [ "$kind" = baseline ] && bin=$BASELINE_BIN
      env "${INGEST_ENV[@]}" "$@" "$bin" serve >.stack/bench-receiver.log 2>&1 &
      PID=$!
      for _ in $(seq 100); do curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && return; sleep 0.1; done ;;
    seed)
      env LISOLOO_WEBHOOK_USER=bench LISOLOO_WEBHOOK_PASS=bench-password BENCH_KAFKA_BROKERS=127.0.0.1:$KPORT \
        BENCH_KAFKA_TOPIC=$TOPIC PYTHONPATH=deploy/bench \
        "$SEED_VENV/bin/uvicorn" seed_receiver:app --host 127.0.0.1 --port "$PORT" --workers 2 --log-level warning \
        >.stack/bench-receiver.log 2>&1 &
      PID=$!
      for _ in $(seq 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/lisoloo/webhook")" = 401 ] && return
        sleep 0.1
      done ;;
  esac
  echo "[bench] the $kind receiver did not come up; log: .stack/bench-receiver.log" >&2
  exit 1
}

# Peak RSS (VmHWM) of PID and its children (uvicorn's workers), MiB.
peak_rss() {
  local total=0 p
  for p in "$PID" $(pgrep -P "$PID" || true); do
    total=$((total + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  echo $((total / 1024))
}

# Each variant: label|receiver kind|environment it adds.
case "$MODE" in
  compare)
    seed_env
    VARIANTS=("dlrflow-ingest|ingest|" "seed-style FastAPI + confluent-kafka, 2 workers|seed|")
    # Another build of the ingest (an earlier commit, say) in the same run.
    BASELINE_BIN=${DLRFLOW_BENCH_BASELINE_BIN:-}
    [ -n "$BASELINE_BIN" ] && VARIANTS=("dlrflow-ingest baseline (${DLRFLOW_BENCH_BASELINE_LABEL:-$BASELINE_BIN})|baseline|" "${VARIANTS[@]}")
    CONNS=(10 50 200); THREADS=1; COLUMN=receiver; OUT=reports/ingest-bench.md ;;
  linger)
    VARIANTS=("0|ingest|DLRFLOW_KAFKA__LINGER_MS=0" "1|ingest|DLRFLOW_KAFKA__LINGER_MS=1" "5|ingest|DLRFLOW_KAFKA__LINGER_MS=5")
    CONNS=(1 10 50 200); THREADS=2; COLUMN=linger.ms; OUT=reports/ingest-linger-bench.md ;;
  tracing)
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
    OTLP="OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT"
    VARIANTS=("off|ingest|DLRFLOW_KAFKA__LINGER_MS=0"
      "ratio-0|ingest|DLRFLOW_KAFKA__LINGER_MS=0 $OTLP OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0"
      "ratio-1.0|ingest|DLRFLOW_KAFKA__LINGER_MS=0 $OTLP OTEL_TRACES_SAMPLER=always_on")
    CONNS=(1 10 50 200); THREADS=2; COLUMN=traces; OUT=reports/ingest-tracing-bench.md ;;
esac

rows=()
for variant in "${VARIANTS[@]}"; do
  IFS='|' read -r label kind extra_s <<<"$variant"
  read -r -a extra <<<"$extra_s"
  fresh_broker "$TOPIC"
  start_receiver "$kind" "${extra[@]}"
  # A second of warm-up (connections, the producer's first metadata), not counted.
  wrk -t1 -c10 -d1s -s "$LUA" "http://127.0.0.1:$PORT/lisoloo/webhook" >/dev/null
  for c in "${CONNS[@]}"; do
    t=$THREADS; [ "$c" -lt "$t" ] && t=$c
    line=$(wrk -t"$t" -c"$c" -d"${DURATION}s" --latency -s "$LUA" "http://127.0.0.1:$PORT/lisoloo/webhook" | grep '^RESULT')
    rss=$(peak_rss)
    read -r _ reqs errs rps p50 p99 <<<"$line"
    rows+=("| $label | $c | $rps | $p50 | $p99 | $errs | $rss |")
    echo "$COLUMN=$label c=$c: $rps req/s, p50 $p50 ms, p99 $p99 ms, non-2xx/errors $errs, peak RSS $rss MiB" >&2
  done
  pkill -P "$PID" 2>/dev/null || true
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
done

{
  echo "# Ingest benchmark ($(date -u +%FT%TZ), $(nproc) cores, ${DURATION}s per step)"
  echo
  echo "Command: \`deploy/bench/ingest.sh --$MODE $DURATION\`. wrk (${THREADS} thread(s)) posting one Lisoloo event with HTTP Basic auth;"
  echo "a private Tansu 0.6.0 (SQLite, fresh file per variant, header index) on 127.0.0.1; acks=all, idempotent; 2xx only after the acknowledgement."
  echo
  echo "| $COLUMN | connections | requests/s | p50 ms | p99 ms | errors | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT"
