"""Configured targets: the only things users can run, and the checks on their arguments."""

from __future__ import annotations

import re
import string
import time

from matrixjobs.config import TargetConfig
from matrixjobs.errors import BadArgumentsError, UnknownTargetError, echo
from matrixjobs.models import Approval, JobSpec

COMMAND_TYPE = "command"
MAX_ARGS = 32
MAX_ARG_LENGTH = 256


class Targets:
    def __init__(self, targets: dict[str, TargetConfig]) -> None:
        self._targets = targets
        self._patterns = {
            name: re.compile(t.args_pattern) for name, t in targets.items() if t.args_pattern
        }

    def names(self) -> list[str]:
        return sorted(self._targets)

    def items(self) -> list[tuple[str, TargetConfig]]:
        return sorted(self._targets.items())

    def get(self, name: str) -> TargetConfig:
        target = self._targets.get(name)
        if target is None:
            raise UnknownTargetError(name, self.names())
        return target

    def check_args(self, name: str, args: list[str]) -> list[str]:
        """Return the arguments if every one is allowed; raise BadArgumentsError if not."""
        self.get(name)
        if not args:
            return []
        pattern = self._patterns.get(name)
        if pattern is None:
            raise BadArgumentsError(f"target '{name}' takes no arguments")
        if len(args) > MAX_ARGS:
            raise BadArgumentsError(f"too many arguments for '{name}' (at most {MAX_ARGS})")
        for arg in args:
            if not isinstance(arg, str):
                raise BadArgumentsError(f"arguments for '{name}' must be strings")
            if len(arg) > MAX_ARG_LENGTH or "\x00" in arg or not pattern.fullmatch(arg):
                raise BadArgumentsError(
                    f"argument '{echo(arg)}' not allowed for '{name}' "
                    f"(each must match {pattern.pattern})"
                )
        return list(args)

    def spec(self, name: str, args: list[str] | None = None,
             requester: str | None = None) -> JobSpec:
        """What to queue to run target `name`: held for approval from now on when the
        target needs one."""
        target = self.get(name)
        checked = self.check_args(name, list(args or []))
        data: dict[str, object] = {"target": name, "args": checked}
        if target.handler is not None:
            data["params"] = target.params
            if target.cwd is not None:
                data["cwd"] = str(target.cwd)
        return JobSpec(
            type=target.handler or COMMAND_TYPE,
            data=data,
            name=" ".join([name, *checked]),
            priority=target.priority,
            max_retries=target.max_retries,
            timeout_s=target.timeout_s,
            requester=requester,
            runs_on=list(target.runs_on),
            approval=None if not target.approvals else Approval(
                target.approvals, time.time() + target.approval_timeout_s),
            concurrency=group(name, target.concurrency, checked),
        )


def group(name: str, template: str | None, args: list[str]) -> str | None:
    """The concurrency group of a job of target `name` run with `args`."""
    if template is None:
        return None
    try:
        return template.format(*args)
    except IndexError:
        wanted = max(int(field) for _, field, _, _ in string.Formatter().parse(template)
                     if field) + 1
        raise BadArgumentsError(f"{name} needs at least {wanted} argument(s): its concurrency "
                                f"group is '{template}'") from None
