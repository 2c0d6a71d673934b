"""Room commands under fuzzing: 10,000 generated messages through the bot's own command path.

Each message goes through `MatrixBot`'s handler (parse → dispatch → validation in the
App and its targets → the reply, sent by the real edit scheduler to a sender that
records it), with a real App on a temp SQLite store and no homeserver. For each one:
nothing escapes (no "internal error" reply, nothing logged as an error), at most one
reply, a job or batch only from a valid target and valid arguments (judged here from
the config, not by the product's checks), and no reply repeats more than 200
consecutive characters of what was sent.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nio import RoomMessageText

from matrixjobs.app import App
from matrixjobs.matrix.bot import MatrixBot
from matrixjobs.matrix.commands import Command, CommandSyntaxError, parse
from matrixjobs.models import Batch, Job, parse_id
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.handlers import HandlerRegistry

ROOM = "!fuzz:example.org"
ALLOWED = "@alice:example.org"
STRANGER = "@mallory:example.org"
PATTERN = r"[a-z0-9._-]{1,20}"
# Jobs that finish at once, in process: thousands of them run during the test.
TARGETS: dict[str, dict[str, Any]] = {
    "plain": {"handler": "done"},
    "pattern": {"handler": "done", "args_pattern": PATTERN},
    "Docs-2": {"handler": "done", "description": "mixed case, a digit"},
}
COMMAND_NAMES = ["build", "batch", "status", "cancel", "jobs", "targets", "help"]
# The product's documented limits on arguments (targets.py) and batches (config default).
MAX_ARGS, MAX_ARG_LENGTH, MAX_BATCH = 32, 256, 50
ECHO_LIMIT = 200


# -- generated messages ---------------------------------------------------------------------

# Direction overrides and isolates, zero-width and odd spaces, controls, quotes, look-alikes.
ODD_CHARS = ("\u202e\u202d\u2066\u2067\u2069\u200b\u200d\ufeff\u00a0\u2003\u2028"
             "\x00\x0b\x1c\x85\t\r\n'\"\\!`;&<>é\ufb01\u0130²\u0661🟩")
ODD_PIECES = ["!!", "$(id)", "<b>", "&amp;", "\u202ej1", "\r\n", "' '", "\\'"]
odd_text = st.text(st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(ODD_CHARS)),
                   max_size=16)
# 64 KiB from a short unit repeated: hypothesis cannot draw that many characters one by one.
huge_text = st.builds(lambda unit, size: (unit * (size // max(len(unit), 1) + 1))[:size],
                      st.one_of(odd_text.filter(bool), st.sampled_from(["a", "j1", "plain "])),
                      st.sampled_from([201, 257, 1000, 4096, 64 * 1024]))
ARG_CHARS = "az09._-"  # what PATTERN allows, in short
valid_arg = st.one_of(st.text(ARG_CHARS, min_size=1, max_size=20),
                      st.text(ARG_CHARS, min_size=20, max_size=20))
known_ids = st.builds(lambda kind, number: f"{kind}{number}", st.sampled_from("jbJB"),
                      st.one_of(st.integers(0, 200), st.integers(2**62, 2**70)))
word = st.one_of(odd_text, valid_arg, known_ids,
                 st.sampled_from([*TARGETS, *ODD_PIECES, "PLAIN", "plain\u200b", "j", "j-1", ""]))
name = st.one_of(st.sampled_from(COMMAND_NAMES), st.sampled_from(COMMAND_NAMES),
                 st.sampled_from(COMMAND_NAMES),
                 st.sampled_from(["BUILD", "Status", "frob", "build!", "build\u2003x"]),
                 st.builds("{}{}".format, st.sampled_from("aZ"), st.text("bY1_-", max_size=12)),
                 huge_text)
prefix = st.sampled_from(["!", "!", "!", "!!", "! ", " !", "\u202e!", "!\u200b", ""])


@st.composite
def words(draw: st.DrawFn) -> list[str]:
    """Up to 12 short words, one in six times with a huge one among them (the many
    arguments come from `!build pattern …` and `!batch …` below)."""
    drawn = draw(st.lists(word, max_size=12))
    if draw(st.integers(0, 5)) == 0:
        drawn.insert(draw(st.integers(0, len(drawn))), draw(huge_text))
    return drawn


@st.composite
def quoted_command(draw: st.DrawFn) -> str:
    """A command of quoted words (shlex.join), as a careful client would send it."""
    args = draw(words())
    if draw(st.booleans()):
        args = [draw(st.sampled_from(list(TARGETS))), *args]
    return f"{draw(prefix)}{draw(name)} {shlex.join(args)}"


@st.composite
def raw_command(draw: st.DrawFn) -> str:
    """Words joined as they come: unbalanced quotes, stray `!`, odd spaces."""
    args = draw(words())
    marks = draw(st.lists(st.sampled_from(["", "'", '"', "\\", "!"]), min_size=len(args),
                          max_size=len(args)))
    glue = draw(st.sampled_from([" ", "\u2003", "\t", "", "\n"]))
    rest = glue.join(mark + arg for mark, arg in zip(marks, args, strict=True))
    return f"{draw(prefix)}{draw(name)}{draw(st.sampled_from([' ', '', '  ']))}{rest}"


# Mostly small batches (each operation runs): one in four around the size limit.
batch_targets = st.integers(0, 3).flatmap(lambda size: st.lists(
    st.sampled_from(list(TARGETS)), min_size=0 if size else MAX_BATCH - 1,
    max_size=4 if size else MAX_BATCH + 2))
# A Matrix event is at most 64 KiB, so a longer body cannot come.
messages = st.one_of(quoted_command(), raw_command(), odd_text, huge_text,
                     st.builds("!build pattern {}".format,
                               st.lists(valid_arg, max_size=MAX_ARGS + 2).map(" ".join)),
                     st.builds("!batch {}".format, batch_targets.map(" ".join)),
                     ).map(lambda body: body[:64 * 1024])


# -- the bot without a homeserver -------------------------------------------------------------


class Done:
    async def run(self, job: Job, progress: ProgressReporter) -> None:
        progress.report(1, 1)


class RecordingSender:
    """Stands in for the homeserver: records every message the scheduler sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> str:
        self.sent.append(content)
        return f"$sent{len(self.sent)}"


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Said:
    event_id: str
    sent: list[dict[str, Any]]
    before: tuple[Job | None, Batch | None]
    after: tuple[Job | None, Batch | None]


