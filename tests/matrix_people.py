"""People in a room, for end-to-end tests and benchmarks: send, edit, and read the timeline.

Blocking HTTP (stdlib, through SynapseServer.request); from async code call these via
`asyncio.to_thread`, or the bot running in the same event loop would stall.
"""

from __future__ import annotations

import itertools
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from matrixjobs.demo.synapse import SynapseServer

_txn = itertools.count()


@dataclass
class Person:
    server: SynapseServer
    user_id: str
    token: str

    @classmethod
    def register(cls, server: SynapseServer, name: str) -> Person:
        user = server.register(name, password=f"{name}-password")
        return cls(server, user["user_id"], user["access_token"])

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.server.request(method, path, body, token=self.token)

    def create_room(self, invite: list[str], encrypted: bool = False) -> str:
        body: dict[str, Any] = {"preset": "private_chat", "invite": invite}
        return str(self.call("POST", "/_matrix/client/v3/createRoom", body)["room_id"])

    def join(self, room_id: str) -> None:
        self.call("POST", f"/_matrix/client/v3/join/{_quote(room_id)}", {})

    def members(self, room_id: str) -> set[str]:
        joined = self.call("GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/joined_members")
        return set(joined["joined"])

    def send(self, room_id: str, body: str, content: dict[str, Any] | None = None) -> str:
        payload = content or {"msgtype": "m.text", "body": body}
        path = (f"/_matrix/client/v3/rooms/{_quote(room_id)}/send/m.room.message/"
                f"t{next(_txn)}-{self.user_id}")
        return str(self.call("PUT", path, payload)["event_id"])

    def edit(self, room_id: str, original: str, new_body: str) -> str:
        return self.send(room_id, "", {
            "msgtype": "m.text",
            "body": f"* {new_body}",
            "m.new_content": {"msgtype": "m.text", "body": new_body},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        })

    def timeline(self, room_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """The room's message events, oldest first."""
        query = urllib.parse.urlencode({"dir": "b", "limit": limit,
                                        "filter": '{"types":["m.room.message"]}'})
        page = self.call("GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/messages?{query}")
        return list(reversed(page["chunk"]))


@dataclass
class BotMessage:
    """One progress (or reply) message of the bot and every edit that targets it."""

    original: dict[str, Any]
    edits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def event_id(self) -> str:
        return str(self.original["event_id"])

    @property
    def reply_to(self) -> str | None:
        relation = self.original["content"].get("m.relates_to") or {}
        return (relation.get("m.in_reply_to") or {}).get("event_id")

    @property
    def bodies(self) -> list[str]:
        return [self.original["content"]["body"]] + [
            edit["content"]["m.new_content"]["body"] for edit in self.edits]

    @property
    def current(self) -> str:
        return self.bodies[-1]

    @property
    def current_html(self) -> str:
        latest = self.edits[-1]["content"]["m.new_content"] if self.edits else (
            self.original["content"])
        return str(latest.get("formatted_body", ""))


def bot_messages(events: list[dict[str, Any]], bot: str) -> tuple[list[BotMessage], list[str]]:
    """Group the bot's events into messages with their edits; also return stray edits
    (edits whose target is not an original message of the bot — there must be none)."""
    messages: dict[str, BotMessage] = {}
    strays = []
    for event in events:
        if event["sender"] != bot:
            continue
        relation = event["content"].get("m.relates_to") or {}
        if relation.get("rel_type") == "m.replace":
            target = messages.get(relation.get("event_id", ""))
            if target is None:
                strays.append(event["event_id"])
            else:
                target.edits.append(event)
        else:
            messages[event["event_id"]] = BotMessage(event)
    return list(messages.values()), strays


def _quote(room_id: str) -> str:
    return urllib.parse.quote(room_id, safe="")
