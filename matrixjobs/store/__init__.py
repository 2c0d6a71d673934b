"""Durable state. `open_store` picks the backend named in the config."""

from matrixjobs.config import StoreConfig
from matrixjobs.store.base import BatchCancel, Cycle, Recovery, Store
from matrixjobs.store.sqlite import SqliteStore

__all__ = ["BatchCancel", "Cycle", "Recovery", "SqliteStore", "Store", "create_store"]


def create_store(config: StoreConfig) -> Store:
    # Only one backend so far; the config's `backend` literal will grow with them.
    return SqliteStore(config.path, synchronous=config.synchronous)
