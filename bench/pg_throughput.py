"""PostgreSQL queues side by side in one run: `matrixjobs worker` processes vs procrastinate's.

Both sides run on the same PostgreSQL server (`--url`, default 127.0.0.1:5432); every
measurement gets a fresh database, created here and dropped after. Both sides' jobs
are in bench/pg_handlers.py (ours, `[handlers]`) and bench/pg_procrastinate.py
(procrastinate tasks); both run `--concurrency` jobs at once per process (ours:
`[queue] workers`, procrastinate: `worker --concurrency`), and
keep their other defaults (connection pools: 4 connections each; ours keeps job logs
and results, procrastinate keeps its jobs and events rows). Ours logs at info level
(start and stop only), procrastinate at warning (its info logs every job).

throughput  For each P in `--procs`: P worker processes start and are left to settle until
            all of them wait for work (ours: each logged "matrixjobs started"; theirs: P
            rows in procrastinate_workers; then 0.5 s), so that P processes share the
            whole backlog rather than the first one up draining it. Then `--jobs` no-op
            jobs are added in one transaction (ours: the store's add_jobs, one INSERT;
            theirs: `batch_defer_async`), timed apart ("enqueue"), and the database is
            ANALYZEd at once (`--no-analyze` skips it: without statistics for the freshly
            filled table procrastinate's fetch reads every waiting job, 4x slower; a
            live deployment has them). The database is polled until all jobs are
            finished. jobs/s = N / (the last job's end - the first job's start), both
            read from the database afterwards (ours: jobs.started_at / finished_at;
            theirs: procrastinate_events 'started' / 'succeeded'); "from the commit" =
            N / (the last end - the enqueue's commit), which adds the wake-up.
pickup      One idle worker process (a warm-up job has run, then 1 s idle); `--pickup-jobs`
            jobs are added one at a time, `--pickup-gap-ms` apart (ours: add_jobs with one
            job; theirs: defer_async). latency = the handler's time.time() as its first
            statement - time.time() right after the enqueue call returned (its transaction
            committed); same machine, same clock. Can be slightly negative: a worker woken
            by the commit may start before the client has read the commit's reply.
progress    Ours only: a `matrixjobs run` node (`[queue] workers = 0`, API on) and one
            `matrixjobs worker` running `--progress-jobs` jobs at once, each reporting its
            time.time() as the progress message every 0.2 s for `--progress-seconds`; a
            subscriber on the run node's `GET /v1/events` (SSE, every job) takes
            latency = receipt of an `update` - the time in its message. Includes both
            nodes' `[progress] interval_ms` throttles (default 500 ms, kept).

Usage: python bench/pg_throughput.py [--jobs 10000] [--procs 1,2,4] [--rounds 1]
           [--concurrency 10] [--url postgresql://127.0.0.1:5432] [--pickup-jobs 200]
           [--pickup-gap-ms 20] [--progress-jobs 100] [--progress-seconds 10]
           [--skip-anchor] [--skip-ours] [--no-analyze]

The last line printed is JSON only (4-process figures, or the largest P asked for):
  {"ours": jobs/s, "anchor": procrastinate jobs/s, "ratio": ours/anchor,
   "pickup_p50_ms", "pickup_p99_ms", "anchor_pickup_p50_ms", "anchor_pickup_p99_ms",
   "progress_p99_ms", ...}
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
import psycopg
from pg_handlers import STAMPS_ENV
from pg_procrastinate import URL_ENV
from pg_procrastinate import app as anchor_app
from procrastinate import PsycopgConnector
from psycopg import sql
from service import start_service, stop_service

from matrixjobs.models import JobSpec
from matrixjobs.store.postgres import PostgresStore

BENCH = Path(__file__).resolve().parent
SERVER = "postgresql://127.0.0.1:5432"
POLL_S = 0.1
TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0
IDLE_BEFORE_S = 0.5  # ready workers settle into waiting for work
LAST_EVENTS_S = 1.0  # the updates a run node sends after the last job ended
TIMEOUT_PER_JOB_S = 3600.0
LOG_LEVEL = "warning"
STARTED = "matrixjobs started (worker)"

# -- databases and processes --------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new empty database on `server`, dropped after; yields its URL."""
    name = f"mj_bench_{secrets.token_hex(4)}"
    parts = urlsplit(server)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIXJOBS_", "BENCH_"))}
    path = [str(BENCH), *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", **extra}


class Processes:
    """Child processes whose output goes to files in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, argv: Sequence[str], env: dict[str, str], name: str) -> None:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.directory, env=env)
        self.procs.append((proc, log))

    def logs(self) -> list[str]:
        return [log.read_text(errors="replace") for _, log in self.procs]

    def check(self) -> None:
        """Raise if any of them has exited."""
        for proc, log in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.stem} exited with {proc.returncode}:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")

    async def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc, _ in self.procs:
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float,
                   processes: Processes | None = None) -> None:
    """Poll the async `condition()` every POLL_S until it is true."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if processes is not None:
            processes.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


def read_stamps(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    stamps: dict[str, float] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        key, _, at = line.partition(" ")
        stamps[key] = float(at)
    return stamps


# -- the two sides ------------------------------------------------------------------------------


class Side(abc.ABC):
    name: str
    # Counts (claimed or finished, finished, failed) and the span (first start, last end)
    # in epoch seconds, read from the side's own tables.
    counts_sql: str
    span_sql: str

    @abc.abstractmethod
    async def setup(self, url: str, directory: Path) -> None:
        """Create the side's schema in the empty database `url`."""

    @abc.abstractmethod
    async def enqueue_bulk(self, url: str, n: int) -> None:
        """Add `n` no-op jobs in one transaction."""

    @abc.abstractmethod
    async def ready(self, conn: psycopg.AsyncConnection[Any], processes: Processes,
                    count: int) -> bool:
        """Whether `count` worker processes have started and wait for work."""

    @abc.abstractmethod
    def enqueuer(self, url: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """An open client whose `add(key)` adds one stamp job and returns when committed."""

    @abc.abstractmethod
    def worker(self, url: str, directory: Path, index: int, concurrency: int,
               stamps: Path) -> tuple[list[str], dict[str, str]]:
        """argv and env of one worker process."""


class Ours(Side):
    name = "ours"
    counts_sql = ("SELECT count(*) FILTER (WHERE status <> 'pending'), "
                  "count(*) FILTER (WHERE finished_at IS NOT NULL), "
                  "count(*) FILTER (WHERE status = 'failed') FROM jobs")
    span_sql = "SELECT min(started_at), max(finished_at) FROM jobs"

    @staticmethod
    def spec(target: str, args: Sequence[str] = ()) -> JobSpec:
        """What App.submit would add for `target` of the bench config (bench_config)."""
        data = {"target": target, "args": list(args), "params": {}}
        return JobSpec(type=target, data=data, name=" ".join([target, *args]), max_retries=0,
                       timeout_s=TIMEOUT_PER_JOB_S, requester="bench")

    @contextlib.asynccontextmanager
    async def store(self, url: str) -> AsyncIterator[PostgresStore]:
        store = PostgresStore(url)
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    async def setup(self, url: str, directory: Path) -> None:
        async with self.store(url):
            pass  # opening migrates

    async def enqueue_bulk(self, url: str, n: int) -> None:
        async with self.store(url) as store:
            await store.add_jobs([self.spec("noop")] * n, time.time())

    async def ready(self, conn: psycopg.AsyncConnection[Any], processes: Processes,
                    count: int) -> bool:
        # Logged once its queue runs (at info level, which logs nothing per job).
        return sum(STARTED in text for text in processes.logs()) >= count

    @contextlib.asynccontextmanager
    async def enqueuer(self, url: str) -> AsyncIterator[Any]:
        async with self.store(url) as store:
            async def add(key: str) -> None:
                await store.add_jobs([self.spec("stamp", [key])], time.time())
            yield add

    def worker(self, url: str, directory: Path, index: int, concurrency: int,
               stamps: Path) -> tuple[list[str], dict[str, str]]:
        config = bench_config(directory / f"worker-{index}.toml", workers=concurrency,
                              worker_name=f"bench-{index}")
        argv = [sys.executable, "-m", "matrixjobs", "worker", "--config", str(config),
                "--log-level", "info"]
        return argv, child_env({"MATRIXJOBS_DATABASE_URL": url, STAMPS_ENV: str(stamps)})


class Procrastinate(Side):
    name = "procrastinate"
    counts_sql = ("SELECT count(*) FILTER (WHERE status <> 'todo'), "
                  "count(*) FILTER (WHERE status NOT IN ('todo', 'doing')), "
                  "count(*) FILTER (WHERE status NOT IN ('todo', 'doing', 'succeeded')) "
                  "FROM procrastinate_jobs")
    # `at` is now() of the writing transaction: the server's clock, the machine's.
    span_sql = ("SELECT extract(epoch FROM min(at) FILTER (WHERE type = 'started'))::float8, "
                "extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded'))::float8 "
                "FROM procrastinate_events")

    @contextlib.asynccontextmanager
    async def app(self, url: str) -> AsyncIterator[Any]:
        with anchor_app.replace_connector(PsycopgConnector(conninfo=url)) as app:
            async with app.open_async():
                yield app

    async def setup(self, url: str, directory: Path) -> None:
        argv = [sys.executable, "-m", "procrastinate", "--app=pg_procrastinate.app",
                "schema", "--apply"]
        proc = await asyncio.create_subprocess_exec(
            *argv, env=child_env({URL_ENV: url}), cwd=directory,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"procrastinate schema --apply failed:\n{out.decode()[-3000:]}")

    async def enqueue_bulk(self, url: str, n: int) -> None:
        async with self.app(url) as app:
            task = app.tasks["noop"]
            await task.batch_defer_async(*[{}] * n)

    async def ready(self, conn: psycopg.AsyncConnection[Any], processes: Processes,
                    count: int) -> bool:
        # A worker registers itself as it starts, before it fetches its first job.
        cursor = await conn.execute("SELECT count(*) FROM procrastinate_workers")
        row = await cursor.fetchone()
        return row is not None and row[0] >= count

    @contextlib.asynccontextmanager
    async def enqueuer(self, url: str) -> AsyncIterator[Any]:
        async with self.app(url) as app:
            task = app.tasks["stamp"]

            async def add(key: str) -> None:
                await task.defer_async(key=key)
            yield add

    def worker(self, url: str, directory: Path, index: int, concurrency: int,
               stamps: Path) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, "-m", "procrastinate", "--app=pg_procrastinate.app",
                f"--log-level={LOG_LEVEL}", "worker", f"--concurrency={concurrency}",
                f"--name=bench-{index}"]
        return argv, child_env({URL_ENV: url, STAMPS_ENV: str(stamps)})


def bench_config(path: Path, workers: int, worker_name: str | None = None,
                 api: bool = False) -> Path:
    """A matrixjobs config for the bench's processes; the database URL comes from
    MATRIXJOBS_DATABASE_URL. Targets are named as their handlers (Ours.spec)."""
    worker = f'[worker]\nname = "{worker_name}"\n' if worker_name else ""
    api_section = 'listen = "127.0.0.1:0"' if api else "enabled = false"
    path.write_text(f"""
[store]
backend = "postgresql"
path = {json.dumps(str(path.with_suffix(".db")))}

[queue]
workers = {workers}
max_retries = 0

[api]
{api_section}

{worker}
[handlers]
noop = "pg_handlers:Noop"
stamp = "pg_handlers:Stamp"
tick = "pg_handlers:Ticker"

[targets.noop]
handler = "noop"

[targets.stamp]
handler = "stamp"
args_pattern = "[0-9a-z]{{1,20}}"

[targets.tick]
handler = "tick"
args_pattern = "[0-9.]{{1,10}}"
""")
    return path


async def fetch_one(url: str, query: str) -> tuple[Any, ...]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(query)
        row = await cursor.fetchone()
    assert row is not None
    return row


# -- throughput ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Throughput:
    rate: float  # jobs/s, first start to last end in the database
    from_commit_rate: float  # jobs/s, the enqueue's commit to the last end (wake-up included)
    enqueue_s: float


async def throughput(side: Side, server: str, n: int, procs: int, concurrency: int,
                     analyze: bool) -> Throughput:
    with fresh_database(server) as url, tempfile.TemporaryDirectory(prefix="pg-bench-") as tmp:
        directory = Path(tmp)
        await side.setup(url, directory)
        processes = Processes(directory)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            async def all_ready() -> bool:
                return await side.ready(conn, processes, procs)

            async def all_finished() -> bool:
                cursor = await conn.execute(side.counts_sql)
                row = await cursor.fetchone()
                return row is not None and row[1] >= n

            try:
                for index in range(procs):
                    processes.start(*side.worker(url, directory, index, concurrency,
                                                 directory / "stamps"), f"worker-{index}")
                await wait_for(all_ready, f"{side.name}: {procs} workers", READY_TIMEOUT_S,
                               processes)
                await asyncio.sleep(IDLE_BEFORE_S)
                started = time.perf_counter()
                await side.enqueue_bulk(url, n)
                committed = time.time()
                enqueue_s = time.perf_counter() - started
                if analyze:
                    await conn.execute("ANALYZE")
                await wait_for(all_finished, f"{side.name}: {n} jobs", TIMEOUT_S, processes)
            finally:
                await processes.stop()
        _, finished, failed = await fetch_one(url, side.counts_sql)
        first, last = await fetch_one(url, side.span_sql)
    if failed or finished != n:
        raise RuntimeError(f"{side.name}: {finished} of {n} finished, {failed} failed")
    return Throughput(n / (last - first), n / (last - committed), enqueue_s)


# -- pickup latency -----------------------------------------------------------------------------


async def pickup(side: Side, server: str, count: int, gap_s: float,
                 concurrency: int) -> list[float]:
    """Each job's start - its enqueue call's return, in seconds."""
    with fresh_database(server) as url, tempfile.TemporaryDirectory(prefix="pg-bench-") as tmp:
        directory = Path(tmp)
        stamps = directory / "stamps"
        await side.setup(url, directory)
        processes = Processes(directory)
        processes.start(*side.worker(url, directory, 0, concurrency, stamps), "worker-0")
        try:
            async with side.enqueuer(url) as add:
                await add("warmup")

                async def warmed_up() -> bool:
                    return "warmup" in read_stamps(stamps)

                await wait_for(warmed_up, f"{side.name}: a worker to start", READY_TIMEOUT_S,
                               processes)
                await asyncio.sleep(1.0)
                added: dict[str, float] = {}
                for number in range(count):
                    await add(str(number))
                    added[str(number)] = time.time()
                    await asyncio.sleep(gap_s)

                async def all_started() -> bool:
                    return len(read_stamps(stamps)) > count

                await wait_for(all_started, f"{side.name}: {count} stamp jobs", READY_TIMEOUT_S,
                               processes)
        finally:
            await processes.stop()
        started = read_stamps(stamps)
    return [started[key] - at for key, at in added.items()]


# -- cross-process progress ---------------------------------------------------------------------


async def progress_latency(server: str, jobs: int, seconds: float) -> list[float]:
    """Ours only: receipt of each progress update on the run node's /v1/events - the time the
    worker reported in it, in seconds."""
    with fresh_database(server) as url, tempfile.TemporaryDirectory(prefix="pg-bench-") as tmp:
        directory = Path(tmp)
        env = child_env({"MATRIXJOBS_DATABASE_URL": url})
        run_config = bench_config(directory / "run.toml", workers=0, api=True)
        service, api = start_service(run_config, directory / "run.log", env)
        processes = Processes(directory)
        try:
            processes.start([sys.executable, "-m", "matrixjobs", "worker", "--config",
                             str(bench_config(directory / "worker.toml", workers=jobs,
                                              worker_name="bench-progress")),
                             "--log-level", LOG_LEVEL], env, "worker")
            received = await run_ticks(api, url, jobs, seconds, processes)
        finally:
            await processes.stop()
            stop_service(service)
    latencies = [at - float(event["message"]) for at, event in map(parse, received)
                 if event["status"] == "processing" and event.get("message")]
    if not latencies:
        raise RuntimeError(f"no progress update of {jobs} jobs arrived on the run node's "
                           "/v1/events")
    return latencies


async def run_ticks(api: str, url: str, jobs: int, seconds: float,
                    processes: Processes) -> list[tuple[float, str]]:
    """Submit `jobs` tick jobs through the API and keep the updates about them until all
    ended in the database (and a last interval after): [(receipt time, the SSE message's
    data)]."""
    received: list[tuple[float, str]] = []
    async with httpx2.AsyncClient(base_url=api, timeout=30) as client:
        listening = asyncio.Event()
        reader = asyncio.create_task(read_updates(client, received, listening))
        try:
            await asyncio.wait_for(listening.wait(), READY_TIMEOUT_S)
            for _ in range(jobs):
                response = await client.post("/v1/jobs",
                                             json={"target": "tick", "args": [str(seconds)]})
                response.raise_for_status()
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                async def all_ended() -> bool:
                    cursor = await conn.execute(Ours.counts_sql)
                    row = await cursor.fetchone()
                    return row is not None and row[1] >= jobs

                await wait_for(all_ended, f"{jobs} tick jobs to end",
                               seconds + READY_TIMEOUT_S, processes)
            await asyncio.sleep(LAST_EVENTS_S)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx2.HTTPError):
                await reader
    return received


def parse(item: tuple[float, str]) -> tuple[float, dict[str, Any]]:
    return item[0], json.loads(item[1])["event"]


async def read_updates(client: httpx2.AsyncClient, received: list[tuple[float, str]],
                       listening: asyncio.Event) -> None:
    """Keep every SSE `update` message's data with its receipt time; JSON is parsed later,
    so the reader stays cheap."""
    async with client.stream("GET", "/v1/events") as response:
        response.raise_for_status()
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                listening.set()  # the snapshot came: updates from now on reach us
            elif line.startswith("data: ") and kind == "update":
                received.append((time.time(), line[6:]))


# -- main ---------------------------------------------------------------------------------------


def percentile_ms(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def procs_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("process counts must be positive")
    return values


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="matrixjobs worker vs procrastinate on "
                                                 "PostgreSQL: throughput and latencies")
    parser.add_argument("--jobs", type=int, default=10_000, help="no-op jobs per measurement")
    parser.add_argument("--procs", type=procs_list, default=[1, 2, 4],
                        help="worker process counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds, alternating which side goes first; medians reported")
    parser.add_argument("--concurrency", type=int, default=10, help="jobs at once per process")
    parser.add_argument("--url", default=SERVER,
                        help="the PostgreSQL server to create the throwaway databases on")
    parser.add_argument("--pickup-jobs", type=int, default=200, help="0: no pickup latency")
    parser.add_argument("--pickup-gap-ms", type=float, default=20.0)
    parser.add_argument("--progress-jobs", type=int, default=100,
                        help="0: no progress latency")
    parser.add_argument("--progress-seconds", type=float, default=10.0)
    parser.add_argument("--skip-anchor", action="store_true", help="ours only")
    parser.add_argument("--skip-ours", action="store_true", help="procrastinate only")
    parser.add_argument("--no-analyze", dest="analyze", action="store_false",
                        help="no ANALYZE between the bulk enqueue and the workers")
    args = parser.parse_args()
    if min(args.jobs, args.rounds, args.concurrency) < 1:
        parser.error("--jobs, --rounds and --concurrency must be positive")
    if min(args.pickup_jobs, args.progress_jobs, args.pickup_gap_ms, args.progress_seconds) < 0:
        parser.error("--pickup-jobs, --pickup-gap-ms, --progress-jobs and --progress-seconds "
                     "must not be negative")
    if args.skip_anchor and args.skip_ours:
        parser.error("--skip-anchor and --skip-ours leave nothing to measure")
    try:
        with psycopg.connect(urlunsplit(urlsplit(args.url)._replace(path="/postgres")),
                             connect_timeout=5):
            pass
    except psycopg.Error as exc:
        parser.error(f"no PostgreSQL at {args.url}: {str(exc).strip().splitlines()[0]}")
    return args


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    sides: list[Side] = [*([] if args.skip_ours else [Ours()]),
                         *([] if args.skip_anchor else [Procrastinate()])]
    rates: dict[tuple[str, int], list[Throughput]] = {}
    pickups: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        order = sides if round_ % 2 == 0 else sides[::-1]
        for procs in args.procs:
            for side in order:
                result = await throughput(side, args.url, args.jobs, procs, args.concurrency,
                                          args.analyze)
                rates.setdefault((side.name, procs), []).append(result)
                print(f"  round {round_ + 1} {side.name:<13} {procs} proc: "
                      f"{result.rate:8.0f} jobs/s ({result.from_commit_rate:6.0f} from the commit; "
                      f"enqueue {result.enqueue_s:.2f} s)", flush=True)
        for side in order if args.pickup_jobs else ():
            latencies = await pickup(side, args.url, args.pickup_jobs,
                                     args.pickup_gap_ms / 1000, args.concurrency)
            pickups.setdefault(side.name, []).extend(latencies)
            print(f"  round {round_ + 1} {side.name:<13} pickup p50 "
                  f"{percentile_ms(latencies, 0.5):.1f} ms, p99 "
                  f"{percentile_ms(latencies, 0.99):.1f} ms", flush=True)
    progress = ([] if args.skip_ours or not args.progress_jobs else
                await progress_latency(args.url, args.progress_jobs, args.progress_seconds))
    return {"rates": rates, "pickups": pickups, "progress": progress}


def report(args: argparse.Namespace, measured: dict[str, Any]) -> None:
    rates: dict[tuple[str, int], list[Throughput]] = measured["rates"]

    def rate(side: str, procs: int, wall: bool = False) -> float | None:
        results = rates.get((side, procs), [])
        return median([r.from_commit_rate if wall else r.rate for r in results])

    def shown(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    def ratio(ours: float | None, anchor: float | None) -> float | None:
        return None if ours is None or anchor is None else ours / anchor

    print(f"{args.jobs:,} no-op jobs, concurrency {args.concurrency} per process, "
          f"median of {args.rounds} round(s); jobs/s from the first start to the last end "
          f"(from the enqueue's commit in brackets):")
    print(f"  {'procs':>5}  {'ours':>16}  {'procrastinate':>16}  {'ratio':>6}")
    for procs in args.procs:
        ours, anchor = rate("ours", procs), rate("procrastinate", procs)
        print(f"  {procs:>5}  {shown(ours):>7} ({shown(rate('ours', procs, True)):>6})  "
              f"{shown(anchor):>7} ({shown(rate('procrastinate', procs, True)):>6})  "
              f"{shown(ratio(ours, anchor), 2):>6}")
    pickups: dict[str, list[float]] = measured["pickups"]
    latency: dict[str, float | None] = {}
    for side in ("ours", "procrastinate"):
        values = pickups.get(side)
        latency[f"{side}_p50"] = percentile_ms(values, 0.5) if values else None
        latency[f"{side}_p99"] = percentile_ms(values, 0.99) if values else None
        if values:
            print(f"pickup latency, {side} (idle worker, {args.pickup_jobs} jobs "
                  f"{args.pickup_gap_ms:g} ms apart): p50 {latency[side + '_p50']:.1f} ms, "
                  f"p99 {latency[side + '_p99']:.1f} ms, min {1000 * min(values):.1f} ms")
    progress: list[float] = measured["progress"]
    progress_p99 = percentile_ms(progress, 0.99) if progress else None
    if progress:
        print(f"progress latency, worker → run node's /v1/events ({args.progress_jobs} jobs, "
              f"{len(progress)} updates): p50 {percentile_ms(progress, 0.5):.0f} ms, "
              f"p99 {progress_p99:.0f} ms (target p99 <= 1000 ms)")
    headline = 4 if 4 in args.procs else max(args.procs)
    ours, anchor = rate("ours", headline), rate("procrastinate", headline)

    def rounded(value: float | None, digits: int = 1) -> float | None:
        return None if value is None else round(value, digits)

    print(json.dumps({
        "ours": rounded(ours),
        "anchor": rounded(anchor),
        "ratio": rounded(ratio(ours, anchor), 3),
        "pickup_p50_ms": rounded(latency["ours_p50"], 2),
        "pickup_p99_ms": rounded(latency["ours_p99"], 2),
        "anchor_pickup_p50_ms": rounded(latency["procrastinate_p50"], 2),
        "anchor_pickup_p99_ms": rounded(latency["procrastinate_p99"], 2),
        "progress_p99_ms": rounded(progress_p99),
        "procs": headline,
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "analyze": args.analyze,
        "by_procs": {str(p): {"ours": rounded(rate("ours", p)),
                              "anchor": rounded(rate("procrastinate", p))}
                     for p in args.procs},
    }))


def main() -> None:
    args = arguments()
    report(args, asyncio.run(measure(args)))


if __name__ == "__main__":
    main()
