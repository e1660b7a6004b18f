"""infra/start-postgres.sh, the production database's script (README "1. The server and its database"): a real
PostgreSQL server on the loopback with a password-protected `prefect` database (its owner, not a superuser) that
Prefect's migrations can use, run as the `postgres` user when started as root, and the same data after a restart.
A few seconds; the 50-upload load on it is tests/test_load.py."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from local_stack import postgres_cluster_folder, require_postgres, start_postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster():
    require_postgres()
    with postgres_cluster_folder() as folder:
        yield folder


def test_start_postgres_serves_a_password_protected_loopback_database_that_survives_a_restart(cluster, tmp_path):
    server, url = start_postgres("postgres", cluster, tmp_path)
    try:
        assert url.startswith("postgresql+asyncpg://prefect:") and "@127.0.0.1:" in url and url.endswith("/prefect")
        settings = asyncio.run(first_start(url))
        assert settings == {"user": "prefect", "superuser": False, "listen_addresses": "127.0.0.1",
                            "password_encryption": "scram-sha-256", "pg_trgm": True}
        password_file = cluster / "data" / "prefect.password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert password_file.read_text() not in (tmp_path / "postgres.log").read_text()  # the log names the file
        if os.geteuid() == 0:  # PostgreSQL refuses root: the script runs it as `postgres`
            assert owner_uid(server.pid) == (cluster / "data").stat().st_uid != 0
    finally:
        server.stop(signals=(signal.SIGINT,))
    assert server.popen.returncode == 0, server.tail()

    server, url = start_postgres("postgres-again", cluster, tmp_path)
    try:
        assert asyncio.run(read_back(url)) == "kept"
    finally:
        server.stop(signals=(signal.SIGINT,))


async def first_start(url: str) -> dict:
    import asyncpg

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(dsn.replace("prefect:", "prefect:wrong", 1))
    connection = await asyncpg.connect(dsn)
    try:
        # Prefect's migrations add pg_trgm: the role must be able to, as the owner of its database.
        await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        await connection.execute("CREATE TABLE kept (value text); INSERT INTO kept VALUES ('kept')")
        return {"user": await connection.fetchval("SELECT current_user"),
                "superuser": await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"),
                **{name: await connection.fetchval(f"SHOW {name}") for name in ("listen_addresses", "password_encryption")},
                "pg_trgm": await connection.fetchval("SELECT count(*) = 1 FROM pg_extension WHERE extname = 'pg_trgm'")}
    finally:
        await connection.close()


async def read_back(url: str) -> str:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return await connection.fetchval("SELECT value FROM kept")
    finally:
        await connection.close()


def owner_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for process {pid}")
