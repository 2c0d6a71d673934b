"""Who may do what: one pure decision that every interface asks (the room, the API, the
CLI, MCP, the dashboard). No I/O here: the caller brings what the decision needs (who,
from where, their power level in that room), and gets allow or a reason to show."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from matrixjobs.config import AccessConfig, TargetConfig, user_matches

# The name the service token acts under (it has every right but one: see `decide`).
ADMIN = "admin"


class Action(StrEnum):
    RUN = "run"  # start a job or batch
    CANCEL = "cancel"
    RERUN = "rerun"
    LOGS = "logs"  # read a job's output
    APPROVE = "approve"  # approve or deny work held for approval
    TOKEN = "token"  # issue, list or revoke personal API tokens
    READ = "read"  # status, lists, targets, help
    # Pause or resume a schedule: as for running every target it starts (from here).
    SCHEDULE = "schedule"


class Via(StrEnum):
    ROOM = "room"
    API = "api"
    CLI = "cli"
    MCP = "mcp"
    WEBHOOK = "webhook"  # a trigger: configured by the operator, so no who-may rule applies
    SCHEDULE = "schedule"


# What work the service token asked for records as its requester.
TOKEN_REQUESTERS = frozenset({Via.API, Via.CLI, Via.MCP})


@dataclass(frozen=True, slots=True)
class Place:
    """The room a command was given in, as its state is now."""

    room_id: str
    aliases: frozenset[str] = frozenset()  # the configured aliases that name this room
    power: float = 0  # the sender's power level here; a v12 room's creators: infinite


@dataclass(frozen=True, slots=True)
class Caller:
    user: str  # a Matrix user id, or ADMIN
    via: Via
    place: Place | None = None  # set for room commands
    event_id: str | None = None  # the room event (command or reaction) that asked
    # For room commands: what the rules of these targets need to know of the room, read
    # when they are asked (see matrix/places.py); the policy itself stays pure.
    locate: Callable[[Sequence[str]], Awaitable[Place]] | None = field(default=None,
                                                                      compare=False)

    @property
    def admin(self) -> bool:
        return self.user == ADMIN

    @property
    def requester(self) -> str:
        """What a job records as who asked: the person, or which program the admin used."""
        return str(self.via) if self.admin else self.user

    def asked_for(self, owner: str | None) -> bool:
        """Did this caller ask for work `owner` requested? The service token is one
        identity whichever program (api, cli, mcp) used it."""
        if owner is None:
            return False
        return owner == self.user or (self.admin and owner in TOKEN_REQUESTERS)

    @classmethod
    def in_room(cls, user: str, place: Place, event_id: str | None = None,
                locate: Callable[[Sequence[str]], Awaitable[Place]] | None = None) -> Caller:
        return cls(user, Via.ROOM, place, event_id, locate)

    async def located(self, targets: Sequence[str]) -> Caller:
        """This caller with its room as `targets`' rules need it."""
        if self.locate is None:
            return self
        return replace(self, place=await self.locate(targets), locate=None)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""  # why not, in words a person can act on
    rule: str = ""  # the config key that refused: allowed_users, rooms, power_level

    def __bool__(self) -> bool:
        return self.allowed


ALLOWED = Decision(True)
STARTING = frozenset({Action.RUN, Action.RERUN})


class Policy:
    def __init__(self, access: AccessConfig, targets: Mapping[str, TargetConfig]) -> None:
        self.access = access
        self.targets = targets

    def decide(self, caller: Caller, action: Action, targets: Sequence[str] = (),
               owner: str | None = None) -> Decision:
        """May `caller` do `action` on work of `targets` (a job's one, a batch's several),
        started by `owner` (None for new work)?"""
        if action is Action.READ:
            return ALLOWED
        if action is Action.APPROVE:
            return self._approver(caller, targets, owner)
        if action is Action.TOKEN:
            return self._token_holder(caller, owner)
        if caller.asked_for(owner) and action not in STARTING:
            return ALLOWED  # one's own job may always be cancelled and read
        if not targets:
            return self._general(caller)
        for name in targets:
            decision = self._target(caller, action, name)
            if not decision:
                return decision
        return ALLOWED

    def known(self, user: str) -> bool:
        """Is `user` allowed to run or approve anything at all? Only they may invite the
        bot, and only they make it talk (a refusal, a notice)."""
        return self.access.allows(user) or any(
            any(users is not None and user_matches(users, user)
                for users in (target.allowed_users, target.approvers))
            for target in self.targets.values())

    def may_run(self, caller: Caller) -> list[str]:
        """The targets `caller` may start from where they are, by name."""
        return [name for name in sorted(self.targets)
                if self._target(caller, Action.RUN, name)]

    def _approver(self, caller: Caller, targets: Sequence[str], owner: str | None) -> Decision:
        """Who may approve or deny held work: never whoever asked for it; else the service
        token, else each target's `approvers`, or whoever may run it (also for a target
        that no longer asks for approval, or is gone)."""
        if caller.asked_for(owner):
            return _refused("you asked for it: your own approval does not count", "approvers")
        if caller.admin:
            return ALLOWED
        for name in targets:
            target = self.targets.get(name)
            if target is not None and target.approvals and target.approvers is not None:
                if not user_matches(target.approvers, caller.user):
                    return _refused(f"you may not approve {name}", "approvers")
            elif not self._target(caller, Action.RUN, name):
                return _refused(f"you may not approve {name}: only those who may run it "
                                "may", "approvers")
        return ALLOWED

    def _token_holder(self, caller: Caller, owner: str | None) -> Decision:
        """The service token manages everyone's tokens; a person, their own, and only if
        some rule lets them run or approve something."""
        if caller.admin:
            return ALLOWED
        if owner is not None and owner != caller.user:
            return _refused("you may manage only your own tokens", "tokens")
        if not self.known(caller.user):
            return _refused("not in [access] allowed_users or any target's allowed_users or "
                            "approvers", "allowed_users")
        return ALLOWED

    def _general(self, caller: Caller) -> Decision:
        if caller.admin or self.access.allows(caller.user):
            return ALLOWED
        return _refused("not in [access] allowed_users", "allowed_users")

    def _target(self, caller: Caller, action: Action, name: str) -> Decision:
        target = self.targets.get(name)
        if target is None:
            return self._general(caller)  # the queue answers "unknown target" itself
        room_only = bool(target.rooms) or target.power_level is not None
        place = caller.place
        if place is None:
            if room_only and (action in STARTING or not caller.admin):
                return _refused(f"{name} can only be started from a Matrix room", "rooms")
            if caller.admin:
                return ALLOWED
        users = self.access.allowed_users if target.allowed_users is None \
            else target.allowed_users
        if not user_matches(users, caller.user):
            return _refused(f"you may not run {name}", "allowed_users")
        if place is None:
            return ALLOWED
        if target.rooms and place.room_id not in target.rooms \
                and not place.aliases.intersection(target.rooms):
            return _refused(f"{name} cannot be run from this room", "rooms")
        if target.power_level is not None and place.power < target.power_level:
            yours = "∞" if math.isinf(place.power) else f"{place.power:g}"
            return _refused(f"{name} needs power level {target.power_level} in this room "
                            f"(yours: {yours})", "power_level")
        return ALLOWED


def _refused(reason: str, rule: str) -> Decision:
    return Decision(False, reason, rule)
