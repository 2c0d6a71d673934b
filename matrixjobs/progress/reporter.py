"""What a handler holds to say how far it got, and to write to its job's log."""

from __future__ import annotations

from collections.abc import Callable


def _discard(text: str) -> None:
    """Where output goes when logs are off."""


class ProgressReporter:
    """Latest progress of one running job, and the way into its log.

    `report()` is called in tight loops, so it only swaps one tuple: no I/O, no
    validation, no event. The monitor samples `state` on its own clock and does
    the checking there (garbage, total = 0, current > total).

    `log(text)` adds output to the job's log (docs/logs.md), as a command's
    stdout would be: lines end with "\\n", an unfinished one waits for the rest.
    """

    __slots__ = ("log", "state")

    def __init__(self, log: Callable[[str], None] = _discard) -> None:
        self.state: tuple[float, float | None, str | None] | None = None
        self.log = log

    def report(self, current: float, total: float | None, message: str | None = None) -> None:
        self.state = (current, total, message)
