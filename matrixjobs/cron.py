"""When a schedule's runs are due: cron expressions in a time zone, counted as cron does.

A slot is the moment a run is due, as epoch seconds. Daylight saving time is handled
like Vixie cron and cronie: a fixed time that does not exist (02:30 on the spring-forward
day in Europe/Berlin) runs when the clock jumps (03:00); a fixed time that happens twice
(02:30 on the fall-back day) runs once, the first time. An expression whose minute or
hour is a wildcard (`*/30 * * * *`, `0 * * * *`) runs by the clock as it passes: twice
through a repeated hour, never in a skipped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterError, croniter

# The nicknames cron knows, as the fields they stand for.
NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
CRON_HELP = ('expected 5 fields "minute hour day-of-month month day-of-week" like "0 3 * * *", '
             'a nickname like "@daily", or 6 fields with seconds first like "*/10 * * * * *"')


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; ValueError naming what is wrong."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{name}' is not an IANA time zone name (like UTC or "
                         "Europe/Berlin)") from None


@dataclass(frozen=True, slots=True)
class Cron:
    expression: str  # as configured
    fields: tuple[str, ...]  # nicknames expanded: 5 fields, or 6 with seconds first
    zone: ZoneInfo

    @classmethod
    def parse(cls, expression: str, timezone: str = "UTC") -> Cron:
        """ValueError (a message for people) when the expression or zone is not valid, or
        when the expression matches no date (like "0 0 30 2 *")."""
        fields = tuple(NICKNAMES.get(expression.strip().lower(), expression).split())
        if len(fields) not in (5, 6):
            raise ValueError(f"'{expression}' is not a cron expression: {CRON_HELP}")
        try:
            croniter(" ".join(fields), second_at_beginning=True)
        except CroniterBadCronError as exc:
            raise ValueError(f"'{expression}' is not a cron expression ({exc}): "
                             f"{CRON_HELP}") from None
        cron = cls(expression, fields, zone(timezone))
        try:
            cron.next_after(0)
        except CroniterError:
            raise ValueError(f"'{expression}' matches no date") from None
        return cron

    @property
    def to_the_second(self) -> bool:
        """Whether it has a seconds field (its slots may fall between whole minutes)."""
        return len(self.fields) == 6

    @property
    def wildcard(self) -> bool:
        """Whether the minute or hour is a wildcard: cron's rule for a repeated hour."""
        minute, hour = self.fields[-5:-3]
        return minute.startswith("*") or hour.startswith("*")

    def next_after(self, moment: float) -> float:
        """The first slot after `moment` (epoch seconds)."""
        slots = self._iterate(moment)
        while True:
            slot = slots.get_next(float)
            if not self._repeated(slot):
                return slot

    def latest_at(self, moment: float) -> float:
        """The last slot at or before `moment`."""
        slots = self._iterate(self.next_after(moment))
        while True:
            slot = slots.get_prev(float)
            if not self._repeated(slot):
                return slot

    def local(self, slot: float) -> datetime:
        """`slot` as the schedule's wall clock shows it."""
        return datetime.fromtimestamp(slot, self.zone)

    def _iterate(self, start: float) -> croniter:
        return croniter(" ".join(self.fields), self.local(start), second_at_beginning=True)

    def _repeated(self, slot: float) -> bool:
        """Whether `slot` is a fixed time's second pass through a repeated hour."""
        if self.wildcard:
            return False
        when = self.local(slot)
        first, second = when.replace(fold=0), when.replace(fold=1)
        return first.utcoffset() != second.utcoffset() and when.fold == 1
