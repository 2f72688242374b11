#!/usr/bin/env bash
# Stops the LocalStack that deploy/localstack/start.sh started.
set -euo pipefail
cache=${CDC_WORKER_CACHE:-$HOME/.cache/cdc-worker}
pidfile=$cache/localstack.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  kill "$(cat "$pidfile")"
  for _ in $(seq 1 20); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.5; done
  echo "localstack: stopped"
else
  echo "localstack: not running (no live pid in $pidfile)"
fi
rm -f "$pidfile"
