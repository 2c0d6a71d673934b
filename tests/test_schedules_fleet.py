"""Schedules on a fleet: three real `matrixjobs` processes (two `run` nodes, one `worker`)
on one PostgreSQL store, each running the same schedule; every slot starts exactly one
job, whichever node gets there first."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from fleet import api, free_port, node_config, python_command, start, wait_for
from service_process import Service

TARGETS = {"tick": {"command": python_command("print('tick')")}}


def fleet(tmp_path: Path, pg_url: str, cron: str, port: int) -> list[Service]:
    nodes = []
    for number, command in enumerate(("run", "run", "worker")):
        name = f"n{number}"
        config = node_config(tmp_path / name, pg_url, TARGETS, workers=1, name=name,
                             api_port=port if number == 0 else None)
        with config.open("a", encoding="utf-8") as text:
            text.write(f'[schedules.tick]\ncron = "{cron}"\ntarget = "tick"\n')
        nodes.append(start(tmp_path / name, config, command, name))
    return nodes


def slots_started(port: int) -> Counter[str]:
    """How many jobs each slot started."""
    jobs = api(port, "GET", "/v1/jobs?limit=1000")["jobs"]
    return Counter(job["trigger"]["slot"] for job in jobs
                   if job.get("requester") == "schedule:tick")


def one_job_a_slot(tmp_path: Path, pg_url: str, cron: str, slots: int, within: float,
                   period: float) -> None:
    port = free_port()
    nodes = fleet(tmp_path, pg_url, cron, port)
    try:
        counted = wait_for(lambda: (found := slots_started(port)) and len(found) >= slots
                           and found, within, f"{slots} slots")
        time.sleep(1.0)  # a late second job of a slot would show by now
        counted = slots_started(port)
    finally:
        for node in nodes:
            node.stop()
    assert set(counted.values()) == {1}, counted
    started = sorted(datetime.fromisoformat(slot) for slot in counted)
    gaps = {round((later - earlier).total_seconds())
            for earlier, later in itertools.pairwise(started)}
    assert gaps == {period}, started  # no slot left out between the first and the last
    for node in nodes:
        assert "Traceback" not in node.log, node.log


def test_three_processes_start_one_job_for_each_two_second_slot(tmp_path, pg_url):
    one_job_a_slot(tmp_path, pg_url, "*/2 * * * * *", slots=5, within=40, period=2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_three_processes_start_one_job_per_minute_of_a_minutely_schedule(tmp_path, pg_url):
    one_job_a_slot(tmp_path, pg_url, "* * * * *", slots=2, within=200, period=60)
