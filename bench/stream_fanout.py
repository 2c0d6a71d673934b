"""NDJSON fan-out: N concurrent `GET /v1/status/{id}?stream=true` subscribers on one job.

The service runs as its own process (`python -m matrixjobs run --config …`, the
API on a free loopback port, `[progress] interval_ms = --interval-ms`), so its
memory can be read from /proc: VmRSS before the subscribers connect, VmHWM
(peak RSS) at the end, VmRSS after every stream closed. The job is a command
target printing `::progress i/N` every `--step-ms` for `--job-seconds`.

The bench process submits the job (`POST /v1/jobs`), then opens `--subscribers`
streams (at most `--connect-concurrency` connections being set up at a time)
and reads them until the service closes each one after the terminal event.
The clients are plain asyncio Protocols speaking HTTP/1.1 (`Connection: close`)
that only stamp each received chunk with `time.time()` and keep the bytes; JSON
is parsed after the run, so the client side stays cheap (an HTTP client
library per stream on 2 cores would measure itself). A ticker task records the
bench loop's lag, so a client-side bottleneck would show.

Latency of an event = receipt time (time.time() when its last byte was read)
- its `updatedAt` (set with time.time() when the server built the event; same
machine clock). The first line of each stream (the state at subscribe time) is
not a fresh event and is skipped. Reported over all other lines ("all") and
over the events created after every subscriber had its first line ("steady",
i.e. without the connection ramp).

Usage: python bench/stream_fanout.py [--subscribers 1000] [--job-seconds 8]
                                     [--interval-ms 100] [--step-ms 50]

The last line printed is JSON only:
  {"ours": p99 ms (all events), "anchor": 200 (target ms), "ratio": ours/anchor, ...}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from service import start_service, stop_service

TARGET_MS = 200.0
TERMINAL = {"completed", "failed", "cancelled"}

JOB_CODE = """
import sys, time
seconds, step_ms = float(sys.argv[1]), float(sys.argv[2])
steps = max(1, int(seconds * 1000 / step_ms))
for step in range(1, steps + 1):
    time.sleep(step_ms / 1000)
    print(f"::progress {step}/{steps} step {step}", flush=True)
"""


# -- the service process --------------------------------------------------------------------------


def write_config(directory: Path, interval_ms: int) -> Path:
    command = json.dumps([sys.executable, "-c", JOB_CODE])
    text = f"""
[store]
path = {json.dumps(str(directory / "mj.db"))}

[queue]
workers = 2
max_retries = 0

[progress]
interval_ms = {interval_ms}

[api]
listen = "127.0.0.1:0"

[targets.fanout]
command = {command}
args_pattern = "[0-9.]{{1,10}}"
max_retries = 0
"""
    path = directory / "config.toml"
    path.write_text(text)
    return path


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM etc. from /proc/<pid>/status, in kB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- HTTP ------------------------------------------------------------------------------------------


async def request(host: str, port: int, method: str, path: str,
                  body: bytes = b"") -> tuple[int, bytes]:
    """One small HTTP/1.1 request with `Connection: close`; returns status and body."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    writer.write(head.encode() + body)
    raw = await reader.read()
    writer.close()
    header, _, payload = raw.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in header.lower():
        payload = b"".join(line for _, line in dechunk(payload))
    return status, payload


def dechunk(data: bytes) -> list[tuple[int, bytes]]:
    """Chunked body → [(offset of the chunk's end in `data`, chunk)] (complete chunks only)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return out
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return out
        start = end + 2
        if len(data) < start + size + 2:
            return out
        out.append((start + size, data[start:start + size]))
        pos = start + size + 2


class Subscriber(asyncio.Protocol):
    """One NDJSON stream: stamps each received piece of data, parses nothing while running."""

    def __init__(self, request_bytes: bytes) -> None:
        self.request_bytes = request_bytes
        self.pieces: list[tuple[float, bytes]] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request_bytes)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.pieces.append((now, data))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def lines(self) -> list[tuple[float, bytes]]:
        """[(receipt time, NDJSON line)], the time being that of the line's last byte."""
        raw = b"".join(data for _, data in self.pieces)
        header_end = raw.find(b"\r\n\r\n")
        if header_end < 0 or not raw.startswith(b"HTTP/1.1 200"):
            return []
        base = header_end + 4
        ends: list[int] = []  # cumulative end offset of each piece
        total = 0
        for _, data in self.pieces:
            total += len(data)
            ends.append(total)
        out: list[tuple[float, bytes]] = []
        piece = 0
        buffered = b""
        for end, chunk in dechunk(raw[base:]):
            while ends[piece] < base + end:
                piece += 1
            buffered += chunk
            *complete, buffered = buffered.split(b"\n")
            out.extend((self.pieces[piece][0], line) for line in complete if line)
        return out


