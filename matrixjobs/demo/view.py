"""The demo room as a Matrix client shows it, drawn in the terminal.

`RoomView` keeps the room's messages in order and applies edits the way
clients do: an `m.replace` from the original sender replaces the shown body of
the original event. A display draws it: `LiveDisplay` redraws the room in
place on a terminal (rich), `PlainDisplay` prints one line per change (pipes,
tests, CI logs).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

JOINED = "joined the room"


@dataclass(slots=True)
class Message:
    event_id: str
    sender: str
    body: str
    reply_to: str | None = None
    edits: int = 0
    membership: bool = False  # a "joined the room" line, not a message
    timestamp_ms: int = 0


class RoomView:
    """One room's timeline with edits applied."""

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.messages: dict[str, Message] = {}  # in timeline order

    def apply(self, event: dict[str, Any]) -> Message | None:
        """Take one timeline event (its JSON); return the message it added or changed."""
        kind = event.get("type")
        content = event.get("content") or {}
        if kind == "m.room.member":
            before = (event.get("unsigned") or {}).get("prev_content") or {}
            if (content.get("membership") != "join" or before.get("membership") == "join"
                    or event.get("state_key") != event.get("sender")):
                return None  # only joins: no invites, leaves or profile changes
            return self._add(event, JOINED, membership=True)
        if kind != "m.room.message" or not isinstance(content.get("body"), str):
            return None
        relation = content.get("m.relates_to") or {}
        if relation.get("rel_type") == "m.replace":
            return self._edit(event, relation.get("event_id"), content.get("m.new_content"))
        reply_to = (relation.get("m.in_reply_to") or {}).get("event_id")
        return self._add(event, content["body"], reply_to=reply_to)

    def _add(self, event: dict[str, Any], body: str, reply_to: str | None = None,
             membership: bool = False) -> Message | None:
        event_id = str(event.get("event_id", ""))
        if event_id in self.messages:
            return None  # seen in an earlier sync
        message = Message(event_id, str(event.get("sender", "")), body, reply_to,
                          membership=membership, timestamp_ms=int(event.get("origin_server_ts", 0)))
        self.messages[event_id] = message
        return message

    def _edit(self, event: dict[str, Any], target: Any, new: Any) -> Message | None:
        original = self.messages.get(str(target))
        # Clients ignore edits by anyone but the original sender (the Matrix spec's rule).
        if (original is None or original.sender != event.get("sender")
                or not isinstance(new, dict) or not isinstance(new.get("body"), str)):
            return None
        original.body = new["body"]
        original.edits += 1
        original.timestamp_ms = int(event.get("origin_server_ts", 0))
        return original

    def reply_to(self, event_id: str) -> Message | None:
        """The first message that replies to `event_id` (the bot's answer to a command)."""
        return next((m for m in self.messages.values() if m.reply_to == event_id), None)

    def joined(self, user_id: str) -> bool:
        return any(m.membership and m.sender == user_id for m in self.messages.values())


class Display(Protocol):
    def start(self, title: str) -> None: ...

    def show(self, view: RoomView, changed: Message) -> None: ...

    def note(self, text: str) -> None: ...

    def stop(self) -> None: ...


def name_of(user_id: str) -> str:
    """'@demo:localhost' → 'demo'."""
    return user_id.removeprefix("@").split(":", 1)[0]


class PlainDisplay:
    """One line per change: the sender and the whole body on one line."""

    def __init__(self) -> None:
        self.out = sys.stdout

    def start(self, title: str) -> None:
        self.note(f"--- {title} ---")

    def show(self, view: RoomView, changed: Message) -> None:
        clock = time.strftime("%H:%M:%S", time.localtime(changed.timestamp_ms / 1000))
        marker = "✎ " if changed.edits else ""
        body = " │ ".join(line for line in changed.body.splitlines() if line.strip())
        self.note(f"{clock} {name_of(changed.sender):<10} {marker}{body}")

    def note(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def stop(self) -> None:
        pass


class LiveDisplay:
    """The room redrawn in place: every message with its current (edited) body."""

    def __init__(self) -> None:
        self.console = Console()
        self._live: Live | None = None
        self._title = ""

    def start(self, title: str) -> None:
        self._title = title
        self._live = Live(self._room(None), console=self.console, auto_refresh=False,
                          transient=False)
        self._live.start()

    def show(self, view: RoomView, changed: Message) -> None:
        if self._live is not None:
            self._live.update(self._room(view), refresh=True)

    def note(self, text: str) -> None:
        # Printed above the live room while it is shown.
        self.console.print(Text(text))

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _room(self, view: RoomView | None) -> RenderableType:
        messages = self._fitting(list(view.messages.values()) if view else [])
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True)
        table.add_column()
        for message in messages:
            table.add_row(Text(name_of(message.sender), style="bold cyan"), self._body(message))
        return Panel(Group(table) if messages else Text("(no messages yet)", style="dim"),
                     title=self._title, subtitle="edits replace messages in place · Ctrl-C stops",
                     border_style="blue")

    @staticmethod
    def _body(message: Message) -> Text:
        if message.membership:
            return Text(message.body, style="dim italic")
        body = Text(message.body)
        if message.edits:
            body.append(f"  ({message.edits} edits)" if message.edits > 1 else "  (edited)",
                        style="dim")
        return body

    def _fitting(self, messages: list[Message]) -> list[Message]:
        """The newest messages that fit the terminal's height (the panel takes 2 lines)."""
        room = max(self.console.height - 4, 3)
        shown: list[Message] = []
        for message in reversed(messages):
            height = max(len(message.body.splitlines()), 1)
            if shown and height > room:
                break
            shown.append(message)
            room -= height
        return shown[::-1]


def make_display() -> Display:
    """Live on a terminal; plain lines in pipes and logs."""
    return LiveDisplay() if Console(file=sys.stdout).is_terminal else PlainDisplay()
