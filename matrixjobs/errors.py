"""Exceptions shared by the core and the interfaces.

Every error a user can cause carries a short message meant to be shown as is
(in the room, the CLI or the API).
"""

ECHO_LIMIT = 40


def echo(text: str) -> str:
    """User input as a message may repeat it: at most ECHO_LIMIT characters, and with
    control and format characters (RTL overrides, zero-width spaces) written as escapes,
    so they cannot reorder or hide the rest of the message."""
    clipped = text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + "…"
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in clipped)


class MatrixJobsError(Exception):
    """Base class: the message is safe and meant for people."""


class ConfigError(MatrixJobsError):
    """The configuration file is missing, malformed or invalid."""


class StoreError(MatrixJobsError):
    """The store cannot be opened or used (corrupt, locked, unwritable)."""


class UnknownTargetError(MatrixJobsError):
    def __init__(self, name: str, available: list[str]) -> None:
        listed = ", ".join(available) if available else "none configured"
        super().__init__(f"unknown target '{echo(name)}' (available: {listed})")
        self.name = name
        self.available = available


class TargetGoneError(UnknownTargetError):
    """A job to run again names a target the configuration no longer has."""

    def __init__(self, subject_id: str, name: str, available: list[str]) -> None:
        listed = ", ".join(available) if available else "none configured"
        MatrixJobsError.__init__(self, f"cannot rerun {subject_id}: its target '{name}' is no "
                                       f"longer configured (available: {listed})")
        self.name = name
        self.available = available


class BadArgumentsError(MatrixJobsError):
    """Arguments given for a target are not allowed."""


class BadBatchError(MatrixJobsError):
    """A batch is empty or too large."""


class UnknownJobTypeError(MatrixJobsError):
    def __init__(self, job_type: str) -> None:
        super().__init__(f"no handler registered for job type '{job_type}'")
        self.job_type = job_type


class GroupBusyError(MatrixJobsError):
    """A target's concurrency group has work and its on_busy is "skip"."""


class NotFoundError(MatrixJobsError):
    """No job or batch with that id."""


class AlreadyFinishedError(MatrixJobsError):
    """The job or batch is already in a terminal state."""


class PermanentJobError(MatrixJobsError):
    """A job failure that retrying cannot fix (bad target, missing executable)."""


class JobFailedError(MatrixJobsError):
    """A run failed in an expected way; the message says why (retried while retries remain)."""


class AlreadySubmittedError(MatrixJobsError):
    """The same request (e.g. one Matrix command event) was already turned into work."""

    def __init__(self, key: str, subject_id: str | None) -> None:
        super().__init__(f"already submitted as {subject_id or 'a job'}")
        self.key = key
        self.subject_id = subject_id


class SlotHeldError(MatrixJobsError):
    """A schedule's slot may start nothing: the schedule was paused (or the slot dealt
    with) after the loop looked. The message says which."""


class ShuttingDownError(MatrixJobsError):
    """The service is stopping and takes no new work."""


class StoreUnavailableError(MatrixJobsError):
    """The store cannot take writes now (disk full, locked, unreachable): try again later.
    The message says why ("store: disk full")."""


class ForbiddenError(MatrixJobsError):
    """A rule refuses who asked (the message names the rule's reason)."""

    def __init__(self, reason: str, rule: str) -> None:
        super().__init__(reason)
        self.rule = rule


class NotAwaitingApprovalError(MatrixJobsError):
    """Approving or denying work that waits for no approval (any more)."""


class TokenExistsError(MatrixJobsError):
    """A person already has a token of that name."""
