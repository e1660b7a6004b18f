#!/usr/bin/env bash
# Start a local Prefect server (SQLite under $PREFECT_HOME; Postgres if
# PREFECT_API_DATABASE_CONNECTION_URL is set) and print the API URL to export.
set -euo pipefail
PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$(pwd)/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL=${PREFECT_UI_API_URL:-http://127.0.0.1:$PORT/api}
echo "export PREFECT_API_URL=http://127.0.0.1:$PORT/api"
exec prefect server start --host 127.0.0.1 --port "$PORT"
