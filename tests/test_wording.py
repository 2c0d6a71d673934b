"""One wording of progress for every view: the cases, and the room, CLI and MCP agreeing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from matrixjobs.api.feed import texts
from matrixjobs.console.display import detail_text, plain_line
from matrixjobs.matrix.render import render_progress
from matrixjobs.mcp.server import describe
from matrixjobs.models import Batch, Job, Status, Trigger, TriggerKind
from matrixjobs.progress import wording
from matrixjobs.progress.events import JobProgressEvent, ProgressInfo, batch_event, job_event
from matrixjobs.schedules import ScheduleInfo

NOW = 1_700_000_000.0


def job(progress: ProgressInfo | None = None, eta: float | None = None,
        **fields: Any) -> JobProgressEvent:
    values: dict[str, Any] = {
        "id": "j12", "type": "command", "name": "docs", "data": {},
        "status": Status.PROCESSING, "priority": 0, "retry_count": 0, "max_retries": 2,
        "timeout_s": 600.0, "created_at": NOW - 70, "started_at": NOW - 65,
    }
    values.update(fields)
    return job_event(Job(**values), NOW, progress, None, eta)


def at(current: float, total: float | None) -> ProgressInfo:
    percentage = None if total is None else current / total * 100
    return ProgressInfo(current=current, total=total, percentage=percentage)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (4.9, "4s"), (59, "59s"), (60, "1m 00s"), (65, "1m 05s"), (600, "10m 00s"),
    (3599, "59m 59s"), (3600, "1h 00m"), (2 * 3600 + 3 * 60 + 59, "2h 03m"),
    (86400, "1d 0h"), (3 * 86400 + 4 * 3600 + 120, "3d 4h"),
    (-3, "0s"), (float("nan"), "0s"), (float("inf"), "0s"),
])
def test_durations_are_compact_and_cut_not_rounded(seconds, text):
    assert wording.duration(seconds) == text


@pytest.mark.parametrize(("percentage", "text"), [
    (0, "0%"), (0.4, "0%"), (34, "34%"), (34.99, "34%"), (99.9, "99%"), (99.99, "99%"),
    (100, "100%"), (150, "100%"), (-5, "0%"), (float("nan"), "0%"),
])
def test_percentages_round_down_so_only_finished_work_shows_100(percentage, text):
    assert wording.percent(percentage) == text


@pytest.mark.parametrize(("value", "text"), [
    (3.0, "3"), (0, "0"), (2.5, "2.5"), (1 / 3, "0.33"), (1e6, "1000000"),
    (float("nan"), "?"), (float("inf"), "?"),
])
def test_numbers_drop_a_needless_fraction(value, text):
    assert wording.number(value) == text


@pytest.mark.parametrize(("event", "percent", "counts"), [
    (job(), "", ""),
    (job(at(9, 20)), "45%", "9/20"),
    (job(at(2.5, 10)), "25%", "2.5/10"),
    (job(at(34, None)), "", "34 done"),
    (job(at(999, 1000)), "99%", "999/1000"),
    # Completed with a total never known: 100 %, everywhere.
    (job(at(34, None), status=Status.COMPLETED, finished_at=NOW), "100%", "34 done"),
    (job(status=Status.COMPLETED, finished_at=NOW), "100%", ""),
    (job(at(3, 10), status=Status.FAILED, finished_at=NOW, error="x"), "30%", "3/10"),
])
def test_percent_and_counts_of_an_event(event, percent, counts):
    assert wording.shown_percent(event) == percent
    assert wording.counts(event) == counts


def test_a_batch_counts_its_finished_operations():
    batch = Batch(id="b7", name="a, b, c", status=Status.PROCESSING, total=3,
                  created_at=NOW - 40, started_at=NOW - 30, completed=1, failed=1)
    event = batch_event(batch, NOW)
    assert wording.counts(event) == "2/3 operations"
    assert wording.shown_percent(event) == "66%"


@pytest.mark.parametrize(("event", "text"), [
    (job(status=Status.PENDING, started_at=None), "queued for 1m 10s"),
    (job(eta=30), "1m 05s elapsed · ETA 30s"),
    (job(), "1m 05s elapsed"),
    (job(status=Status.COMPLETED, finished_at=NOW - 5, eta=30), "took 1m 00s"),
    (job(status=Status.CANCELLED, started_at=None, finished_at=NOW),
     "never started (queued 1m 10s)"),
])
def test_timing(event, text):
    assert wording.timing(event, NOW) == text
    assert wording.eta(event) == ("ETA 30s" if "ETA" in text else "")


@pytest.mark.parametrize(("event", "text"), [
    (job(), "attempt 1/3"),
    (job(status=Status.PENDING, retry_count=1), "attempt 2/3"),  # waiting for its retry
    (job(retry_count=2, max_retries=2), "attempt 3/3"),
    (job(max_retries=0), "attempt 1/1"),
])
def test_attempt(event, text):
    assert wording.attempt(event) == text


def test_a_batch_has_no_attempt():
    batch = Batch(id="b3", name="all", status=Status.PROCESSING, total=3, completed=1,
                  created_at=NOW - 10, started_at=NOW - 9)
    assert wording.attempt(batch_event(batch, NOW)) == ""


@pytest.mark.parametrize("event", [
    job(at(999, 1000), eta=65),
    job(at(34, None), status=Status.COMPLETED, finished_at=NOW),
    job(at(2.5, 10), eta=3700),
])
def test_the_room_the_cli_and_mcp_say_the_same(event):
    room = render_progress(event, NOW).body
    cli = plain_line(event) + " " + detail_text(event)
    mcp = describe(event)
    for view in (room, cli, mcp):
        assert wording.shown_percent(event) in view
        assert wording.counts(event) in view
    for view in (room, cli):
        assert wording.eta(event) in view


def test_the_room_the_cli_and_the_dashboard_say_what_started_triggered_work():
    push = Trigger(TriggerKind.WEBHOOK, "site", event="push", branch="main", pusher="alice",
                   sha="3f2c1ab9d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4")
    event = job(trigger=push, requester="webhook:site")
    line = "🪝 push to main by alice (3f2c1ab)"
    assert line in render_progress(event, NOW).body.splitlines()
    assert line in detail_text(event)
    assert texts(event, NOW)["startedBy"] == line
    assert texts(job(), NOW)["startedBy"] == ""


def listed(cron: str, next_run: str) -> ScheduleInfo:
    return ScheduleInfo(
        name="tick", cron=cron, timezone="Europe/Berlin",
        next_run=datetime.fromisoformat(next_run), target="docs", batch=None, args=[],
        room=None, missed="latest", paused=False, paused_by=None, paused_at=None,
        last_run=None, last_job=None, last_status=None)


@pytest.mark.parametrize(("cron", "next_run", "text"), [
    ("*/10 * * * * *", "2027-01-15T09:00:10+01:00", "next 2027-01-15 09:00:10 CET"),
    ("*/10 * * * * *", "2027-01-15T09:00:00+01:00", "next 2027-01-15 09:00:00 CET"),
    ("0 3 * * *", "2027-01-16T03:00:00+01:00", "next 2027-01-16 03:00 CET"),
    ("@hourly", "2027-01-15T10:00:00+01:00", "next 2027-01-15 10:00 CET"),
])
def test_a_schedule_with_a_seconds_field_lists_its_next_run_to_the_second(cron, next_run,
                                                                        text):
    info = listed(cron, next_run)
    assert wording.schedule_when(info) == text
    assert text in wording.schedule(info)
