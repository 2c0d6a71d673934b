"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from matrixjobs.app import App
from matrixjobs.config import Config
from matrixjobs.progress.events import JobProgressEvent

PYTHON = sys.executable


def state_dir(tmp_path: Path) -> Path:
    """Where make_config puts the store (and beside it the crypto store and pickle key)."""
    return tmp_path / "state"


def make_config(tmp_path: Path, **sections: Any) -> Config:
    """A Config for tests: fast progress and retries, store in tmp_path, API on a free port."""
    raw: dict[str, Any] = {
        # A directory of its own, as StateDirectory= gives it: jobs cannot see into it, and
        # the files a test's targets write in tmp_path stay visible to them.
        "store": {"path": str(state_dir(tmp_path) / "matrixjobs.db")},
        "progress": {"interval_ms": 50},
        "queue": {"retry_backoff_s": 0.05, "kill_grace_s": 1.0},
        "api": {"listen": "127.0.0.1:0"},  # never a fixed port: tests run side by side
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return Config.model_validate(raw)


async def final_state(app: App, subject: str, timeout: float = 20.0) -> JobProgressEvent:
    """Follow a job or batch until it ends and return its terminal event."""

    async def follow() -> JobProgressEvent:
        last = None
        async for event in app.watch(subject):
            last = event
        assert last is not None
        return last

    return await asyncio.wait_for(follow(), timeout)


@contextlib.asynccontextmanager
async def write_locked(db: Path) -> AsyncIterator[None]:
    """What an operator's `sqlite3` shell in a transaction (BEGIN IMMEDIATE) does to a
    store the test's own loop serves: its writes wait out the busy timeout and fail, its
    reads go on. Taken from a thread, so a write of the service's under way can finish."""
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
        yield
        await asyncio.to_thread(holder.execute, "ROLLBACK")
    finally:
        holder.close()


def python_target(code: str, **extra: Any) -> dict[str, Any]:
    """A target that runs a Python snippet with this interpreter."""
    return {"command": [PYTHON, "-c", textwrap.dedent(code)], **extra}


def counting_target(step_s: float) -> dict[str, Any]:
    """`TARGET [N]`: N (default 10) progress steps, `step_s` apart."""
    return python_target(f"""
        import sys, time
        steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
        for step in range(1, steps + 1):
            time.sleep({step_s})
            print(f"::progress {{step}}/{{steps}} step {{step}}", flush=True)
    """, args_pattern="[0-9]{1,3}")


# Keeps reporting progress for a minute (tests cancel it or stop the service).
SLOW_TARGET = python_target("""
    import time
    for step in range(1, 3001):
        print(f"::progress {step}/3000", flush=True)
        time.sleep(0.02)
""")


# `slow [N]`: N (default 5) progress steps, 0.3 s apart.
STEPS = """
    import sys, time
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for i in range(1, steps + 1):
        time.sleep(0.3)
        print(f"::progress {i}/{steps} step {i}", flush=True)
"""
# The targets the Matrix end-to-end tests (plain and encrypted rooms) build.
MATRIX_TARGETS = {
    "quick": python_target("print('::progress 1/1 done')", description="Finishes at once"),
    "slow": python_target(STEPS, args_pattern=r"\d{1,2}", description="Takes a while"),
    "broken": python_target("import sys; print('compiler exploded'); sys.exit(3)",
                            max_retries=0, description="Always fails"),
}


def bot_tables(homeserver: str, bot: str, alice: str) -> str:
    """The [matrix] and [access] tables of a test bot's TOML config: `alice` may run jobs;
    no rate limit of our own (the test homeserver has none for the bot)."""
    return textwrap.dedent(f"""
        [matrix]
        homeserver = "{homeserver}"
        user_id = "{bot}"
        rate_per_s = 0
        [access]
        allowed_users = ["{alice}"]
    """)
