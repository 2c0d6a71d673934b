"""Dashboard load: N running jobs, M open dashboard pages on `GET /v1/events`.

The service runs as its own process (`python -m matrixjobs run --config …`, the API
on a free loopback port with a token, `[progress] interval_ms = --interval-ms`,
`[queue] workers = --jobs`), so its CPU can be read from /proc/<pid>/stat
(utime + stime of the service process only; the job subprocesses are not the
service). Each job is a command target printing `::progress i/N` every
`--step-ms` for `--job-seconds`.

The bench submits `--jobs` jobs (`POST /v1/jobs`), waits until all of them run,
then opens `--pages` event streams with httpx2 (one AsyncClient, one connection
each; not browsers) and reads them for `--seconds`. Each client only stamps every
received chunk with time.time() and keeps the bytes; SSE is parsed after the run
so that the bench's own parsing cannot delay the reads it measures. A ticker
task records the bench loop's lag, so a client-side bottleneck would show.

Delay of an event = receipt time of its chunk - its `updatedAt` (set with
time.time() when the monitor built it; same machine clock). Only `event: update`
messages count (a `refresh` re-sends an old event to move its elapsed time and
would measure nothing); the snapshot is skipped. CPU = service CPU seconds over
the measured window / its wall time (1.0 = one core busy).

Usage: python bench/dashboard_load.py [--jobs 200] [--pages 50] [--seconds 15]
                                      [--interval-ms 500] [--step-ms 100]

The last line printed is JSON only:
  {"p99_ms": …, "p99_target_ms": 200, "cpu_cores": …, "cpu_target_cores": 1.0, …}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
from service import start_service, stop_service

P99_TARGET_MS = 200.0
CPU_TARGET_CORES = 1.0
UPDATED_AT = re.compile(rb'"updatedAt":"([^"]+)"')

JOB_CODE = """
import sys, time
seconds, step_ms = float(sys.argv[1]), float(sys.argv[2])
steps = max(1, int(seconds * 1000 / step_ms))
for step in range(1, steps + 1):
    time.sleep(step_ms / 1000)
    print(f"::progress {step}/{steps} step {step}", flush=True)
"""


# -- the service process --------------------------------------------------------------------------


def write_config(directory: Path, jobs: int, interval_ms: int) -> Path:
    command = json.dumps([sys.executable, "-c", JOB_CODE])
    path = directory / "config.toml"
    path.write_text(f"""
[store]
path = {json.dumps(str(directory / "mj.db"))}

[queue]
workers = {jobs}
max_retries = 0

[progress]
interval_ms = {interval_ms}

[api]
listen = "127.0.0.1:0"

[targets.tick]
command = {command}
args_pattern = "[0-9.]{{1,10}}"
max_retries = 0
""")
    return path


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the clients ----------------------------------------------------------------------------------


class Page:
    """One dashboard's event stream: stamped chunks, parsed afterwards."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.ready = asyncio.Event()

    async def read(self, client: httpx2.AsyncClient) -> None:
        async with client.stream("GET", "/v1/events") as response:
            response.raise_for_status()
            async for chunk in response.aiter_raw():
                self.chunks.append((time.time(), chunk))
                self.ready.set()

    def delays(self, since: float, until: float) -> list[float]:
        """Seconds from each update's `updatedAt` to the receipt of its last byte."""
        found, buffer, offset = [], b"", 0
        for received, chunk in self.chunks:
            buffer += chunk
            while (end := buffer.find(b"\n\n", offset)) >= 0:
                message, offset = buffer[offset:end], end + 2
                if since <= received <= until and b"\nevent: update\n" in message:
                    stamp = UPDATED_AT.search(message)
                    if stamp:
                        found.append(received - parse_time(stamp.group(1)))
            buffer, offset = buffer[offset:], 0
        return found


def parse_time(raw: bytes) -> float:
    return datetime.fromisoformat(raw.decode().replace("Z", "+00:00")).timestamp()


