#!/usr/bin/env bash
# Starts LocalStack (S3, SQS, SNS, and SES, through which SNS delivers email) on
# 127.0.0.1:4566 without Docker, installing it into a
# private virtualenv on first use. Idempotent: returns at once when LocalStack already answers.
#
#   deploy/localstack/start.sh          # install if needed, start in the background, wait
#   deploy/localstack/stop.sh           # stop what start.sh started
#
# Environment:
#   CDC_WORKER_CACHE   where the venv, log and pid file live (default ~/.cache/cdc-worker)
#   LOCALSTACK_PORT    gateway port (default 4566)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CDC_WORKER_CACHE:-$HOME/.cache/cdc-worker}
venv=$cache/localstack-venv
port=${LOCALSTACK_PORT:-4566}
health=http://127.0.0.1:$port/_localstack/health

healthy() { python3 - "$health" <<'PY' 2>/dev/null
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    services = json.load(r).get("services", {})
sys.exit(0 if all(services.get(s) in ("available", "running") for s in ("s3", "sqs", "sns")) else 1)
PY
}

has_ses() { python3 - "$health" <<'PY' 2>/dev/null
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if json.load(r).get("services", {}).get("ses") in ("available", "running") else 1)
PY
}

if healthy; then
  echo "localstack: already running on 127.0.0.1:$port"
  # One started by an earlier version of this script has no SES: only the alert email
  # test needs it, so say so instead of stopping what others may be using.
  has_ses || echo "localstack: note: it runs without SES, which the alert email test needs; restart it (deploy/localstack/stop.sh, then this script) when nothing else uses it" >&2
  exit 0
fi

mkdir -p "$cache"
# The venv is rebuilt whenever the pinned requirements change.
stamp=$venv/.requirements.sha256
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "localstack: installing pinned LocalStack 4.13.1 into $venv (about 90 s)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi

echo "localstack: starting on 127.0.0.1:$port (log: $cache/localstack.log)"
# LOCALSTACK_HOST and the path strategy make queue URLs resolvable without outside DNS:
# http://127.0.0.1:4566/queue/us-east-1/000000000000/NAME
SERVICES=s3,sqs,sns,ses \
GATEWAY_LISTEN=127.0.0.1:$port \
LOCALSTACK_HOST=127.0.0.1:$port \
SQS_ENDPOINT_STRATEGY=path \
PERSISTENCE=0 \
  nohup "$venv/bin/python" -m localstack.runtime.main >"$cache/localstack.log" 2>&1 &
echo $! > "$cache/localstack.pid"

for _ in $(seq 1 120); do
  if healthy; then
    echo "localstack: ready"
    exit 0
  fi
  if ! kill -0 "$(cat "$cache/localstack.pid")" 2>/dev/null; then
    echo "localstack: exited during startup; last lines of its log:" >&2
    tail -n 30 "$cache/localstack.log" >&2
    exit 1
  fi
  sleep 1
done
echo "localstack: not healthy after 120 s; see $cache/localstack.log" >&2
exit 1
