"""Parsing room messages into bot commands (no I/O: the bot dispatches them)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# Longer than any command that can be valid (32 quoted arguments of 256 characters, a
# batch of 50 targets). shlex reads a character at a time: 64 KiB cost it tens of ms.
MAX_LENGTH = 10_000


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
    if len(rest) > MAX_LENGTH:
        raise CommandSyntaxError(f"that command is too long (at most {MAX_LENGTH} characters)")
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise CommandSyntaxError(f"cannot read that command: {exc}") from None
    if not words:
        return None
    return Command(words[0].lower(), tuple(words[1:]))
