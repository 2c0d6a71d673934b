"""A real `matrixjobs run` process for the benchmarks that measure the whole service."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 30.0


def start_service(config: Path, log: Path, env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """Start the service on `config` (its API on 127.0.0.1:0); its process and API URL."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "matrixjobs", "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=config.parent,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"API listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the service did not start:\n{log.read_text()[-3000:]}")


def stop_service(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
