"""What the policy needs to know of a room, read from the homeserver when a command comes:
which configured aliases name it, and the sender's power level as the room's state has it
now (a user demoted a second ago has lost the right).

matrix-nio is not asked: its room state merges a new m.room.power_levels into the old one
(a user removed from `users` keeps their old level), and it does not know room version
12's creators, who outrank every power level and may not appear in m.room.power_levels."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nio import Api, AsyncClient, RoomResolveAliasResponse

from matrixjobs.config import TargetConfig
from matrixjobs.errors import MatrixJobsError
from matrixjobs.matrix.sender import NETWORK_ERRORS
from matrixjobs.policy import Caller, Place

log = logging.getLogger(__name__)

ALIAS_TTL_S = 60.0
# Room versions in which the creators (the m.room.create sender and its
# additional_creators) have infinite power (MSC4289): 12 and later, and Synapse's
# pre-release name of 12.
CREATOR_POWER_VERSIONS = frozenset({"org.matrix.hydra.11"})
FIRST_CREATOR_POWER_VERSION = 12


class RoomStateError(MatrixJobsError):
    """The homeserver did not tell what the rules need: refuse rather than guess."""


@dataclass(frozen=True, slots=True)
class Creation:
    version: str
    creators: frozenset[str]  # the sender and additional_creators

    @property
    def creators_outrank(self) -> bool:
        if self.version in CREATOR_POWER_VERSIONS:
            return True
        return self.version.isdigit() and int(self.version) >= FIRST_CREATOR_POWER_VERSION


def power_level(user: str, levels: Mapping[str, Any] | None, creation: Creation) -> float:
    """`user`'s power level from the room's m.room.power_levels content (None: the room
    has none) and its creation, as the spec's authorization rules read them."""
    if creation.creators_outrank and user in creation.creators:
        return math.inf
    if levels is None:  # no power levels yet: the creator has 100, everyone else 0
        return 100 if user in creation.creators else 0
    users = levels.get("users")
    value = users.get(user) if isinstance(users, dict) else None
    if value is None:
        value = levels.get("users_default", 0)
    try:
        return int(value)  # old room versions allow strings such as "50"
    except (TypeError, ValueError):
        return 0


class Places:
    def __init__(self, client: AsyncClient, targets: Mapping[str, TargetConfig]) -> None:
        self.client = client
        self.targets = targets
        self._resolved: dict[str, tuple[float, str | None]] = {}
        self._creations: dict[str, Creation] = {}  # never changes for a room

    def direct(self, room_id: str, user: str) -> bool:
        """Is `room_id` a room of `user` and the bot alone (joined, nobody invited)?"""
        room = self.client.rooms.get(room_id)
        return (room is not None and room.joined_count == 2 and room.invited_count == 0
                and user in room.users)

    def encrypted(self, room_id: str) -> bool:
        room = self.client.rooms.get(room_id)
        return room is not None and room.encrypted

    def caller(self, room_id: str, user: str, event_id: str) -> Caller:
        """`user` asking in `room_id`: the room is read only when a rule asks."""
        return Caller.in_room(user, Place(room_id), event_id,
                              functools.partial(self.place, room_id, user))

    async def place(self, room_id: str, user: str, names: Sequence[str]) -> Place:
        """The room as the rules of targets `names` need it: which of their aliases name
        it, and `user`'s power level if one of them has a power_level. Targets without
        such rules cost nothing (and a lookup failing for them refuses nothing else)."""
        rules = [target for name in set(names) if (target := self.targets.get(name))]
        aliases = frozenset([alias for alias in sorted({room for target in rules
                                                        for room in target.rooms
                                                        if room.startswith("#")})
                             if await self.resolve(alias) == room_id])
        powered = any(target.power_level is not None for target in rules)
        return Place(room_id, aliases, await self._power(room_id, user) if powered else 0)

    async def resolve(self, alias: str) -> str | None:
        now = time.monotonic()
        cached = self._resolved.get(alias)
        if cached is not None and now - cached[0] < ALIAS_TTL_S:
            return cached[1]
        try:
            response = await self.client.room_resolve_alias(alias)
        except NETWORK_ERRORS as exc:
            raise RoomStateError(f"cannot resolve {alias} just now ({type(exc).__name__}); "
                                 "try again") from None
        room_id = response.room_id if isinstance(response, RoomResolveAliasResponse) else None
        if room_id is None:
            log.warning("matrix: the alias %s does not resolve (%s)",
                        alias, response)
        self._resolved[alias] = (now, room_id)
        return room_id

    async def _power(self, room_id: str, user: str) -> float:
        creation = self._creations.get(room_id)
        if creation is None:
            event = await self._state(room_id, "m.room.create", whole=True)
            if event is None:
                raise RoomStateError("cannot read how this room was created; try again")
            creation = _creation(event)
            self._creations[room_id] = creation
        levels = await self._state(room_id, "m.room.power_levels", whole=False)
        return power_level(user, levels, creation)

    async def _state(self, room_id: str, event_type: str, whole: bool) -> dict[str, Any] | None:
        """A state event now (`whole`: with its sender, else its content); None if the
        room has none. Anything else the homeserver answers refuses the command."""
        method, path = Api.room_get_state_event(self.client.access_token, room_id, event_type)
        if whole:
            path += "&format=event"
        try:
            response = await self.client.send(method, path)
            body = await response.json(content_type=None)
        except (*NETWORK_ERRORS, ValueError) as exc:
            raise RoomStateError(f"cannot read this room's {event_type} just now "
                                 f"({type(exc).__name__}); try again") from None
        if response.status == 404:
            return None
        if response.status != 200 or not isinstance(body, dict):
            raise RoomStateError(f"cannot read this room's {event_type} (HTTP "
                                 f"{response.status}); try again")
        return body


def _creation(event: Mapping[str, Any]) -> Creation:
    # A homeserver that ignores format=event answers the content alone: before room
    # version 11 it names the creator; later ones leave only additional_creators.
    content = event.get("content", event)
    creators = {str(user) for user in content.get("additional_creators") or ()
                if isinstance(user, str)}
    sender = event.get("sender") or content.get("creator")
    if isinstance(sender, str):
        creators.add(sender)
    return Creation(str(content.get("room_version", "1")), frozenset(creators))
