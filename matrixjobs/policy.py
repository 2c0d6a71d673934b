"""Who may do what: one pure decision that every interface asks (the room, the API, the
CLI, MCP, the dashboard). No I/O here; the caller brings what the decision needs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from matrixjobs.config import AccessConfig


class Action(StrEnum):
    RUN = "run"  # start a job or batch
    CANCEL = "cancel"
    RERUN = "rerun"
    LOGS = "logs"  # read a job's output
    INVITE = "invite"  # have the bot join a room
    READ = "read"  # status, lists, targets, help


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""  # why not, in words a person can act on

    def __bool__(self) -> bool:
        return self.allowed


ALLOWED = Decision(True)


class Policy:
    def __init__(self, access: AccessConfig) -> None:
        self.access = access

    def decide(self, user: str, action: Action) -> Decision:
        if action is Action.READ or self.access.allows(user):
            return ALLOWED
        return Decision(False, "not in [access] allowed_users")
