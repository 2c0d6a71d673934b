"""Several matrixjobs processes on one PostgreSQL store, for tests (`from fleet import …`)."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any

from service_process import Service

from matrixjobs.config import toml_list, toml_string


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def node_config(directory: Path, url: str, targets: dict[str, dict[str, Any]], *,
                workers: int = 2, name: str = "node", labels: tuple[str, ...] = (),
                lease_s: float = 60, api_port: int | None = None) -> Path:
    """A config for one process of a fleet: `targets` maps a name to {"command": argv,
    "runs_on": [...], "max_retries": n, "concurrency": group, "args_pattern": regex};
    `api_port` None: no API (a worker)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[store]", 'backend = "postgresql"', f"url = {toml_string(url)}",
        f'path = "{directory / "matrixjobs.db"}"',
        "[queue]", f"workers = {workers}", f"lease_s = {lease_s}", "retry_backoff_s = 0.1",
        "kill_grace_s = 1",
        "[worker]", f"name = {toml_string(name)}", f"labels = {toml_list(list(labels))}",
        "[progress]", "interval_ms = 100",
        "[api]",
        f'listen = "127.0.0.1:{api_port}"' if api_port else "enabled = false",
    ]
    for target, spec in targets.items():
        lines += [f"[targets.{target}]", f"command = {toml_list(spec['command'])}",
                  f"max_retries = {spec.get('max_retries', 0)}",
                  f"runs_on = {toml_list(spec.get('runs_on', []))}"]
        for key in ("concurrency", "args_pattern"):
            if key in spec:
                lines.append(f"{key} = {toml_string(spec[key])}")
    config = directory / "config.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def start(directory: Path, config: Path, command: str, name: str) -> Service:
    service = Service(directory, config, log_name=f"{name}.log", command=command)
    service.wait_until_started()
    return service


def api(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def answer(port: int, method: str, path: str,
           body: dict[str, Any] | None = None) -> tuple[int, Message, Any]:
    """(status, headers (any case), JSON body) of an API request, whatever the status."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")
