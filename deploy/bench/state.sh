#!/usr/bin/env bash
# dlrflow-state benchmarks (not part of the test suite) on a private Tansu
# 0.6.0 with a fresh SQLite file, so the figures do not depend on how much the
# shared stack's broker already holds. In one run: the throughput (raw topic
# → committed state, batched vs naive, and the stage alone), the idle latency
# (single events, acknowledged → committed) and a sustained load
# (acknowledged → visible, every tenth chunk); and the write path with the
# carrier rollup on vs off (stage only, alternating rounds). Reports:
# reports/state-bench.md, reports/state-idle-latency.md,
# reports/state-sustained.md, reports/state-rollup.md.
#
#   deploy/bench/state.sh [events=100000] [sustained events/s=5000] [seconds=60] [idle events=30]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
EVENTS=${1:-100000}
RATE=${2:-5000}
SECS=${3:-60}
IDLE=${4:-30}
mkdir -p reports .stack
deploy/local/stack.sh up
# shellcheck source=deploy/bench/broker.sh
. deploy/bench/broker.sh
trap stop_broker EXIT
cargo build --release -q -p dlrflow-state --example state-bench
BENCH=(target/release/examples/state-bench --brokers "127.0.0.1:$KPORT")
fresh_broker
"${BENCH[@]}" --events "$EVENTS"
fresh_broker
"${BENCH[@]}" --idle "$IDLE"
fresh_broker
"${BENCH[@]}" --sustained "$RATE" --secs "$SECS"
"${BENCH[@]}" --rollup 3 --stage-events "$(( EVENTS < 50000 ? EVENTS : 50000 ))"
