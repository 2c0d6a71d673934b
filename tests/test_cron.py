"""Cron slots in a time zone: the maths of matrixjobs/cron.py, DST days included, and the
[schedules.NAME] config errors that name their key."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from helpers import make_config, python_target
from pydantic import ValidationError

from matrixjobs.config import format_errors
from matrixjobs.cron import Cron

BERLIN = ZoneInfo("Europe/Berlin")


def at(*parts: int, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=BERLIN, fold=fold).timestamp()


def slots(cron: Cron, start: float, count: int) -> list[str]:
    found = []
    for _ in range(count):
        start = cron.next_after(start)
        found.append(cron.local(start).isoformat())
    return found


def test_a_daily_0230_in_berlin_runs_at_0300_on_the_spring_forward_day():
    cron = Cron.parse("30 2 * * *", "Europe/Berlin")
    assert slots(cron, at(2026, 3, 28, 12), 3) == [
        "2026-03-29T03:00:00+02:00",  # 02:30 does not exist: it runs as the clock jumps
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_a_daily_0230_in_berlin_runs_once_on_the_fall_back_day():
    cron = Cron.parse("30 2 * * *", "Europe/Berlin")
    assert slots(cron, at(2026, 10, 24, 12), 3) == [
        "2026-10-25T02:30:00+02:00",  # the first 02:30; the second (+01:00) is skipped
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]
    # Half-way through the repeated hour the last slot is still the first 02:30.
    assert cron.local(cron.latest_at(at(2026, 10, 25, 2, 45, fold=1))).isoformat() == \
        "2026-10-25T02:30:00+02:00"


def test_a_wildcard_hour_runs_by_the_clock_through_both_dst_changes():
    cron = Cron.parse("*/30 * * * *", "Europe/Berlin")
    assert slots(cron, at(2026, 3, 29, 1, 15), 3) == [
        "2026-03-29T01:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:30:00+02:00"]
    assert slots(cron, at(2026, 10, 25, 1, 45), 5) == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00", "2026-10-25T03:00:00+01:00"]


def test_the_latest_slot_includes_one_at_that_very_moment():
    cron = Cron.parse("0 3 * * *", "Europe/Berlin")
    assert cron.latest_at(at(2026, 1, 5, 3)) == at(2026, 1, 5, 3)
    assert cron.latest_at(at(2026, 1, 5, 2, 59)) == at(2026, 1, 4, 3)
    assert cron.next_after(at(2026, 1, 5, 3)) == at(2026, 1, 6, 3)


def test_a_sixth_field_counts_seconds_first_and_nicknames_expand():
    every_ten = Cron.parse("*/10 * * * * *")
    assert every_ten.next_after(1_000_000_001) == 1_000_000_010
    assert Cron.parse("@daily", "Europe/Berlin").next_after(at(2026, 1, 5, 12)) == \
        at(2026, 1, 6, 0)


@pytest.mark.parametrize(("expression", "said"), [
    ("0 3 * *", "is not a cron expression"),
    ("61 3 * * *", "is not a cron expression"),
    ("0 0 30 2 *", "matches no date"),
    ("0 3 * * * * 2026", "is not a cron expression"),
])
def test_an_invalid_cron_is_a_config_error_naming_its_key(tmp_path, expression, said):
    message = invalid(tmp_path, {"cron": expression, "target": "docs"})
    assert f"schedules.nightly.cron: '{expression}' {said}" in message


def test_an_unknown_time_zone_is_a_config_error_naming_its_key(tmp_path):
    message = invalid(tmp_path, {"cron": "0 3 * * *", "timezone": "Europe/Berln",
                                 "target": "docs"})
    assert "schedules.nightly.timezone: 'Europe/Berln' is not an IANA time zone" in message


@pytest.mark.parametrize(("schedule", "said"), [
    ({"target": "doc"}, "schedules.nightly.target: 'doc' is not a configured target (docs, "
                        "site)"),
    ({"batch": ["docs", "sites"]}, "schedules.nightly.batch: 'sites' is not a configured "
                                   "target"),
    ({"target": "docs", "batch": ["site"]}, "schedules.nightly: set exactly one of 'target'"),
    ({}, "schedules.nightly: set exactly one of 'target'"),
    ({"target": "site", "args": ["main;rm"]}, "schedules.nightly.args: argument 'main;rm' "
                                              "not allowed for 'site'"),
    ({"target": "docs", "args": ["x"]}, "schedules.nightly.args: target 'docs' takes no "
                                        "arguments"),
    ({"batch": ["site"], "args": ["main"]}, "args go with 'target': a batch's targets take no "
                                            "arguments"),
    ({"target": "docs", "missed": "all"}, "schedules.nightly.missed: Input should be "
                                          "'latest' or 'skip'"),
    ({"target": "docs", "room": "ci"}, "schedules.nightly.room: 'ci' is not a room id"),
])
def test_what_a_schedule_starts_is_checked_against_the_targets(tmp_path, schedule, said):
    assert said in invalid(tmp_path, {"cron": "0 3 * * *", **schedule})


def test_a_valid_schedule_has_utc_and_missed_latest_by_default(tmp_path):
    config = make_config(tmp_path, targets=TARGETS,
                         schedules={"nightly": {"cron": "0 3 * * *", "target": "docs"}})
    schedule = config.schedules["nightly"]
    assert (schedule.timezone, schedule.missed, schedule.starts()) == ("UTC", "latest", ["docs"])


TARGETS = {"docs": python_target("print(1)"),
           "site": python_target("print(1)", args_pattern="[a-z]+")}


def invalid(tmp_path, schedule) -> str:
    with pytest.raises(ValidationError) as caught:
        make_config(tmp_path, targets=TARGETS, schedules={"nightly": schedule})
    return format_errors(caught.value)


def test_a_scheduled_batch_nobody_could_approve_is_refused_when_the_config_is_read(tmp_path):
    targets = {**TARGETS,
               "deploy": python_target("print(1)", approvals=1, approvers=["@lead:x.org"]),
               "migrate": python_target("print(1)", approvals=1, approvers=["@dba:x.org"])}
    with pytest.raises(ValidationError) as caught:
        make_config(tmp_path, targets=targets,
                    schedules={"nightly": {"cron": "0 3 * * *",
                                           "batch": ["deploy", "migrate"]}})
    assert ("schedules.nightly.batch: its targets ask different people for approval, so "
            "nobody could approve it") in format_errors(caught.value)