@dataclass
class Room:
    loop: asyncio.AbstractEventLoop
    app: App
    bot: MatrixBot
    sender: RecordingSender
    errors: ErrorLog
    count: int = 0

    def message(self, body: str, sender: str) -> RoomMessageText:
        self.count += 1
        event = RoomMessageText.from_dict({
            "type": "m.room.message", "event_id": f"$fuzz{self.count}", "sender": sender,
            "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": body}})
        assert isinstance(event, RoomMessageText)
        return event

    def say(self, body: str, sender: str) -> Said:
        """Send one message: every reply the bot sent to it, and the work it started."""
        return self.loop.run_until_complete(self._say(self.message(body, sender)))

    async def _say(self, event: RoomMessageText) -> Said:
        self.sender.sent.clear()
        before = await self._newest()
        await self.bot.callbacks.on_event(ROOM, event)
        await self.bot.scheduler.flush(10.0)
        return Said(event.event_id, list(self.sender.sent), before, await self._newest())

    async def _newest(self) -> tuple[Job | None, Batch | None]:
        jobs, batches = await self.app.jobs(limit=1), await self.app.batches(limit=1)
        return (jobs or [None])[0], (batches or [None])[0]


@pytest.fixture
def room(tmp_path: Path) -> Iterator[Room]:
    config = make_config(
        tmp_path, targets=TARGETS, api={"enabled": False}, store={"synchronous": "normal"},
        matrix={"homeserver": "http://127.0.0.1:9", "user_id": "@bot:example.org",
                "rate_per_s": 0},
        access={"allowed_users": [ALLOWED]})
    assert config.matrix is not None
    loop = asyncio.new_event_loop()
    handlers = HandlerRegistry()
    handlers.register("done", Done())
    app = App(config, handlers)
    loop.run_until_complete(app.start())
    bot = MatrixBot(app, config.matrix, config.progress.interval_ms)
    sender = RecordingSender()
    bot.scheduler.sender = sender
    errors = ErrorLog()
    logging.getLogger("matrixjobs").addHandler(errors)
    try:
        yield Room(loop, app, bot, sender, errors)
    finally:
        logging.getLogger("matrixjobs").removeHandler(errors)
        loop.run_until_complete(bot.client.close())
        loop.run_until_complete(app.stop())
        loop.close()


# -- what must hold ---------------------------------------------------------------------------


def expected_work(command: Command | None, sender: str) -> tuple[str, ...] | None:
    """The job (target, args…) or batch (targets…) a message must start, from the config
    alone; None when it must start nothing."""
    if command is None or sender != ALLOWED or not command.args:
        return None
    if command.name == "build":
        target, args = command.args[0], command.args[1:]
        pattern = TARGETS.get(target, {}).get("args_pattern")
        if target not in TARGETS or (args and pattern is None) or len(args) > MAX_ARGS:
            return None
        if any(len(arg) > MAX_ARG_LENGTH or not re.fullmatch(pattern, arg) for arg in args):
            return None
        return command.args
    if command.name == "batch" and len(command.args) <= MAX_BATCH and all(
            target in TARGETS for target in command.args):
        return command.args
    return None


def number(item: Job | Batch | None) -> int:
    parsed = parse_id(item.id) if item is not None else None
    return parsed[1] if parsed is not None else 0


def longest_echo(reply: str, sources: list[str]) -> int:
    """The longest run of a reply's characters found in one of `sources` (case-folded),
    if it is over ECHO_LIMIT; else 0."""
    reply = reply.lower()
    step = ECHO_LIMIT // 2
    # A shared run over ECHO_LIMIT holds one of these probes, so missing them all is proof.
    for start in range(0, max(len(reply) - step, 0), step):
        probe = reply[start:start + step + 1]
        for source in sources:
            if probe in source and (found := _run_through(reply, start, step + 1, source)):
                return found
    return 0


