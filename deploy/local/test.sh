#!/usr/bin/env bash
# Runs dlrflow's whole test suite against real services: brings the local
# stack up (Redis, PostgreSQL, Tansu; installing what is missing), then runs
# every test of the workspace. Extra arguments go to the test runner.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"

deploy/local/stack.sh up
# Headless Chromium for the operator page's browser test (installed once).
deploy/local/browser.sh >/dev/null

export DLRFLOW_TEST_KAFKA_BROKERS=${DLRFLOW_TEST_KAFKA_BROKERS:-127.0.0.1:9092}
export DLRFLOW_TEST_REDIS_URL=${DLRFLOW_TEST_REDIS_URL:-redis://127.0.0.1:6379}
export DLRFLOW_TEST_POSTGRES_URL=${DLRFLOW_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/dlrflow}

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "[test] cargo-nextest not found; installing it (once)" >&2
  cargo install cargo-nextest --locked >/dev/null 2>&1 || echo "[test] could not install cargo-nextest; using cargo test" >&2
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets --no-fail-fast "$@"
  # nextest does not run doc tests.
  cargo test --workspace --doc --quiet
else
  cargo test --workspace --all-targets --no-fail-fast "$@"
fi
