"""Handlers loaded by name from `[handlers]` in test configs."""

from __future__ import annotations

from typing import Any


class Greeter:
    async def run(self, job: Any, progress: Any) -> dict[str, str]:
        progress.report(1, 1, "greeted")
        return {"greeting": f"hello {job.data['params'].get('who', 'world')}"}


class NotAHandler:
    pass


class ExplodesOnCreate:
    def __init__(self) -> None:
        raise RuntimeError("no database configured")


class Crashes:
    """Fails with an unexpected exception: the service logs its traceback."""

    async def run(self, job: Any, progress: Any) -> None:
        raise RuntimeError("the handler crashed " + "with a long explanation " * 10)
