"""bench/containment.py still runs end to end: a tiny run of both modes, figures not judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from containment import needs_bwrap
from service_process import child_env

BENCH = Path(__file__).resolve().parent.parent / "bench" / "containment.py"
POSITIVE = ("contained_p50_ms", "uncontained_p50_ms", "contained_p99_ms",
            "uncontained_p99_ms", "contained_jobs_s", "uncontained_jobs_s", "ratio",
            "contained_spawn_p50_ms", "uncontained_spawn_p50_ms")


def test_containment_bench_measures_both_modes_and_ends_with_its_json_line(tmp_path):
    needs_bwrap()
    run = subprocess.run(
        [sys.executable, str(BENCH), "--latency-jobs", "3", "--jobs", "8", "--workers", "2",
         "--rounds", "2", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    for key in POSITIVE:
        assert isinstance(figures[key], float | int) and figures[key] > 0, (key, figures)
    assert figures["added_p50_ms"] == pytest.approx(
        figures["contained_p50_ms"] - figures["uncontained_p50_ms"], abs=0.01)
    assert figures["mechanism"].startswith("bubblewrap")
    assert "contained by: bubblewrap" in run.stdout