def _run_through(reply: str, start: int, size: int, source: str) -> int:
    probe = reply[start:start + size]
    at = source.find(probe)
    while at >= 0:
        left = 0
        while start - left > 0 and at - left > 0 and reply[start - left - 1] == source[
                at - left - 1]:
            left += 1
        right = size
        while start + right < len(reply) and at + right < len(source) and reply[
                start + right] == source[at + right]:
            right += 1
        if left + right > ECHO_LIMIT:
            return left + right
        at = source.find(probe, at + 1)
    return 0


def reply_texts(content: dict[str, Any]) -> list[str]:
    return [content["body"], html.unescape(re.sub(r"<[^>]*>", "", content["formatted_body"]))]


def read(body: str) -> tuple[Command | None, bool]:
    """The command in a message, and whether it is one (an unreadable one is)."""
    try:
        command = parse(body, "!")
    except CommandSyntaxError:
        return None, True
    return command, command is not None


def check(room: Room, body: str, sender: str) -> None:
    command, is_command = read(body)
    work = expected_work(command, sender)
    said = room.say(body, sender)
    assert not room.errors.records, room.errors.records[0].getMessage()
    replies = [c for c in said.sent if c.get("m.relates_to", {}).get("m.in_reply_to", {})
               .get("event_id") == said.event_id]
    assert replies == said.sent, "a send that is not a reply to the message"
    assert len(replies) <= 1, f"{len(replies)} replies"
    if is_command and sender == ALLOWED:
        assert len(replies) == 1, "an allowed user's command got no reply"
    # What was covered, shown by --hypothesis-show-statistics.
    event(f"answer: {replies[0]['body'][:2] if replies else 'none'}; work: "
          f"{'none' if work is None or command is None else command.name}")
    sources = [body.lower(), *(arg.lower() for arg in (command.args if command else ()))]
    for content in replies:
        assert "internal error" not in content["body"]
        for text in reply_texts(content):
            assert not longest_echo(text, sources), f"reply echoes the input: {text[:300]!r}"
    check_work(said, command, work)


def check_work(said: Said, command: Command | None, work: tuple[str, ...] | None) -> None:
    (job_before, batch_before), (job_after, batch_after) = said.before, said.after
    new_jobs = number(job_after) - number(job_before)
    new_batches = number(batch_after) - number(batch_before)
    if work is None or command is None:
        assert (new_jobs, new_batches) == (0, 0), "work started from an invalid command"
    elif command.name == "build":
        assert (new_jobs, new_batches) == (1, 0)
        assert job_after is not None and job_after.data["args"] == list(work[1:])
        assert job_after.data["target"] == work[0]
    else:
        assert (new_jobs, new_batches) == (len(work), 1)
        assert batch_after is not None and batch_after.total == len(work)


@pytest.mark.slow
@pytest.mark.timeout(600)  # about a minute alone; more on a busy machine
def test_ten_thousand_generated_room_commands(room):
    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=messages, sender=st.sampled_from([ALLOWED, ALLOWED, ALLOWED, STRANGER]))
    def one_message(body: str, sender: str) -> None:
        check(room, body, sender)

    one_message()


# -- the defects the fuzzing found, one by one ------------------------------------------------


def only_reply(room: Room, body: str) -> str:
    sent = room.say(body, ALLOWED).sent
    assert len(sent) == 1
    return sent[0]["body"]


def test_a_long_unknown_target_is_named_in_short(room):
    reply = only_reply(room, "!build " + "a" * 5000)
    assert reply.startswith("⚠️ unknown target 'aaaa")
    assert len(reply) < 150


def test_a_long_unknown_command_is_named_in_short(room):
    reply = only_reply(room, "!" + "x" * 5000)
    assert reply.startswith("❓ Unknown command !xxxx")
    assert len(reply) < 150


@pytest.mark.parametrize(
    "subject", ["j²", "b99999999999999999999", "j" + "1" * 5000, "j\u0661\u0662"])
@pytest.mark.parametrize("command", ["status", "cancel"])
def test_ids_that_are_not_ours_are_not_found(room, command, subject):
    reply = only_reply(room, f"!{command} {subject}")
    assert "is not a job or batch id" in reply
    assert not room.errors.records


def test_echoed_input_cannot_reorder_or_hide_the_reply(room):
    reply = only_reply(room, "!build \u202etegrat\u200b\x00")
    assert reply.startswith("⚠️ unknown target '\\u202etegrat\\u200b\\x00' (available:")


def test_a_64_kib_command_is_too_long(room):
    assert only_reply(room, "!build " + "plain " * 11_000) == (
        "⚠️ that command is too long (at most 10000 characters)")


def test_a_valid_command_of_many_arguments_is_titled_in_short(room):
    args = " ".join(f"{n:020d}" for n in range(MAX_ARGS))
    title = only_reply(room, f"!build pattern {args}").splitlines()[0]
    assert title.startswith("⏳ pattern 00000000000000000000 0000")
    assert title.endswith("… (j1) — queued")
    assert len(title) < 150