class LoopLag:
    """How late a 10 ms sleep wakes up in this (the clients') event loop."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.lags.append(loop.time() - before - 0.01)


# -- the run ---------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def fan_out(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    host, port_text = url.removeprefix("http://").rsplit(":", 1)
    port = int(port_text)
    loop = asyncio.get_running_loop()
    lag = LoopLag()
    ticker = asyncio.create_task(lag.run())

    rss_before = proc_status(pid)["VmRSS"]
    cpu_before = proc_cpu_s(pid)
    bench_cpu_before = time.process_time()
    started = time.perf_counter()

    body = json.dumps({"target": "fanout",
                       "args": [str(args.job_seconds), str(args.step_ms)]}).encode()
    status, payload = await request(host, port, "POST", "/v1/jobs", body)
    if status != 201:
        raise RuntimeError(f"POST /v1/jobs answered {status}: {payload[:300]!r}")
    job_id = json.loads(payload)["id"]

    stream_request = (f"GET /v1/status/{job_id}?stream=true HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Accept: application/x-ndjson\r\nConnection: close\r\n\r\n").encode()
    gate = asyncio.Semaphore(args.connect_concurrency)
    subscribers: list[Subscriber] = []
    failures: list[str] = []

    async def subscribe() -> None:
        async with gate:
            try:
                _, protocol = await loop.create_connection(
                    lambda: Subscriber(stream_request), host, port)
            except OSError as exc:
                failures.append(repr(exc))
                return
            subscribers.append(protocol)

    await asyncio.gather(*(subscribe() for _ in range(args.subscribers)))
    connected = time.perf_counter()
    timeout = args.job_seconds + 120
    await asyncio.wait_for(asyncio.gather(*(s.done for s in subscribers)), timeout)
    finished = time.perf_counter()
    service_cpu = proc_cpu_s(pid) - cpu_before
    bench_cpu = time.process_time() - bench_cpu_before
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker

    await asyncio.sleep(1.0)  # let the service drop what the streams held
    memory = proc_status(pid)
    all_first = max((s.first_at or 0.0) for s in subscribers) if subscribers else 0.0

    latencies: list[float] = []
    steady: list[float] = []
    per_subscriber: list[int] = []
    saw_terminal = 0
    final_status: dict[str, int] = {}
    for sub in subscribers:
        lines = sub.lines()
        if not lines:
            per_subscriber.append(0)
            continue
        events = [(t, json.loads(line)) for t, line in lines]
        last = events[-1][1]
        if last.get("status") in TERMINAL:
            saw_terminal += 1
            final_status[last["status"]] = final_status.get(last["status"], 0) + 1
        per_subscriber.append(len(events) - 1)
        for received, event in events[1:]:
            created = datetime.fromisoformat(event["updatedAt"]).timestamp()
            latency = (received - created) * 1000
            latencies.append(latency)
            if created >= all_first:
                steady.append(latency)

    return {
        "job_id": job_id,
        "connected": len(subscribers),
        "connect_failures": failures,
        "connect_s": connected - started,
        "wall_s": finished - started,
        "latencies": latencies,
        "steady": steady,
        "per_subscriber": per_subscriber,
        "saw_terminal": saw_terminal,
        "final_status": final_status,
        "rss_before_kb": rss_before,
        "rss_peak_kb": memory["VmHWM"],
        "rss_after_kb": memory["VmRSS"],
        "service_cpu_s": service_cpu,
        "bench_cpu_s": bench_cpu,
        "loop_lag_ms": [x * 1000 for x in lag.lags],
    }


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"p50": statistics.median(values), "p99": percentile(values, 99),
            "max": max(values)}


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="NDJSON stream fan-out: latency and peak RSS")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--job-seconds", type=float, default=8.0,
                        help="how long the job keeps reporting progress")
    parser.add_argument("--interval-ms", type=int, default=100,
                        help="the service's [progress] interval_ms")
    parser.add_argument("--step-ms", type=float, default=50.0,
                        help="the job prints ::progress this often")
    parser.add_argument("--connect-concurrency", type=int, default=100,
                        help="connections being set up at the same time")
    parser.add_argument("--dir", default=None, help="parent of the temporary directory")
    args = parser.parse_args()
    if min(args.subscribers, args.job_seconds, args.interval_ms, args.step_ms,
           args.connect_concurrency) <= 0:
        parser.error("all numbers must be positive")

    # Both sides hold one socket per subscriber; the service inherits the limit.
    nofile = raise_nofile(args.subscribers * 2 + 1024)
    if nofile < args.subscribers + 256:
        parser.error(f"open-files limit {nofile} is too low for {args.subscribers} subscribers")

    with tempfile.TemporaryDirectory(prefix="mj-fanout-", dir=args.dir) as tmp:
        directory = Path(tmp)
        config = write_config(directory, args.interval_ms)
        proc, url = start_service(config, directory / "service.log")
        try:
            result = asyncio.run(fan_out(url, proc.pid, args))
        finally:
            stop_service(proc)

    n = args.subscribers
    everything = summary(result["latencies"])
    steady = summary(result["steady"])
    per_sub = result["per_subscriber"]
    lag = result["loop_lag_ms"]
    lag_p99 = percentile(lag, 99) if lag else float("nan")
    mib = 1024.0
    print(f"{result['connected']:,} of {n:,} subscribers on job {result['job_id']} "
          f"({args.job_seconds:g} s, progress every {args.step_ms:g} ms, "
          f"interval_ms={args.interval_ms}); connect phase {result['connect_s']:.2f} s, "
          f"wall {result['wall_s']:.2f} s")
    if result["connect_failures"]:
        print(f"  connect failures: {len(result['connect_failures'])} "
              f"(first: {result['connect_failures'][0]})")
    print(f"  events per subscriber (after the first line): min {min(per_sub, default=0)}, "
          f"median {statistics.median(per_sub) if per_sub else 0:g}, "
          f"max {max(per_sub, default=0)}; {len(result['latencies']):,} events in all")
    print(f"  saw the terminal event: {result['saw_terminal']:,} of {n:,} "
          f"{result['final_status']}")
    print(f"  latency, all events     : p50 {everything['p50']:7.1f} ms  "
          f"p99 {everything['p99']:7.1f} ms  max {everything['max']:7.1f} ms")
    print(f"  latency, after the ramp : p50 {steady['p50']:7.1f} ms  "
          f"p99 {steady['p99']:7.1f} ms  max {steady['max']:7.1f} ms  "
          f"({len(result['steady']):,} events)")
    print(f"  service RSS: {result['rss_before_kb'] / mib:.1f} MiB before, "
          f"peak {result['rss_peak_kb'] / mib:.1f} MiB, "
          f"{result['rss_after_kb'] / mib:.1f} MiB after the streams closed")
    print(f"  CPU during the run: service {result['service_cpu_s']:.2f} s, "
          f"bench clients {result['bench_cpu_s']:.2f} s "
          f"(wall {result['wall_s']:.2f} s, {os.cpu_count()} CPUs); "
          f"client loop lag p99 {lag_p99:.1f} ms, max {max(lag, default=0):.1f} ms")
    print(f"  p99 target < {TARGET_MS:g} ms: "
          f"{'met' if everything['p99'] < TARGET_MS else 'MISSED'}")
    print(json.dumps({
        "ours": round(everything["p99"], 2),
        "anchor": TARGET_MS,
        "ratio": round(everything["p99"] / TARGET_MS, 3),
        "p50_ms": round(everything["p50"], 2),
        "max_ms": round(everything["max"], 2),
        "steady_p50_ms": round(steady["p50"], 2),
        "steady_p99_ms": round(steady["p99"], 2),
        "subscribers": n,
        "connected": result["connected"],
        "saw_terminal": result["saw_terminal"],
        "events_per_subscriber": statistics.median(per_sub) if per_sub else 0,
        "events_total": len(result["latencies"]),
        "peak_rss_mib": round(result["rss_peak_kb"] / mib, 1),
        "rss_before_mib": round(result["rss_before_kb"] / mib, 1),
        "rss_after_mib": round(result["rss_after_kb"] / mib, 1),
        "service_cpu_s": round(result["service_cpu_s"], 2),
        "bench_cpu_s": round(result["bench_cpu_s"], 2),
        "client_loop_lag_p99_ms": round(lag_p99, 1),
        "connect_s": round(result["connect_s"], 3),
        "wall_s": round(result["wall_s"], 3),
        "job_seconds": args.job_seconds,
        "interval_ms": args.interval_ms,
    }))


if __name__ == "__main__":
    main()
