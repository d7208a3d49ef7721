#!/usr/bin/env bash
# Makes sure Debian's headless browser for the operator page's test is
# installed: chromium and chromium-driver (/usr/bin/chromium,
# /usr/bin/chromedriver). Installs them when missing (as root, or with
# sudo), and prints the two paths. Used by tests/e2e/console.rs.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  command -v chromium
  command -v chromedriver
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "[browser] chromium/chromedriver missing and not root: apt-get install chromium chromium-driver" >&2
    exit 1
  fi
fi
echo "[browser] installing chromium and chromium-driver (once)" >&2
export DEBIAN_FRONTEND=noninteractive
# Another apt (the stack script's) may hold the lock for a while.
for attempt in 1 2 3 4 5 6; do
  if $SUDO apt-get install -y chromium chromium-driver >&2; then break; fi
  if [ "$attempt" = 1 ]; then $SUDO apt-get update >&2 || true; fi
  sleep 10
done
command -v chromium
command -v chromedriver