async def lag_ticker(lags: list[float], period: float = 0.05) -> None:
    while True:
        before = time.monotonic()
        await asyncio.sleep(period)
        lags.append(time.monotonic() - before - period)


async def submit_all(client: httpx2.AsyncClient, jobs: int, args: argparse.Namespace) -> None:
    seconds = str(args.seconds + args.ramp_seconds)
    for _ in range(jobs):
        response = await client.post("/v1/jobs", json={"target": "tick",
                                                       "args": [seconds, str(args.step_ms)]})
        response.raise_for_status()


async def wait_running(client: httpx2.AsyncClient, jobs: int, timeout: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        active = (await client.get("/v1/status")).json()["active"]
        if sum(item["status"] == "processing" for item in active) >= jobs:
            return time.monotonic() - began
        await asyncio.sleep(0.2)
    raise RuntimeError(f"not all {jobs} jobs were running after {timeout} s")


async def measure(url: str, token: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=args.pages + 5, max_keepalive_connections=args.pages)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=None,
                                  limits=limits) as client:
        await submit_all(client, args.jobs, args)
        ramp_s = await wait_running(client, args.jobs, args.ramp_seconds)
        pages = [Page() for _ in range(args.pages)]
        readers = [asyncio.create_task(page.read(client)) for page in pages]
        await asyncio.wait_for(asyncio.gather(*(page.ready.wait() for page in pages)), 30)
        lags: list[float] = []
        ticker = asyncio.create_task(lag_ticker(lags))
        since, cpu_before = time.time(), proc_cpu_s(pid)
        await asyncio.sleep(args.seconds)
        until, cpu_after = time.time(), proc_cpu_s(pid)
        ticker.cancel()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, ticker, return_exceptions=True)
    delays = sorted(delay for page in pages for delay in page.delays(since, until))
    return {"delays": delays, "cpu_cores": (cpu_after - cpu_before) / (until - since),
            "seconds": until - since, "ramp_s": ramp_s, "lag_max_ms": max(lags) * 1000}


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    delays: list[float] = result["delays"]
    assert delays, "no update events were received"
    p50, p99 = percentile(delays, 0.50) * 1000, percentile(delays, 0.99) * 1000
    cpu, seconds = result["cpu_cores"], result["seconds"]
    print(f"{args.jobs} running jobs, {args.pages} pages, interval {args.interval_ms} ms, "
          f"measured {seconds:.1f} s (all running {result['ramp_s']:.1f} s after the last submit)")
    print(f"update events received: {len(delays)} ({len(delays) / args.pages / seconds:.0f}/s "
          f"per page)")
    print(f"event delay: p50 {p50:.1f} ms, p99 {p99:.1f} ms (target < {P99_TARGET_MS:.0f} ms), "
          f"max {delays[-1] * 1000:.1f} ms, mean {statistics.fmean(delays) * 1000:.1f} ms")
    print(f"service CPU: {cpu:.2f} cores (target < {CPU_TARGET_CORES:.1f})")
    print(f"bench loop lag max: {result['lag_max_ms']:.1f} ms "
          f"(high means the clients, not the service, were slow)")
    return {"p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "p99_target_ms": P99_TARGET_MS,
            "cpu_cores": round(cpu, 2), "cpu_target_cores": CPU_TARGET_CORES,
            "events": len(delays), "jobs": args.jobs, "pages": args.pages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window")
    parser.add_argument("--ramp-seconds", type=float, default=60.0,
                        help="time allowed for every job to start")
    parser.add_argument("--interval-ms", type=int, default=500)
    parser.add_argument("--step-ms", type=int, default=100)
    args = parser.parse_args()
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="dashboard-load-") as tmp:
        directory = Path(tmp)
        config = write_config(directory, args.jobs, args.interval_ms)
        proc, url = start_service(config, directory / "service.log",
                                  {"MATRIXJOBS_API_TOKEN": token})
        try:
            result = asyncio.run(measure(url, token, proc.pid, args))
        finally:
            stop_service(proc)
    print(json.dumps(report(result, args)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
