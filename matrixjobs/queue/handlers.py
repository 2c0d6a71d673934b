"""Job handlers: the protocol, the registry, and loading user handlers.

A handler is any object with `async def run(self, job, progress) -> result`.
The result must be JSON-serialisable (it is stored with the job). Raise
`PermanentJobError` for failures a retry cannot fix; any other exception
fails the run and is retried while retries remain.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from matrixjobs.config import Config
from matrixjobs.errors import ConfigError, UnknownJobTypeError
from matrixjobs.models import Job
from matrixjobs.progress.reporter import ProgressReporter

ENTRY_POINT_GROUP = "matrixjobs.handlers"


@runtime_checkable
class Handler(Protocol):
    async def run(self, job: Job, progress: ProgressReporter) -> Any: ...


class HandlerRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, job_type: str, handler: Handler) -> None:
        if not isinstance(handler, Handler):
            raise TypeError(f"handler for '{job_type}' has no async run(job, progress) method")
        self._handlers[job_type] = handler

    def get(self, job_type: str) -> Handler:
        handler = self._handlers.get(job_type)
        if handler is None:
            raise UnknownJobTypeError(job_type)
        return handler

    def __contains__(self, job_type: str) -> bool:
        return job_type in self._handlers

    def names(self) -> list[str]:
        return sorted(self._handlers)


def load_user_handlers(config: Config, registry: HandlerRegistry) -> None:
    """Instantiate every handler a target names: `[handlers]` entries first, then plugins.

    Only referenced handlers are imported, so a broken plugin that no target uses
    cannot stop the service.
    """
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for target_name, target in config.targets.items():
        name = target.handler
        if name is None or name in registry:
            continue
        where = f"targets.{target_name}.handler"
        if name in config.handlers:
            ref = config.handlers[name]
            where = f"handlers.{name}"
            cls = _import(ref, where)
        elif name in plugins:
            try:
                cls = plugins[name].load()
            except Exception as exc:
                raise ConfigError(f"{where}: cannot load plugin '{name}': {exc}") from None
        else:
            known = sorted({*config.handlers, *plugins})
            raise ConfigError(
                f"{where}: unknown handler '{name}' (known: {', '.join(known) or 'none'})"
            )
        try:
            registry.register(name, cls())
        except Exception as exc:
            raise ConfigError(f"{where}: cannot create handler '{name}': {exc}") from None


def _import(ref: str, where: str) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import '{ref}': {exc}") from None
