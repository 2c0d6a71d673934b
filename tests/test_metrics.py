"""GET /metrics: Prometheus metrics of a real service, read back with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from helpers import final_state, python_target
from prometheus_client.parser import text_string_to_metric_families

from matrixjobs.app import App
from matrixjobs.metrics import Metrics
from matrixjobs.models import Job, Status

TOKEN = "metrics-test-token"
TARGETS = {
    "quick": python_target("print('done')"),
    "broken": python_target("import sys; sys.exit(3)", max_retries=1),
    "slow": python_target("import time; time.sleep(60)"),
    "count": python_target("print('::progress 1/1')", args_pattern="[0-9]{1,3}"),
}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def service(api_service: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: `app, client = await service(token=None, **sections)`, with TARGETS."""

    def start(token: str | None = None, **sections: Any) -> Any:
        sections.setdefault("targets", TARGETS)
        return api_service(token, **sections)

    return start


async def scrape(client: httpx2.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def submit(client: httpx2.AsyncClient, target: str, *args: str) -> str:
    response = await client.post("/v1/jobs", json={"target": target, "args": list(args)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def running(app: App, job_id: str) -> None:
    async for event in app.watch(job_id):
        if event.status == Status.PROCESSING:
            return


async def test_every_series_exists_at_zero_before_any_job(service):
    _, client = await service(queue={"workers": 3})
    samples = await scrape(client)
    for target in TARGETS:
        for outcome in ("completed", "failed", "cancelled"):
            assert value(samples, "matrixjobs_jobs_total", target=target, outcome=outcome) == 0
        assert value(samples, "matrixjobs_job_duration_seconds_count", target=target) == 0
    assert value(samples, "matrixjobs_job_queue_wait_seconds_count") == 0
    assert named(samples, "matrixjobs_jobs") == {
        frozenset({("state", status.value)}): 0 for status in Status}
    assert value(samples, "matrixjobs_workers") == 3
    assert value(samples, "matrixjobs_stream_subscribers") == 0
    assert value(samples, "matrixjobs_matrix_events_total", kind="sent") == 0
    assert value(samples, "matrixjobs_matrix_events_total", kind="edited") == 0
    assert value(samples, "matrixjobs_matrix_rate_limited_total") == 0


async def test_finished_jobs_are_counted_by_target_and_outcome(service):
    app, client = await service(queue={"workers": 1})
    done = await submit(client, "quick")
    with_args = await submit(client, "count", "7")
    failed = await submit(client, "broken")  # two runs: it has one retry
    assert (await final_state(app, done)).status == Status.COMPLETED
    assert (await final_state(app, with_args)).status == Status.COMPLETED
    assert (await final_state(app, failed)).status == Status.FAILED
    busy = await submit(client, "slow")
    await running(app, busy)
    waiting = await submit(client, "slow")  # pending behind `busy` (one worker)
    assert (await client.post(f"/v1/jobs/{waiting}/cancel")).status_code == 200
    assert (await client.post(f"/v1/jobs/{busy}/cancel")).status_code == 200

    samples = await scrape(client)
    counts = {(dict(labels)["target"], dict(labels)["outcome"]): v
              for labels, v in named(samples, "matrixjobs_jobs_total").items() if v}
    assert counts == {("quick", "completed"): 1, ("count", "completed"): 1,
                      ("broken", "failed"): 1, ("slow", "cancelled"): 2}
    durations = {dict(labels)["target"]: v for labels, v
                 in named(samples, "matrixjobs_job_duration_seconds_count").items()}
    # One per job that ran to its end; the slow job cancelled while pending never ran.
    assert durations == {"quick": 1, "count": 1, "broken": 1, "slow": 1}
    slow_sum = value(samples, "matrixjobs_job_duration_seconds_sum", target="slow")
    assert 0 < slow_sum < 30
    # One per run started: quick, count, broken twice, the running slow one.
    assert value(samples, "matrixjobs_job_queue_wait_seconds_count") == 5
    assert named(samples, "matrixjobs_jobs") == {
        frozenset({("state", "pending")}): 0, frozenset({("state", "processing")}): 0,
        frozenset({("state", "completed")}): 2, frozenset({("state", "failed")}): 1,
        frozenset({("state", "cancelled")}): 2}


async def test_jobs_gauge_and_subscribers_show_what_is_live(service):
    app, client = await service(queue={"workers": 1})
    busy = await submit(client, "slow")
    await running(app, busy)
    await submit(client, "quick")
    async with client.stream("GET", f"/v1/status/{busy}?stream=true") as response:
        async for line in response.aiter_lines():
            assert json.loads(line)["status"] == "processing"
            samples = await scrape(client)  # while the stream is open
            break
    assert value(samples, "matrixjobs_stream_subscribers") == 1
    assert value(samples, "matrixjobs_jobs", state="processing") == 1
    assert value(samples, "matrixjobs_jobs", state="pending") == 1


async def test_each_service_counts_only_its_own_jobs(service):
    first, first_client = await service()
    _, second_client = await service()
    await final_state(first, await submit(first_client, "quick"))
    assert value(await scrape(first_client), "matrixjobs_jobs_total",
                 target="quick", outcome="completed") == 1
    assert value(await scrape(second_client), "matrixjobs_jobs_total",
                 target="quick", outcome="completed") == 0


async def test_metrics_need_the_token_when_one_is_set(service):
    _, client = await service(token=TOKEN, api={"token": TOKEN})
    missing = await client.get("/metrics", headers={"Authorization": ""})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = await client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    await scrape(client)


async def test_metrics_without_a_token_refuse_a_foreign_host_or_origin(service):
    _, client = await service()
    foreign = await client.get("/metrics", headers={"Host": "evil.example"})
    assert foreign.status_code == 403
    cross = await client.get("/metrics", headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    await scrape(client)


def job(number: int, status: Status, **fields: Any) -> Job:
    return Job(id=f"j{number}", type="command", name="x", data={"target": "quick"},
               status=status, priority=0, retry_count=0, max_retries=0, timeout_s=60,
               created_at=100.0, **fields)


def test_a_retried_run_is_timed_from_its_own_start_and_counted_once_it_ends():
    now = [110.0]
    metrics = Metrics(["quick"], clock=lambda: now[0])
    first = job(1, Status.PROCESSING, started_at=110.0)
    metrics.job_started(first)  # waited 10 s since submitted
    metrics.job_settled(job(1, Status.PENDING, started_at=110.0, run_after=150.0))
    now[0] = 160.0
    metrics.job_started(job(1, Status.PROCESSING, started_at=110.0, run_after=150.0))
    metrics.job_settled(job(1, Status.COMPLETED, started_at=110.0, finished_at=163.0))
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in metrics.registry.collect() for s in family.samples}
    assert value(samples, "matrixjobs_jobs_total", target="quick", outcome="completed") == 1
    assert value(samples, "matrixjobs_job_duration_seconds_sum", target="quick") == 3.0
    assert value(samples, "matrixjobs_job_queue_wait_seconds_sum") == 20.0


def test_a_job_without_a_configured_target_is_labelled_by_its_handler_type():
    metrics = Metrics(["quick"])
    other = job(2, Status.FAILED)
    other.type, other.data = "sitebuild", {"target": "gone"}
    metrics.job_settled(other)
    labels = {frozenset(s.labels.items()) for family in metrics.registry.collect()
              for s in family.samples if s.name == "matrixjobs_jobs_total" and s.value}
    assert labels == {frozenset({("target", "sitebuild"), ("outcome", "failed")})}


async def test_scrapes_while_jobs_finish_never_fail(service):
    app, client = await service(queue={"workers": 4})
    ids = [await submit(client, "quick") for _ in range(8)]
    scrapes = [scrape(client) for _ in range(8)]
    await asyncio.gather(*scrapes, *(final_state(app, job_id) for job_id in ids))
    samples = await scrape(client)
    assert value(samples, "matrixjobs_jobs_total", target="quick", outcome="completed") == 8
