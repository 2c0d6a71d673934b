"""Several processes hammer one PostgreSQL store at once (tests/store_hammer.py): workers
claim, settle, beat and die; clients add and cancel batches and jobs and recover leases.
No process may meet an error (a deadlock between them, say), and every batch must agree
with its jobs afterwards (a lost update would leave one unfinished forever)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

HAMMER = Path(__file__).with_name("store_hammer.py")
SECONDS = 6


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_processes_hammering_one_store_meet_no_deadlock_and_leave_batches_consistent(pg_url):
    roles = ["worker"] * 4 + ["client"] * 2
    processes = [subprocess.Popen([sys.executable, str(HAMMER), pg_url, role, str(SECONDS),
                                   str(seed)], stdout=subprocess.PIPE, text=True)
                 for seed, role in enumerate(roles)]
    errors: dict[str, int] = {}
    for process in processes:
        out, _ = process.communicate(timeout=90)
        assert process.returncode == 0
        errors.update(json.loads(out))
    assert errors == {}
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT b.id, b.status, b.completed, b.cancelled, b.failed, "
            "count(*) FILTER (WHERE j.status = 'completed'), "
            "count(*) FILTER (WHERE j.status = 'cancelled'), "
            "count(*) FILTER (WHERE j.status = 'failed'), "
            "count(*) FILTER (WHERE j.status IN ('pending', 'processing')) "
            "FROM batches b JOIN jobs j ON j.batch_id = b.id GROUP BY b.id").fetchall()
        settled = conn.execute("SELECT count(*) FROM jobs WHERE status IN "
                               "('completed', 'cancelled', 'failed')").fetchone()
    wrong = [row for row in rows if row[2:5] != row[5:8]
             or (row[1] in ("completed", "failed", "cancelled")) != (row[8] == 0)]
    assert len(rows) > 50 and settled and settled[0] > 500  # it did hammer
    assert wrong == [], f"{len(wrong)} of {len(rows)} batches disagree with their jobs"
