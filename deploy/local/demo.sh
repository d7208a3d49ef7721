#!/usr/bin/env bash
# The end-to-end demo: local stack, the ingest, one Lisoloo event posted with
# curl, and its record read back from the raw topic.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
STACK=${DLRFLOW_STACK_DIR:-$REPO/.stack}
INGEST_PORT=${DLRFLOW_DEMO_INGEST_PORT:-8080}

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "1. local stack (Redis, PostgreSQL, Tansu)"
deploy/local/stack.sh up

step "2. build"
cargo build -q -p dlrflow-ingest

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

step "3. ingest on 127.0.0.1:$INGEST_PORT (log $STACK/demo-ingest.log)"
export DLRFLOW_SOURCES='[{name="lisoloo",provider="lisoloo",auth="basic",credentials=[{username="demo",password="demo-password"}]},{name="arpoone",provider="arpoone",auth="basic",credentials=[{username="demo",password="demo-password"}]}]'
DLRFLOW_HTTP__LISTEN=127.0.0.1:$INGEST_PORT target/debug/dlrflow-ingest serve >"$STACK/demo-ingest.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$INGEST_PORT/readyz" >/dev/null && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:$INGEST_PORT/readyz"; echo

step "4. a Lisoloo sms.delivered event, posted with curl"
MID=$(printf '%024x' "$(date +%s%N)" | tail -c 24)
EVENT=$(printf '{"event_id":"%s","event_type":"sms.delivered","timestamp":"2026-05-27T10:15:08Z","message_id":"%s","data":{"recipient_phone":"+243998857000","carrier":"vodacom_drc","delivered_at":"2026-05-27T10:15:08Z","segments":1}}' "$(cat /proc/sys/kernel/random/uuid)" "$MID")
echo "$EVENT"
curl -sS -o /dev/null -w 'HTTP %{http_code} in %{time_total}s\n' -u demo:demo-password \
  -H 'Content-Type: application/json' --data-binary "$EVENT" "http://127.0.0.1:$INGEST_PORT/lisoloo/webhook"

step "5. the record in dlrflow.webhooks.raw.v1 (dlrflow-ingest tail)"
{ target/debug/dlrflow-ingest tail --topic dlrflow.webhooks.raw.v1 --count 1000000 --timeout-secs 3 2>/dev/null || true; } | grep "$MID" || {
  echo "record for $MID not found" >&2; exit 1; }
