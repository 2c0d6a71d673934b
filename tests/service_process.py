"""A real `matrixjobs run` child process for tests (import as `from service_process import …`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 10.0


def child_env() -> dict[str, str]:
    """The real environment without anything that would change the CLI's behaviour."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MATRIXJOBS_") and k not in ("STATE_DIRECTORY", "JOURNAL_STREAM")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Service:
    """A `matrixjobs run` (or `worker`) child whose stderr goes to a file we can poll."""

    def __init__(self, cwd: Path, config: Path, log_name: str = "service.log",
                 env: dict[str, str] | None = None, command: str = "run",
                 python: list[str] | None = None, extra: tuple[str, ...] = ()) -> None:
        self.log_path = cwd / log_name
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            [*(python or [sys.executable]), "-m", "matrixjobs", command, "--config", str(config),
             *extra],
            cwd=cwd, env={**child_env(), **(env or {})}, stdout=subprocess.DEVNULL,
            stderr=self._log, text=True,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8")

    def wait_for_log(self, text: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            if self.process.poll() is not None:
                pytest.fail(f"exited with {self.process.returncode} before {text!r}:\n{self.log}")
            time.sleep(0.02)
        pytest.fail(f"no {text!r} within {timeout} s:\n{self.log}")

    def wait_until_started(self) -> None:
        self.wait_for_log("matrixjobs started")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=EXIT_TIMEOUT_S)
        self._log.close()
