"""Webhook deliveries: signed deliveries per second on one core, and delivery → job running.

The service runs as its own process (`python -m matrixjobs run`, SQLite store, its API on
a free loopback port), pinned to one core (`--core`, default 0); the bench's client runs
on the others. One webhook `[webhooks.bench]` (GitHub) starts a target whose handler does
nothing (`webhooks:Noop`, from this file), so what is measured is the delivery's path:
read, signature, rate window, event and branch filter, args, App.trigger (the store's
transaction with the dedupe key and the audit record), the answer, and the queue's claim.
Each delivery is GitHub's push payload (tests/data/webhooks/github_push.json) with its
X-Hub-Signature-256 and a delivery id of its own, so each one starts a job.

* Throughput: `--deliveries` sent by `--concurrency` clients at once, as fast as the
  service answers; deliveries/s = 201 answers / wall time. The service's CPU over that
  window comes from /proc/<pid>/stat (1.0 = one core busy).
* Latency: `--latency-deliveries` sent at `--rate` per second; each job's `startedAt`
  (when a worker claimed it, the service's clock) minus the moment its delivery was sent
  (the bench's clock; same machine): p50 and p99.
* Reference: the same throughput run against a bare Starlette endpoint served by uvicorn
  on the same core that only reads the body and checks its HMAC (the ceiling of any
  receiver in this stack); the ratio says what the rest of ours costs.

Usage: python bench/webhooks.py [--deliveries 3000] [--concurrency 32]
                                [--latency-deliveries 1000] [--rate 200] [--core 0]

The last line printed is JSON only:
  {"per_s": …, "goal_per_s": 500, "p50_ms": …, "p99_ms": …, "goal_p99_ms": 50,
   "reference_per_s": …, "ratio": …, "service_cpu_cores": …}
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
from service import start_service, stop_service

GOAL_PER_S = 500.0
GOAL_P99_MS = 50.0
HERE = Path(__file__).resolve().parent
PAYLOAD = HERE.parent / "tests" / "data" / "webhooks" / "github_push.json"
WARMUP = 50
CONTENT_LENGTH = re.compile(rb"(?i)content-length: *(\d+)")
STARTUP_TIMEOUT_S = 30.0
REFERENCE = '''
import hashlib, hmac, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

SECRET = sys.argv[2].encode()

async def hook(request):
    body = await request.body()
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    given = request.headers.get("x-hub-signature-256", "")
    if not hmac.compare_digest(expected.encode(), given.encode()):
        return JSONResponse({"error": "bad signature"}, 401)
    return JSONResponse({"id": "j1"}, 201)

app = Starlette(routes=[Route("/hooks/bench", hook, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, server_header=False)
'''


class Noop:
    """The target's handler: nothing to run, so the bench measures the delivery."""

    async def run(self, job: Any, progress: Any) -> None:
        return None


def config_text(directory: Path, synchronous: str = "full") -> str:
    return f"""
[store]
path = "{directory / 'matrixjobs.db'}"
synchronous = "{synchronous}"
[queue]
workers = 8
[api]
listen = "127.0.0.1:0"
[handlers]
noop = "webhooks:Noop"
[targets.deploy]
handler = "noop"
args_pattern = "[a-z0-9/]+"
[webhooks.bench]
provider = "github"
target = "deploy"
branches = ["main", "release/*"]
args = ["{{branch}}", "{{short_sha}}"]
max_per_minute = 100000
"""


