"""Durable state. `create_store` picks the backend named in the config."""

from matrixjobs.config import StoreConfig
from matrixjobs.errors import StoreError
from matrixjobs.store.base import BatchCancel, Cycle, Recovery, Store
from matrixjobs.store.sqlite import SqliteStore

__all__ = ["BatchCancel", "Cycle", "Recovery", "SqliteStore", "Store", "create_store",
           "describe_store"]


def create_store(config: StoreConfig) -> Store:
    if config.backend == "sqlite":
        return SqliteStore(config.path, synchronous=config.synchronous,
                           lock_wait_s=config.lock_wait_s)
    # Imported here: psycopg is loaded only by those who use it.
    from matrixjobs.store.postgres import PostgresStore

    url = config.database_url
    if url is None:  # load_config refuses this; a Config built in code may not have
        raise StoreError('store.backend = "postgresql" needs a URL')
    return PostgresStore(url.get_secret_value())


def describe_store(config: StoreConfig) -> str:
    """Where the store is, for logs and check-config: never the database password."""
    if config.backend == "sqlite":
        return str(config.path)
    from matrixjobs.store.pg_conn import describe_url

    url = config.database_url
    return f"PostgreSQL at {describe_url(url.get_secret_value()) if url else '(no URL)'}"
