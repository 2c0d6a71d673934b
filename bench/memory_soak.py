"""Memory over many jobs: run N trivial jobs through the real service and print RSS.

    python bench/memory_soak.py --jobs 100000

The whole path is exercised: durable SQLite store, dispatcher, workers, monitor
trackers, and one subscriber reading every event. Prints RSS every 10% and a
last JSON line. The "anchor" is the RSS after the first 10% of jobs (warm
caches); "ratio" is final RSS / anchor, so a flat line is ~1.0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path

from matrixjobs.app import App
from matrixjobs.config import Config
from matrixjobs.models import JobSpec, Status
from matrixjobs.queue.handlers import HandlerRegistry

CHUNK = 1000


class Noop:
    async def run(self, job, progress):
        progress.report(1, 1)
        return None


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def soak(jobs: int, directory: Path) -> dict[str, float]:
    config = Config.model_validate({"store": {"path": str(directory / "soak.db")}})
    handlers = HandlerRegistry()
    handlers.register("noop", Noop())
    app = App(config, handlers=handlers)
    await app.start()
    terminal = 0

    async def read_events() -> None:
        nonlocal terminal
        with app.monitor.subscribe() as events:
            async for event in events:
                if event.terminal:
                    terminal += 1

    reader = asyncio.create_task(read_events())
    spec = JobSpec(type="noop", data={}, name="noop")
    samples = []
    started = time.perf_counter()
    step = max(jobs // 10, CHUNK)
    done = 0
    try:
        while done < jobs:
            count = min(step, jobs - done)
            for offset in range(0, count, CHUNK):
                await app.queue.enqueue_many([spec] * min(CHUNK, count - offset))
            done += count
            while await app.store.list_jobs([Status.PENDING, Status.PROCESSING], limit=1):
                await asyncio.sleep(0.01)
            samples.append(rss_mib())
            print(f"{done:>8} jobs  {time.perf_counter() - started:6.1f} s  "
                  f"RSS {samples[-1]:6.1f} MiB  trackers {len(app.monitor.active_ids())}  "
                  f"events read {terminal}")
    finally:
        reader.cancel()
        await app.stop()
    return {"ours": samples[-1], "anchor": samples[0], "ratio": round(samples[-1] / samples[0], 3),
            "jobs": jobs, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mj-soak-") as tmp:
        result = asyncio.run(soak(args.jobs, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
