"""bench/pg_throughput.py still runs end to end against ours: a small run of every part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pg_fixtures import SERVER
from service_process import child_env

BENCH = Path(__file__).resolve().parent.parent / "bench" / "pg_throughput.py"


def test_pg_throughput_bench_measures_ours_and_ends_with_its_json_line():
    run = subprocess.run(
        [sys.executable, str(BENCH), "--jobs", "200", "--procs", "1", "--skip-anchor",
         "--pickup-jobs", "10", "--progress-jobs", "5", "--progress-seconds", "2",
         "--url", SERVER],
        capture_output=True, text=True, timeout=90, env=child_env(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["ours"] > 0 and figures["anchor"] is None
    assert figures["pickup_p50_ms"] is not None and figures["progress_p99_ms"] > 0
