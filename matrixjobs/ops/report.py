"""The doctor's findings: one line per check, printed as soon as it is known."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import TextIO


class Mark(StrEnum):
    OK = "✓"
    WARN = "!"
    FAIL = "✗"


@dataclass(frozen=True, slots=True)
class Finding:
    mark: Mark
    check: str
    text: str

    def line(self) -> str:
        # A multi-line text (a config error) keeps its lines under the first one.
        return f"{self.mark} {self.check}: {self.text}".replace("\n", "\n    ")


class Report:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.findings: list[Finding] = []

    def add(self, mark: Mark, check: str, text: str) -> None:
        finding = Finding(mark, check, text)
        self.findings.append(finding)
        print(finding.line(), file=self.out, flush=True)

    def ok(self, check: str, text: str) -> None:
        self.add(Mark.OK, check, text)

    def warn(self, check: str, text: str) -> None:
        self.add(Mark.WARN, check, text)

    def fail(self, check: str, text: str) -> None:
        self.add(Mark.FAIL, check, text)

    @property
    def failed(self) -> bool:
        return any(f.mark is Mark.FAIL for f in self.findings)
