"""The anchor of bench/pg_throughput.py: a procrastinate app with the same jobs as
bench/pg_handlers.py. Its workers run `procrastinate --app=pg_procrastinate.app worker`
(bench/ on PYTHONPATH, the database URL in $BENCH_PG_URL)."""

from __future__ import annotations

import os
import time

from pg_handlers import record_start
from procrastinate import App, PsycopgConnector

URL_ENV = "BENCH_PG_URL"

# The connection opens only when the app does: importing needs no database.
app = App(connector=PsycopgConnector(conninfo=os.environ.get(URL_ENV, "")))


@app.task(name="noop")
async def noop() -> None:
    return None


@app.task(name="stamp")
async def stamp(key: str) -> None:
    record_start(key, time.time())