def signed(secret: str, body: bytes) -> Callable[[str], dict[str, str]]:
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()

    def headers(delivery: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-GitHub-Event": "push",
                "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": signature}

    return headers


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """One keep-alive HTTP/1.1 connection, requests written and answers read by hand: a
    client library would cost more CPU per request than the servers measured here."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers.items())]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = CONTENT_LENGTH.search(head)
        answer = await self.reader.readexactly(int(length[1]) if length else 0)
        return int(head[9:12]), answer

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def deliver(connection: Connection, body: bytes, headers: dict[str, str]) -> str:
    """Send one delivery; the id of the job it started."""
    status, answer = await connection.post("/hooks/bench", headers, body)
    if status != 201:
        raise RuntimeError(f"{status} {answer[:300]!r}")
    return str(json.loads(answer)["id"])


async def flood(url: str, body: bytes, headers: Callable[[str], dict[str, str]], count: int,
                concurrency: int, prefix: str) -> float:
    """Send `count` deliveries, `concurrency` at a time: the seconds it took."""
    numbers = iter(range(count))
    connections = [await Connection.open(url) for _ in range(concurrency)]

    async def sender(connection: Connection) -> None:
        for number in numbers:
            await deliver(connection, body, headers(f"{prefix}-{number}"))

    begun = time.perf_counter()
    await asyncio.gather(*(sender(connection) for connection in connections))
    seconds = time.perf_counter() - begun
    for connection in connections:
        await connection.close()
    return seconds


async def paced(url: str, body: bytes, headers: Callable[[str], dict[str, str]], count: int,
                rate: float) -> dict[str, float]:
    """Send `count` deliveries at `rate` per second: job id → send time."""
    sent: dict[str, float] = {}
    idle: list[Connection] = []

    async def one(number: int) -> None:
        connection = idle.pop() if idle else await Connection.open(url)
        started = time.time()
        sent[await deliver(connection, body, headers(f"paced-{number}"))] = started
        idle.append(connection)

    begun = time.monotonic()
    tasks = []
    for number in range(count):
        await asyncio.sleep(max(0.0, begun + number / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(number)))
    await asyncio.gather(*tasks)
    for connection in idle:
        await connection.close()
    return sent


async def started_at(url: str, token: str, ids: set[str]) -> dict[str, float]:
    """When each job started (its `startedAt`), once all of them have."""
    found: dict[str, float] = {}
    async with httpx2.AsyncClient(base_url=url, timeout=60,
                                  headers={"Authorization": f"Bearer {token}"}) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = await client.get("/v1/jobs", params={"limit": 1000})
            for job in answer.json()["jobs"]:
                if job["id"] in ids and job.get("startedAt"):
                    found[job["id"]] = datetime.fromisoformat(job["startedAt"]).timestamp()
            if ids <= found.keys():
                return found
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{len(ids - found.keys())} jobs never started")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def pinned(core: int) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, {core})


async def measure_ours(args: argparse.Namespace, body: bytes) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as temporary:
        return await _measure_ours(args, body, Path(temporary))


async def _measure_ours(args: argparse.Namespace, body: bytes,
                        directory: Path) -> dict[str, float]:
    secret, token = secrets.token_hex(32), secrets.token_urlsafe(32)
    config = directory / "config.toml"
    config.write_text(config_text(directory, args.synchronous), encoding="utf-8")
    env = {"MATRIXJOBS_WEBHOOK_BENCH_SECRET": secret, "MATRIXJOBS_API_TOKEN": token,
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {args.core})  # the service inherits the one core
    try:
        proc, url = start_service(config, directory / "service.log", env)
    finally:
        os.sched_setaffinity(0, (mine - {args.core}) or mine)
    headers = signed(secret, body)
    try:
        await flood(url, body, headers, WARMUP, 4, "warmup")
        cpu = cpu_seconds(proc.pid)
        seconds = await flood(url, body, headers, args.deliveries, args.concurrency, "d")
        cores = (cpu_seconds(proc.pid) - cpu) / seconds
        await asyncio.sleep(1.0)  # the flood's jobs run out before latency is measured
        sent = await paced(url, body, headers, args.latency_deliveries, args.rate)
        started = await started_at(url, token, set(sent))
    finally:
        stop_service(proc)
    latencies = [(started[job] - sent[job]) * 1000 for job in sent]
    return {"per_s": args.deliveries / seconds, "service_cpu_cores": cores,
            "p50_ms": statistics.median(latencies), "p99_ms": percentile(latencies, 0.99)}


async def measure_reference(args: argparse.Namespace, body: bytes) -> float:
    secret = secrets.token_hex(32)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", REFERENCE, str(port), secret],
                            preexec_fn=pinned(args.core))
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for_port(url)
        headers = signed(secret, body)
        await flood(url, body, headers, WARMUP, 4, "warmup")
        seconds = await flood(url, body, headers, args.deliveries, args.concurrency, "r")
    finally:
        proc.terminate()
        proc.wait(10)
    return args.deliveries / seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for_port(url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx2.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                await client.get("/")
                return
            except httpx2.TransportError:
                await asyncio.sleep(0.05)
    raise RuntimeError("the reference server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-deliveries", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--core", type=int, default=0)
    # "full" (the default config) fsyncs each delivery's transaction: the disk's sync
    # latency, not the CPU, may then bound the rate.
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    body = PAYLOAD.read_bytes()
    ours = asyncio.run(measure_ours(args, body))
    reference = asyncio.run(measure_reference(args, body))
    print(f"ours:      {ours['per_s']:8.0f} signed deliveries/s, each starting a job "
          f"(goal ≥ {GOAL_PER_S:.0f}); the service used {ours['service_cpu_cores']:.2f} cores")
    print(f"latency:   delivery → job running p50 {ours['p50_ms']:.1f} ms, p99 "
          f"{ours['p99_ms']:.1f} ms at {args.rate:.0f}/s (goal p99 ≤ {GOAL_P99_MS:.0f} ms)")
    print(f"reference: {reference:8.0f} deliveries/s (bare Starlette, HMAC check only); "
          f"ours is {ours['per_s'] / reference:.2f} of it")
    print(json.dumps({**{k: round(v, 2) for k, v in ours.items()}, "goal_per_s": GOAL_PER_S,
                      "goal_p99_ms": GOAL_P99_MS, "reference_per_s": round(reference, 1),
                      "ratio": round(ours["per_s"] / reference, 3)}))


if __name__ == "__main__":
    main()
