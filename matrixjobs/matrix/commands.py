"""Parsing room messages into bot commands (no I/O: the bot dispatches them)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: tuple[str, ...]


class CommandSyntaxError(ValueError):
    """The message looks like a command but cannot be read (e.g. an unclosed quote)."""


def parse(body: str, prefix: str) -> Command | None:
    """`!build docs --fast` → Command("build", ("docs", "--fast")); None if not a command.

    Arguments are split like a shell would (quotes group words) but never run by one.
    The command name is case-insensitive; unknown names still parse, so the bot can
    answer them with a hint.
    """
    text = body.strip()
    if not text.startswith(prefix) or len(text) == len(prefix):
        return None
    rest = text[len(prefix):]
    name = rest.split(maxsplit=1)[0] if rest.strip() else ""
    if rest[0].isspace() or not NAME.fullmatch(name):
        return None  # "! build" or "!it's broken" is prose, not a command
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise CommandSyntaxError(f"cannot read that command: {exc}") from None
    if not words:
        return None
    return Command(words[0].lower(), tuple(words[1:]))
