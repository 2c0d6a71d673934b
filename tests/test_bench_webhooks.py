"""bench/webhooks.py still runs end to end: a small run of each part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service_process import child_env

BENCH = Path(__file__).resolve().parent.parent / "bench" / "webhooks.py"


def test_webhooks_bench_measures_ours_and_the_reference_and_ends_with_its_json_line():
    run = subprocess.run(
        [sys.executable, str(BENCH), "--deliveries", "100", "--concurrency", "4",
         "--latency-deliveries", "20", "--rate", "50"],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["per_s"] > 0 and figures["reference_per_s"] > 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
