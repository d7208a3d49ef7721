#!/usr/bin/env bash
# Checks the Kubernetes manifests (base, rendered overlays, the example
# Secret) against the Kubernetes JSON schemas and docker-compose.yml against
# the Compose Specification, offline, plus the invariants of check.py.
# Arguments go to check.py (--root DIR checks another copy of the tree,
# --env-out FILE writes the dlrflow containers' environments).
#
# The Python tools live in a virtualenv made here from requirements.txt
# (PyPI) when missing or when requirements.txt changed:
# $DLRFLOW_TOOLS_DIR (default ~/.cache/dlrflow)/k8s-check-venv.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools=${DLRFLOW_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dlrflow}
venv=$tools/k8s-check-venv
stamp=$(sha256sum "$here/requirements.txt" | cut -c1-16)
mkdir -p "$tools"
# Tests run in parallel: one installs, the others wait.
exec 9>"$tools/k8s-check.lock"
flock 9
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[k8s] installing kubernetes-validate and the Compose schema into $venv" >&2
  rm -rf "$venv"
  log=$(mktemp)
  {
    python3 -m venv "$venv" &&
      "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt" &&
      "$venv/bin/pip" install -q --disable-pip-version-check --no-deps docker-compose==1.29.2
  } >"$log" 2>&1 || { cat "$log" >&2; rm -rf "$venv"; exit 1; }
  echo "$stamp" >"$venv/.stamp"
fi
flock -u 9
exec "$venv/bin/python" "$here/check.py" "$@"
