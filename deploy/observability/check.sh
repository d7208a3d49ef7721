#!/usr/bin/env bash
# Checks the alert rules: `promtool check rules` and the unit tests of
# alerts.test.yml (one per alert). Installs Debian's `prometheus` package
# (which carries promtool) when promtool is missing and this runs as root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! command -v promtool >/dev/null; then
  [ "$(id -u)" -eq 0 ] || { echo "promtool missing: install Debian's prometheus package" >&2; exit 1; }
  echo "[observability] installing prometheus (for promtool)" >&2
  log=$(mktemp)
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends prometheus >"$log" 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q >>"$log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends prometheus >>"$log" 2>&1
  } || { cat "$log" >&2; exit 1; }
fi
promtool check rules alerts.yml
promtool test rules alerts.test.yml
