"""Workers on several processes sharing one PostgreSQL store: real `matrixjobs run` and
`matrixjobs worker` processes, a real server, and faults caused for real (kill -9, a
database connection cut through a proxy)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from containment import kill_marked, marked, new_marker, running_python
from fleet import api, free_port, node_config, python_command, start, wait_for
from helpers import make_config
from tcp_proxy import ProxyProcess

from matrixjobs.app import App
from matrixjobs.models import Outcome, Status
from matrixjobs.queue.remote import RESYNC_S
from matrixjobs.store.postgres import PostgresStore

STEPS = {"command": python_command("""
    import time
    for step in range(1, 21):
        time.sleep(0.05)
        print(f"::progress {step}/20 step {step}", flush=True)
""")}


def recording(seconds: float, runs: Path, retries: int = 0) -> dict[str, object]:
    """A target that notes each run (job id and pid) in `runs`, then works `seconds`."""
    return {"command": python_command(f"""
        import os, time
        with open({str(runs)!r}, "a") as f:
            f.write(os.environ["MATRIXJOBS_JOB_ID"] + " " + str(os.getpid()) + "\\n")
        for step in range(1, 11):
            time.sleep({seconds / 10})
            print(f"::progress {{step}}/10", flush=True)
    """), "max_retries": retries}


def job_state(port: int, job_id: str) -> dict[str, object]:
    return api(port, "GET", f"/v1/jobs/{job_id}")


def stream(port: int, job_id: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/v1/status/{job_id}?stream=true"
    with urllib.request.urlopen(url, timeout=60) as response:
        return [json.loads(line) for line in response if line.strip()]


@pytest.mark.timeout(90)
def test_a_worker_runs_what_the_run_node_queues_and_its_stream_follows_it(tmp_path, pg_url):
    port = free_port()
    targets = {"steps": STEPS}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port), "run", "node")
    worker = start(tmp_path / "w1", node_config(tmp_path / "w1", pg_url, targets,
                                                name="w1"), "worker", "w1")
    try:
        job = api(port, "POST", "/v1/jobs", {"target": "steps"})
        events = stream(port, job["id"])
    finally:
        worker.stop()
        node.stop()
    running = [e for e in events if e["status"] == "processing"]
    percentages = [e["progress"]["percentage"] for e in running if "progress" in e]
    assert len(percentages) >= 3, events  # live progress from the other process
    assert percentages == sorted(percentages)
    assert {e.get("worker") for e in running} == {"w1"}
    final = events[-1]
    assert (final["status"], final["worker"], final["progress"]["percentage"]) == (
        "completed", "w1", 100.0)
    assert "matrixjobs started (worker)" in worker.log


@pytest.mark.timeout(90)
def test_a_cancel_on_one_node_kills_the_job_on_its_worker_within_a_second(tmp_path, pg_url):
    port = free_port()
    marker = new_marker()
    targets = {"sleeper": {"command": python_command(f"""
        import time
        for step in range(600):  # {marker}
            print(f"::progress {{step}}/600", flush=True)
            time.sleep(0.1)
    """)}}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port), "run", "node")
    worker = start(tmp_path / "w1", node_config(tmp_path / "w1", pg_url, targets,
                                                name="w1"), "worker", "w1")
    try:
        job = api(port, "POST", "/v1/jobs", {"target": "sleeper"})
        wait_for(lambda: marked(marker), 20, "job process")
        wait_for(lambda: job_state(port, job["id"])["status"] == "processing", 10, "processing")
        asked = time.monotonic()
        cancelled = api(port, "POST", f"/v1/jobs/{job['id']}/cancel")
        wait_for(lambda: not marked(marker), 5, "the job's processes gone")
        took = time.monotonic() - asked
    finally:
        worker.stop()
        node.stop()
        kill_marked(marker)
    assert cancelled["status"] == "cancelled"
    assert took < 1.0, f"the job's processes lived {took:.2f} s after the cancel"


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_job_has_it_finished_by_another_within_the_lease(tmp_path, pg_url):
    port, lease_s = free_port(), 3
    runs = tmp_path / "runs"
    targets = {"slow": recording(2.0, runs, retries=1)}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port, lease_s=lease_s), "run", "node")
    workers = {name: start(tmp_path / name, node_config(tmp_path / name, pg_url, targets,
                                                       workers=1, name=name, lease_s=lease_s),
                           "worker", name) for name in ("w1", "w2")}
    try:
        job = api(port, "POST", "/v1/jobs", {"target": "slow"})
        running = wait_for(lambda: (s := job_state(port, job["id"]))["status"] == "processing"
                           and s, 20, "the job running")
        victim = running["worker"]
        workers[victim].process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        final = wait_for(lambda: (s := job_state(port, job["id"]))["status"] == "completed"
                         and s, lease_s + 15, "the job completed")
        took = time.monotonic() - killed
    finally:
        for worker in workers.values():
            worker.stop()
        node.stop()
    assert final["worker"] != victim
    assert final["jobDetails"]["retryCount"] == 1  # the interrupted run counts
    assert took <= lease_s + 5, f"finished {took:.1f} s after the kill"
    assert Counter(line.split()[0] for line in runs.read_text().splitlines()) == {job["id"]: 2}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_database_lost_for_10_s_loses_no_job_and_runs_none_twice(tmp_path, pg_url):
    port, count = free_port(), 24
    runs = tmp_path / "runs"
    targets = {"short": recording(0.6, runs)}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port), "run", "node")
    with ProxyProcess("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        worker = start(tmp_path / "w1", node_config(tmp_path / "w1", behind, targets,
                                                    name="w1"), "worker", "w1")
        try:
            jobs = [api(port, "POST", "/v1/jobs", {"target": "short"}) for _ in range(count)]
            wait_for(lambda: runs.exists() and len(runs.read_text().splitlines()) >= 3, 20,
                     "a few runs")
            proxy.cut()
            time.sleep(10)
            proxy.restore()
            def all_done() -> list[dict[str, object]] | None:
                found = [job_state(port, j["id"]) for j in jobs]
                return found if all(s["status"] == "completed" for s in found) else None

            states = wait_for(all_done, 60, "every job completed")
        finally:
            worker.stop()
            node.stop()
    assert [s["worker"] for s in states] == ["w1"] * count
    ran = Counter(line.split()[0] for line in runs.read_text().splitlines())
    assert ran == {job["id"]: 1 for job in jobs}, ran


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_worker_cut_off_past_its_lease_does_not_finish_a_job_taken_over(tmp_path, pg_url):
    """Fencing: the first worker keeps running, unaware; once back, its run is stopped and
    its outcome refused; the job ends as the second worker ran it."""
    port, lease_s = free_port(), 3
    runs = tmp_path / "runs"
    targets = {"long": recording(10.0, runs, retries=1)}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port, lease_s=lease_s), "run", "node")
    with ProxyProcess("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        first = start(tmp_path / "w1", node_config(tmp_path / "w1", behind, targets, workers=1,
                                                   name="w1", lease_s=lease_s), "worker", "w1")
        second = None
        try:
            job = api(port, "POST", "/v1/jobs", {"target": "long"})
            wait_for(lambda: job_state(port, job["id"]).get("worker") == "w1", 20, "w1 running")
            proxy.blackhole()
            second = start(tmp_path / "w2", node_config(tmp_path / "w2", pg_url, targets,
                                                        workers=1, name="w2", lease_s=lease_s),
                           "worker", "w2")
            wait_for(lambda: job_state(port, job["id"]).get("worker") == "w2", 20, "w2 took over")
            proxy.restore()
            first.wait_for_log("another worker took it over", timeout=15)
            # w1's copy is gone within the kill grace (1 s) + 1 s: w2's is the only one.
            wait_for(lambda: len(running_python(str(runs))) == 1, 2, "a single copy")
            final = wait_for(lambda: (s := job_state(port, job["id"]))["status"] == "completed"
                             and s, 30, "the job completed")
        finally:
            first.stop()
            if second is not None:
                second.stop()
            node.stop()
    assert (final["worker"], final["jobDetails"]["retryCount"]) == ("w2", 1)
    assert len(runs.read_text().splitlines()) == 2


@pytest.mark.timeout(90)
def test_a_job_no_live_worker_can_take_waits_says_why_and_runs_once_one_can(tmp_path, pg_url):
    port = free_port()
    targets = {"train": {**STEPS, "runs_on": ["gpu"]}, "steps": STEPS}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port), "run", "node")
    plain = start(tmp_path / "w1", node_config(tmp_path / "w1", pg_url, targets, name="w1"),
                  "worker", "w1")
    gpu = None
    try:
        job = api(port, "POST", "/v1/jobs", {"target": "train"})
        assert job["jobDetails"]["runsOn"] == ["gpu"]
        other = api(port, "POST", "/v1/jobs", {"target": "steps"})
        wait_for(lambda: job_state(port, other["id"])["status"] == "completed", 20,
                 "the unlabelled job done by w1")
        waiting = job_state(port, job["id"])
        assert (waiting["status"], waiting["message"]) == (
            "pending", "waiting for a worker with gpu")
        workers = {w["name"]: w for w in api(port, "GET", "/v1/workers")["workers"]}
        assert workers["w1"]["alive"] and workers["w1"]["labels"] == []
        gpu = start(tmp_path / "w2", node_config(tmp_path / "w2", pg_url, targets, name="w2",
                                                 labels=("gpu",)), "worker", "w2")
        final = wait_for(lambda: (s := job_state(port, job["id"]))["status"] == "completed"
                         and s, 20, "the gpu job done")
    finally:
        plain.stop()
        if gpu is not None:
            gpu.stop()
        node.stop()
    assert (final["worker"], final["message"]) == ("w2", "step 20")


class DeafStore(PostgresStore):
    """A store whose process hears no notifications (its listener is down, say)."""

    def listen(self, on_message: object, on_reconnect: object) -> None:
        return None


async def test_without_notifications_the_periodic_read_still_shows_a_job_run_elsewhere(
        tmp_path, pg_url):
    """A job queued here, started and finished by another process between two of this
    node's reads of the store, still ends in this node's streams."""
    config = make_config(tmp_path, targets={"steps": STEPS}, queue={"workers": 0},
                         store={"backend": "postgresql", "url": pg_url},
                         api={"enabled": False})
    app = App(config, store=DeafStore(pg_url))
    other = PostgresStore(pg_url)
    await app.start()
    await other.open()
    try:
        job = await app.submit("steps")
        events = app.monitor.subscribe(job.id)
        [claimed] = (await other.settle_and_claim([], "elsewhere", 1, time.time(), 60,
                                                  worker="w9")).claimed
        await other.settle_and_claim([Outcome(claimed.id, Status.COMPLETED, time.time())],
                                     "elsewhere", 0, time.time(), 60)
        final = await asyncio.wait_for(anext(aiter(events)), RESYNC_S + 5)
    finally:
        await other.close()
        await app.stop()
    assert (final.id, final.status, final.worker) == (job.id, Status.COMPLETED, "w9")
