#!/usr/bin/env bash
# Start a local Prefect server (SQLite under $PREFECT_HOME; Postgres if
# PREFECT_API_DATABASE_CONNECTION_URL is set) and print the API URL to export.
# Server settings that keep runs alive across a server restart: infra/prefect-server.env.
# SQLite under a burst of uploads (tests/test_load.py): runs queued behind the GPU limit turn Late
# after 15 s, and the late-runs service's writes collide with the API's ("database is locked" in the
# server log, hundreds of times; retried, no client request fails). Postgres avoids it; on SQLite,
# PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED=false removes them (695 -> 0 in that test), at the cost
# of the Late label.
set -euo pipefail
PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$(pwd)/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL=${PREFECT_UI_API_URL:-http://127.0.0.1:$PORT/api}
while IFS='=' read -r key value || [ -n "$key" ]; do  # prefect-server.env's settings not set already
  if [[ $key =~ ^[A-Z_]+$ ]] && [ -z "${!key:-}" ]; then export "$key=$value"; fi
done < "$(dirname "$0")/prefect-server.env"
echo "export PREFECT_API_URL=http://127.0.0.1:$PORT/api"
exec prefect server start --host 127.0.0.1 --port "$PORT"
