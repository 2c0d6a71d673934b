"""What a handler holds to say how far it got."""

from __future__ import annotations


class ProgressReporter:
    """Latest progress of one running job.

    `report()` is called in tight loops, so it only swaps one tuple: no I/O, no
    validation, no event. The monitor samples `state` on its own clock and does
    the checking there (garbage, total = 0, current > total).
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: tuple[float, float | None, str | None] | None = None

    def report(self, current: float, total: float | None, message: str | None = None) -> None:
        self.state = (current, total, message)
