#!/usr/bin/env bash
# Start a local Prefect server and print the API URL to export. Its database: PostgreSQL in production
# (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://..., which infra/start-postgres.sh prints), else
# SQLite under $PREFECT_HOME.
# Server settings that keep runs alive across a server restart and keep a burst of uploads from
# losing a run on SQLite: infra/prefect-server.env (each one is used unless already set). On PostgreSQL the
# late-runs service stays on (Prefect's default): the file turns it off only because of SQLite's lock.
set -euo pipefail
PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$(pwd)/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL=${PREFECT_UI_API_URL:-http://127.0.0.1:$PORT/api}
case ${PREFECT_API_DATABASE_CONNECTION_URL:-} in
  postgresql*) export PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED=${PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED:-true} ;;
esac
while IFS='=' read -r key value || [ -n "$key" ]; do  # prefect-server.env's settings not set already
  if [[ $key =~ ^[A-Z_]+$ ]] && [ -z "${!key:-}" ]; then export "$key=$value"; fi
done < "$(dirname "$0")/prefect-server.env"
echo "export PREFECT_API_URL=http://127.0.0.1:$PORT/api"
exec prefect server start --host 127.0.0.1 --port "$PORT"
