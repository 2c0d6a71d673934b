"""Throwaway PostgreSQL databases for tests, on the server every project machine runs.

The server is 127.0.0.1:5432 with trust auth for local users (`.ci/run` makes sure of
that); MATRIXJOBS_TEST_PG points elsewhere. No server is a failure, never a skip.
"""

from __future__ import annotations

import os
import secrets

import psycopg
from psycopg import sql

SERVER = os.environ.get("MATRIXJOBS_TEST_PG", "postgresql://127.0.0.1:5432")


def create_database() -> str:
    """A new empty database; returns its URL."""
    name = f"mj_test_{secrets.token_hex(6)}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{SERVER}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5) as conn:
        # FORCE: a test that failed half-way may have left a connection open.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))

