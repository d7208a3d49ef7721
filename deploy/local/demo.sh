#!/usr/bin/env bash
# The end-to-end demo: local stack, the three services, one Lisoloo event
# posted with curl (and read back from the raw topic), then a simulated
# Lisoloo send with duplicates, reordering and withheld terminal events, the
# verification table, and one message through the read API. Ends by itself:
# exit 0 when every recipient matches the simulator's ground truth; stops the
# services it started (the stack stays up: `deploy/local/stack.sh down`).
#
# Knobs (environment): DLRFLOW_DEMO_MESSAGES (200), DLRFLOW_DEMO_RECIPIENTS (5),
# DLRFLOW_DEMO_{INGEST,STATE,STATUS}_PORT (8080, 8081, 8090), the admin
# listeners (/healthz, /readyz, /metrics) DLRFLOW_DEMO_{INGEST,STATE,RECONCILE}_ADMIN_PORT
# (9080, 9081, 9082),
# DLRFLOW_KAFKA_PORT (9092), DLRFLOW_STACK_DIR (<repo>/.stack).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
STACK=${DLRFLOW_STACK_DIR:-$REPO/.stack}
KAFKA_PORT=${DLRFLOW_KAFKA_PORT:-9092}
BROKERS=127.0.0.1:$KAFKA_PORT
INGEST_PORT=${DLRFLOW_DEMO_INGEST_PORT:-8080}
STATE_PORT=${DLRFLOW_DEMO_STATE_PORT:-8081}
INGEST_ADMIN_PORT=${DLRFLOW_DEMO_INGEST_ADMIN_PORT:-9080}
STATE_ADMIN_PORT=${DLRFLOW_DEMO_STATE_ADMIN_PORT:-9081}
RECONCILE_ADMIN_PORT=${DLRFLOW_DEMO_RECONCILE_ADMIN_PORT:-9082}
STATUS_PORT=${DLRFLOW_DEMO_STATUS_PORT:-8090}
MESSAGES=${DLRFLOW_DEMO_MESSAGES:-200}
RECIPIENTS=${DLRFLOW_DEMO_RECIPIENTS:-5}
STATUS_KEY=demo-status-key
BIN=${CARGO_TARGET_DIR:-$REPO/target}/debug

# Everything of this run is its own: topics, consumer group, schema, Redis
# prefix. Old runs' data never slows this one down.
RUN=demo_$(date +%Y%m%d_%H%M%S)
RUN_DIR=$STACK/demo/$RUN
RAW=demo.$RUN.raw
STATUS=demo.$RUN.status
DLQ=demo.$RUN.dlq
DELIVERY=demo.$RUN.delivery

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

step "1. local stack (Redis, PostgreSQL, Tansu)"
deploy/local/stack.sh up

step "2. build"
cargo build -q -p dlrflow-ingest -p dlrflow-state -p dlrflow-reconcile -p dlrflow-sim

mkdir -p "$RUN_DIR"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

step "3. topics of this run ($RAW, $STATUS, $DLQ, $DELIVERY)"
TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
for t in "$RAW" "$STATUS" "$DLQ" "$DELIVERY"; do
  "$TANSU" topic create "$t" --partitions 6 --broker "tcp://$BROKERS" >>"$RUN_DIR/topics.log" 2>&1 \
    || die "creating topic $t failed; see $RUN_DIR/topics.log"
done
echo "created; logs of this run in $RUN_DIR"

wait_ready() { # name admin-port log
  local i
  for i in $(seq 300); do
    curl -fs "http://127.0.0.1:$2/readyz" >/dev/null 2>&1 && { echo "$1 ready (admin 127.0.0.1:$2, log $3)"; return 0; }
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.2
  done
  tail -n 20 "$3" >&2
  die "$1 did not become ready on 127.0.0.1:$2; see $3"
}

step "4. services: ingest, state, reconcile"
export DLRFLOW_KAFKA__BROKERS=$BROKERS
export DLRFLOW_REDIS__URL=redis://127.0.0.1:${DLRFLOW_REDIS_PORT:-6379}
export DLRFLOW_POSTGRES__URL=postgres://postgres@127.0.0.1:${DLRFLOW_PG_PORT:-5432}/dlrflow
export DLRFLOW_POSTGRES__SCHEMA=$RUN
export DLRFLOW_KAFKA__RAW_TOPIC=$RAW
export DLRFLOW_SOURCES='[{name="lisoloo",provider="lisoloo",auth="basic",credentials=[{username="demo",password="demo-password"}]},{name="arpoone",provider="arpoone",auth="basic",credentials=[{username="demo",password="demo-password"}]}]'

