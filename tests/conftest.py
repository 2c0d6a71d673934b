"""Shared fixtures: configs written to real files, and running Apps on a temp store."""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from helpers import make_config
from pg_fixtures import create_database, drop_database
from synapse_fixtures import make_synapse_fixture

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.config import Config
from matrixjobs.service import build_service
from matrixjobs.store.sqlite import SqliteStore

# Every job gets a private /tmp, so a test whose targets write files for the test to read
# needs them outside /tmp: pytest's tmp_path (and everything else's temp files) go to
# /var/tmp, which jobs share with the host as before.
if os.environ.get("TMPDIR") is None and os.path.isdir("/var/tmp"):
    os.environ["TMPDIR"] = "/var/tmp"
    tempfile.tempdir = None  # computed again from TMPDIR


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write TOML text (dedented) to tmp_path/config.toml and return its path."""

    def write(text: str, name: str = "config.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store in tmp_path."""
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped after the test."""
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Each backend in turn: None for SQLite, else a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        yield None
        return
    url = create_database()
    yield url
    drop_database(url)


def on_backend(config: Config, url: str | None) -> Config:
    """`config` with its store on PostgreSQL at `url` (None: unchanged)."""
    if url is None:
        return config
    store = config.store.model_copy(update={"backend": "postgresql", "url": url})
    return config.model_copy(update={"store": store})


@pytest.fixture
async def running_app(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `app = await running_app(config_or_none, handlers=...)`, or
    `running_app(app)` to start an App the test built (and changed) itself; stopped at
    teardown."""
    apps: list[App] = []

    async def start(config: Config | App | None = None, **kwargs: Any) -> App:
        app = config if isinstance(config, App) else App(config or make_config(tmp_path),
                                                         **kwargs)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def api_service(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `app, client = await api_service(token=None, targets=…, **sections)`: a
    running service with its API, and an HTTP client carrying the token (if one is given
    it is the service's too); all stopped at teardown. `api_service(config=…)` serves a
    config the test made itself (one read from a file, say) as it is."""
    apps: list[App] = []
    clients: list[httpx2.AsyncClient] = []

    async def start(token: str | None = None, config: Config | None = None,
                    **sections: Any) -> tuple[App, httpx2.AsyncClient]:
        if config is None:
            api = {"listen": "127.0.0.1:0", **({"token": token} if token else {}),
                   **sections.pop("api", {})}
            config = make_config(tmp_path / f"s{len(apps)}", api=api, **sections)
        app = build_service(config)
        apps.append(app)
        await app.start()
        [server] = [c for c in app.components if isinstance(c, ApiServer)]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        clients.append(httpx2.AsyncClient(base_url=server.url, headers=headers, timeout=20.0))
        return app, clients[-1]

    yield start
    for client in clients:
        await client.aclose()
    for app in apps:
        await app.stop()


# Real homeservers, one per test session: relaxed limits, and Synapse's default rc_message.
synapse = make_synapse_fixture()
synapse_limited = make_synapse_fixture(rate_limits=True, name="synapse_limited")
