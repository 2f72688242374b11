#!/usr/bin/env bash
# Installs the official Firebolt Python SDK (pinned, with its pinned dependencies) into a
# private virtualenv, for the conformance test (tests/firebolt/sdk.rs), the way
# deploy/localstack/start.sh installs LocalStack. Idempotent: the venv is rebuilt only
# when requirements.txt changes. Prints the venv's python on its last line.
#
# Environment:
#   CDC_WORKER_CACHE   where the venv lives (default ~/.cache/cdc-worker)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CDC_WORKER_CACHE:-$HOME/.cache/cdc-worker}
venv=$cache/firebolt-sdk-venv
stamp=$venv/.requirements.sha256
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "firebolt-sdk: installing pinned firebolt-sdk 1.19.1 into $venv" >&2
  mkdir -p "$cache"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$here/requirements.txt" >&2
  "$venv/bin/python" -c "import firebolt.db" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