DLRFLOW_HTTP__LISTEN=127.0.0.1:$INGEST_PORT DLRFLOW_HTTP__ADMIN_LISTEN=127.0.0.1:$INGEST_ADMIN_PORT \
  "$BIN/dlrflow-ingest" serve >"$RUN_DIR/ingest.log" 2>&1 &
pids+=($!)
wait_ready ingest "$INGEST_ADMIN_PORT" "$RUN_DIR/ingest.log"

# The read API needs a key; the configuration holds only its SHA-256
# (`dlrflow-state api-key --id demo --source '*'` makes one).
READ_KEY=dlrk_demo-$RUN
READ_KEY_SHA256=$(printf %s "$READ_KEY" | sha256sum | cut -d' ' -f1)
DLRFLOW_HTTP__LISTEN=127.0.0.1:$STATE_PORT DLRFLOW_HTTP__ADMIN_LISTEN=127.0.0.1:$STATE_ADMIN_PORT \
DLRFLOW_API__KEYS="[{id=\"demo\",sha256=\"$READ_KEY_SHA256\",sources=[\"*\"]}]" \
DLRFLOW_KAFKA__DLQ_TOPIC=$DLQ DLRFLOW_KAFKA__DELIVERY_TOPIC=$DELIVERY DLRFLOW_KAFKA__GROUP_ID=$RUN \
DLRFLOW_KAFKA__STATUS_TOPIC=$STATUS DLRFLOW_REDIS__PREFIX="dlrflow:$RUN:" \
  "$BIN/dlrflow-state" serve >"$RUN_DIR/state.log" 2>&1 &
pids+=($!)
wait_ready state "$STATE_ADMIN_PORT" "$RUN_DIR/state.log"

# Short deadlines so the demo shows the reconciler at work within a minute;
# the read budget is the gateway's real one (120 reads per minute).
# The reconciler publishes each status answer to $STATUS; the state applies it.
DLRFLOW_HTTP__ADMIN_LISTEN=127.0.0.1:$RECONCILE_ADMIN_PORT DLRFLOW_KAFKA__STATUS_TOPIC=$STATUS \
DLRFLOW_STATUS_API__BASE_URL=http://127.0.0.1:$STATUS_PORT DLRFLOW_STATUS_API__API_KEY=$STATUS_KEY \
DLRFLOW_REDIS__PREFIX="dlrflow:$RUN:reconcile" DLRFLOW_RECONCILE__SOURCES='["lisoloo"]' \
DLRFLOW_RECONCILE__DEADLINE_QUEUED_SECS=5 DLRFLOW_RECONCILE__DEADLINE_PROCESSING_SECS=5 \
DLRFLOW_RECONCILE__DEADLINE_SENT_SECS=5 DLRFLOW_RECONCILE__INCOMPLETE_AFTER_SECS=5 \
DLRFLOW_RECONCILE__SWEEP_INTERVAL_MS=1000 \
  env -u DLRFLOW_KAFKA__RAW_TOPIC "$BIN/dlrflow-reconcile" >"$RUN_DIR/reconcile.log" 2>&1 &
pids+=($!)
wait_ready reconcile "$RECONCILE_ADMIN_PORT" "$RUN_DIR/reconcile.log"

step "5. a Lisoloo sms.delivered event, posted with curl"
MID=$(printf '%024x' "$(date +%s%N)" | tail -c 24)
EVENT=$(printf '{"event_id":"%s","event_type":"sms.delivered","timestamp":"2026-05-27T10:15:08Z","message_id":"%s","data":{"recipient_phone":"+243998857000","carrier":"vodacom_drc","delivered_at":"2026-05-27T10:15:08Z","segments":1}}' "$(cat /proc/sys/kernel/random/uuid)" "$MID")
echo "$EVENT"
curl -sS -o /dev/null -w 'HTTP %{http_code} in %{time_total}s\n' -u demo:demo-password \
  -H 'Content-Type: application/json' --data-binary "$EVENT" "http://127.0.0.1:$INGEST_PORT/lisoloo/webhook"

step "6. the record in $RAW (dlrflow-ingest tail)"
{ "$BIN/dlrflow-ingest" tail --brokers "$BROKERS" --topic "$RAW" --count 1000000 --timeout-secs 3 2>/dev/null || true; } | grep "$MID" || {
  echo "record for $MID not found" >&2; exit 1; }

