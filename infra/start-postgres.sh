#!/usr/bin/env bash
# PostgreSQL for the Prefect API: the production database (README "1. The server and its database"). SQLite takes one writer at a time,
# and under a burst of uploads its lock made the API answer 503 (tests/test_load.py runs both databases).
#
# First start: a cluster in PGDATA (default $PREFECT_HOME/postgres) with a login role and database `prefect`; the
# role's password is PREFECT_DB_PASSWORD (URL-safe characters), else a random one; either is kept in
# $PGDATA/prefect.password (mode 600, the caller's). Every start prints the PREFECT_API_DATABASE_CONNECTION_URL to
# export (`eval` it: it reads the password from that file) for infra/start-prefect-server.sh, then runs the server
# in the foreground on 127.0.0.1:PG_PORT (default 5432; TCP only, password required) until SIGINT (fast stop) or
# SIGTERM (after the clients disconnect). PostgreSQL refuses to run as root: as root this runs it as PG_USER
# (default `postgres`, which Debian's package creates) and gives PGDATA to that user.
#
# Binaries: PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian's `postgresql`; `make postgres` installs it),
# else `postgres` on PATH. `infra/start-postgres.sh --check` prints the folder found, or says how to install it.
set -euo pipefail

find_bin() {
  if [ -n "${PG_BIN:-}" ]; then [ -x "$PG_BIN/postgres" ] && echo "$PG_BIN"; return; fi
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(dirname "$(command -v postgres 2>/dev/null || echo /nonexistent/x)")"; do
    if [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  done
  return 1
}

if ! BIN=$(find_bin); then
  echo "start-postgres.sh: no PostgreSQL server (initdb and postgres) in ${PG_BIN:-/usr/lib/postgresql/*/bin or on PATH};" \
       "install Debian's postgresql package (make postgres) or set PG_BIN to the folder that holds them" >&2
  exit 3
fi
if [ "${1:-}" = --check ]; then echo "$BIN"; exit 0; fi

export PREFECT_HOME=${PREFECT_HOME:-$(pwd)/.prefect}
PGDATA=$(realpath -m "${PGDATA:-$PREFECT_HOME/postgres}")
PORT=${PG_PORT:-5432}
mkdir -p "$(dirname "$PGDATA")"
as_owner=()  # the command prefix that runs a PostgreSQL program as the data folder's owner
if [ "$(id -u)" = 0 ]; then
  PG_USER=${PG_USER:-postgres}
  id "$PG_USER" >/dev/null 2>&1 || { echo "start-postgres.sh: PostgreSQL will not run as root and there is no user" \
    "'$PG_USER' to run it as: set PG_USER to an existing user, or create one (useradd --system $PG_USER)" >&2; exit 3; }
  as_owner=(setpriv --reuid="$PG_USER" --regid="$(id -g "$PG_USER")" --init-groups)
  install -d -m 700 "$PGDATA"
  chown "$PG_USER:" "$PGDATA"
  "${as_owner[@]}" test -x "$PGDATA" || { echo "start-postgres.sh: user '$PG_USER' cannot enter $PGDATA:" \
    "choose a PGDATA whose parent folders it may enter (chmod o+x), e.g. under /var/lib/postgresql" >&2; exit 3; }
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  password_file=$PGDATA/prefect.password
  superuser_pw=$(mktemp) && chmod 600 "$superuser_pw" && trap 'rm -f "$superuser_pw"' EXIT
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$superuser_pw"  # the superuser's; nothing uses it
  [ -z "${as_owner[*]}" ] || chown "$PG_USER:" "$superuser_pw"
  "${as_owner[@]}" "$BIN/initdb" -D "$PGDATA" -U postgres --pwfile="$superuser_pw" --auth=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >"$PGDATA.initdb.log" 2>&1 \
    || { cat "$PGDATA.initdb.log" >&2; exit 1; }
  rm -f "$PGDATA.initdb.log"
  # TCP on the loopback only; no Unix socket, so no /var/run/postgresql to own.
  printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n" >>"$PGDATA/postgresql.conf"
  password=${PREFECT_DB_PASSWORD:-$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')}
  (umask 077 && printf '%s' "$password" >"$password_file")
  # The role owns its database, so Prefect's migrations may create the pg_trgm extension (a trusted one).
  printf "CREATE ROLE prefect LOGIN PASSWORD '%s';\nCREATE DATABASE prefect OWNER prefect;\n" "${password//\'/\'\'}" \
    | "${as_owner[@]}" "$BIN/postgres" --single -D "$PGDATA" postgres >"$PGDATA.setup.log" 2>&1 || true
  # Single-user mode exits 0 after a failed statement: its log says so ("... [pid] ERROR:  ...").
  if grep -q -E "(ERROR|FATAL|PANIC):  " "$PGDATA.setup.log"; then cat "$PGDATA.setup.log" >&2; exit 1; fi
  rm -f "$PGDATA.setup.log"
fi
# The URL names the password's file rather than the password, so that this output can go to a log.
echo "export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:\$(cat '$PGDATA/prefect.password')@127.0.0.1:$PORT/prefect"
exec "${as_owner[@]}" "$BIN/postgres" -D "$PGDATA" -p "$PORT"
