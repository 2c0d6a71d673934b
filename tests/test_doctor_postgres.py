"""The doctor's checks of a PostgreSQL store, against the real server."""

from __future__ import annotations

import io
import os
import secrets
import textwrap
from pathlib import Path

import psycopg
from pg_fixtures import SERVER
from psycopg import sql
from test_store_postgres import free_port

from matrixjobs.ops.doctor import doctor
from matrixjobs.store.postgres import MIGRATIONS, PostgresStore


def store_lines(tmp_path: Path, url: str, **env: str) -> tuple[bool, list[str]]:
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        backend = "postgresql"
        url = "{url}"
        [api]
        enabled = false
    """))
    out = io.StringIO()
    report = doctor(config, {**os.environ, **env}, out)
    return report.failed, [line for line in out.getvalue().splitlines() if " store" in line]


def test_an_empty_database_answers_and_the_service_will_create_its_tables(tmp_path, pg_url):
    failed, lines = store_lines(tmp_path, pg_url)
    assert not failed
    assert lines[0].startswith("✓ store: PostgreSQL at 127.0.0.1:5432/mj_test_")
    assert lines[0].endswith("has no matrixjobs tables yet; the service creates them at start")


async def test_the_schema_version_is_shown(tmp_path, pg_url):
    store = PostgresStore(pg_url)
    await store.open()
    try:
        failed, lines = store_lines(tmp_path, pg_url)
    finally:
        await store.close()
    assert not failed
    assert lines[0].endswith(f"(schema version {len(MIGRATIONS)})")


async def test_a_schema_newer_than_the_code_fails(tmp_path, pg_url):
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version VALUES (9, now())")
    failed, lines = store_lines(tmp_path, pg_url)
    assert failed
    assert lines[0].endswith("schema version 9 is newer than this matrixjobs understands "
                             f"({len(MIGRATIONS)}); upgrade it")


async def test_roles_that_cannot_read_or_cannot_write_the_tables_fail(tmp_path, pg_url):
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    name = f"mj_reader_{secrets.token_hex(4)}"
    role, as_role = sql.Identifier(name), pg_url.replace("//", f"//{name}@", 1)
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    try:
        unread = store_lines(tmp_path, as_role)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(role))
        unwritten = store_lines(tmp_path, as_role)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(role))
    assert unread[0] and unread[1][0].endswith(
        "answers, but: permission denied for table schema_version")
    assert unwritten[0] and unwritten[1][0].endswith(
        "the role may not write the tables; GRANT it that")


def test_an_unreachable_server_fails_naming_host_and_port_never_the_password(tmp_path):
    port = free_port()
    failed, lines = store_lines(
        tmp_path, "postgresql://mj@127.0.0.1:1/jobs",
        MATRIXJOBS_DATABASE_URL=f"postgresql://mj:pw-2718@127.0.0.1:{port}/jobs")
    assert failed
    assert lines[0].startswith(f"✗ store: cannot connect to PostgreSQL at 127.0.0.1:{port}/jobs")
    assert "pw-2718" not in "\n".join(lines)
    assert len(lines) == 1