step "7. a simulated Lisoloo send: $MESSAGES messages × $RECIPIENTS recipients, 5% duplicates, reordering, 2% terminal events withheld, retries at 0.3 s, 1.2 s, 6 s, 36 s"
echo "status server (the gateway's GET /status) on 127.0.0.1:$STATUS_PORT; sim log $RUN_DIR/sim.log"
"$BIN/dlrflow-sim" lisoloo --target "http://127.0.0.1:$INGEST_PORT" --username demo --password demo-password \
  --messages "$MESSAGES" --recipients "$RECIPIENTS" --send-rate 50 --time-scale 0.01 \
  --reorder-window 64 --duplicate-rate 0.05 --withhold-terminal-rate 0.02 --seed 42 \
  --truth "$RUN_DIR/truth.json" --status-listen "127.0.0.1:$STATUS_PORT" --status-key "$STATUS_KEY" \
  --read-log "$RUN_DIR/reads.jsonl" --progress-secs 1 --linger-secs 600 \
  > >(tee "$RUN_DIR/sim.out") 2> >(tee "$RUN_DIR/sim.log" >&2) &
SIM=$!
pids+=($SIM)
# The send is over when the simulator prints its report and starts lingering
# (its status server stays up for the reconciler).
for _ in $(seq 1200); do
  grep -q "status server lingering" "$RUN_DIR/sim.log" 2>/dev/null && break
  kill -0 "$SIM" 2>/dev/null || die "the simulator stopped early; see $RUN_DIR/sim.log"
  sleep 0.5
done
grep -q "status server lingering" "$RUN_DIR/sim.log" || die "the send did not finish within 10 minutes"

step "8. verify: every recipient's status, terminal time and error code against the truth"
echo "(webhooks whose terminal event was withheld wait for the reconciler: stuck for 5 s, then one GET /status per message)"
set +e
"$BIN/dlrflow-sim" verify --truth "$RUN_DIR/truth.json" --api "http://127.0.0.1:$STATE_PORT" --api-key "$READ_KEY" --wait-secs 150
VERIFY=$?
set -e

step "9. status API reads by the reconciler (limit 120 per sliding minute)"
READS=$(wc -l <"$RUN_DIR/reads.jsonl" 2>/dev/null || echo 0)
echo "$READS reads; 429 answers: $(grep -c '"status":429' "$RUN_DIR/reads.jsonl" 2>/dev/null || true)"
grep -i "reconcil" "$RUN_DIR/reconcile.log" | grep -iv "librdkafka" | tail -n 3 || true

step "10. the state is a function of the log: rebuild it from $RAW and $STATUS into a new schema and compare"
set +e
DLRFLOW_KAFKA__DLQ_TOPIC=$DLQ DLRFLOW_KAFKA__DELIVERY_TOPIC=$DELIVERY DLRFLOW_KAFKA__GROUP_ID=$RUN \
DLRFLOW_KAFKA__STATUS_TOPIC=$STATUS "$BIN/dlrflow-state" rebuild --into "${RUN}_rebuilt" --compare-with "$RUN" 2>>"$RUN_DIR/rebuild.log" | tail -n 5
REBUILD=${PIPESTATUS[0]}
set -e
[ "$REBUILD" -eq 0 ] && echo "rebuild: no difference" || echo "rebuild: differences (exit $REBUILD); see above and $RUN_DIR/rebuild.log" >&2

step "11. one message through the read API"
ONE=$(grep -o '"message_id": *"[0-9a-f]*"' "$RUN_DIR/truth.json" | head -n 1 | grep -o '[0-9a-f]\{24\}' || true)
if [ -n "$ONE" ]; then
  echo "curl -H 'Authorization: Bearer $READ_KEY' http://127.0.0.1:$STATE_PORT/v1/messages/$ONE"
  if command -v jq >/dev/null; then
    curl -sS -H "Authorization: Bearer $READ_KEY" "http://127.0.0.1:$STATE_PORT/v1/messages/$ONE" | jq .
  else
    curl -sS -H "Authorization: Bearer $READ_KEY" "http://127.0.0.1:$STATE_PORT/v1/messages/$ONE"; echo
  fi
fi

step "12. the operator page: http://127.0.0.1:$STATE_ADMIN_PORT/console (sign in with the read key above)"
PAGE=$(curl -sS -b "dlrflow_console=$READ_KEY" "http://127.0.0.1:$STATE_ADMIN_PORT/console" || true)
for k in messages recipients delivered failed; do
  printf '%s: %s  ' "$k" "$(printf '%s' "$PAGE" | grep -o "data-k=\"$k\">[0-9]*" | head -n 1 | grep -o '[0-9]*$')"
done
echo
echo "(saved to $RUN_DIR/console.html)"
printf '%s' "$PAGE" >"$RUN_DIR/console.html"

step "done"
echo "logs, truth and read log: $RUN_DIR"
if [ "$VERIFY" -eq 0 ]; then
  echo "verify: every recipient matches"
else
  echo "verify: differences found (exit $VERIFY)" >&2
fi
[ "$VERIFY" -eq 0 ] || exit "$VERIFY"
exit "$REBUILD"
