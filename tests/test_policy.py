"""The one policy every interface asks: who may do what, from where (pure, table-driven)."""

from __future__ import annotations

import math

import pytest

from matrixjobs.config import AccessConfig, TargetConfig
from matrixjobs.matrix.places import Creation, power_level
from matrixjobs.policy import ADMIN, Action, Caller, Place, Policy, Via

ALICE, BOB, EVE = "@alice:example.org", "@bob:example.org", "@eve:evil.org"
OPS_CAROL = "@carol:ops.example.org"
DEPLOYS = "!deploys:example.org"
LOBBY = "!lobby:example.org"


def target(**rules: object) -> TargetConfig:
    return TargetConfig.model_validate({"command": ["true"], **rules})


POLICY = Policy(
    AccessConfig(allowed_users=[ALICE, BOB]),
    {
        "docs": target(),
        "ops": target(allowed_users=["@*:ops.example.org"]),
        "deploy": target(rooms=["#deploys:example.org", DEPLOYS], power_level=50),
        "lobby-only": target(rooms=[LOBBY]),
        "mods": target(rooms=[DEPLOYS, LOBBY], power_level=50),
    },
)


def in_room(user: str, room: str = DEPLOYS, power: float = 0,
            aliases: frozenset[str] = frozenset()) -> Caller:
    return Caller.in_room(user, Place(room, aliases, power))


API_ADMIN = Caller(ADMIN, Via.API)


@pytest.mark.parametrize(("caller", "action", "targets", "owner", "reason"), [
    # [access] allowed_users is every target's default
    (in_room(ALICE), Action.RUN, ["docs"], None, ""),
    (in_room(EVE), Action.RUN, ["docs"], None, "you may not run docs"),
    # a target's own allowed_users replaces it
    (in_room(OPS_CAROL), Action.RUN, ["ops"], None, ""),
    (in_room(ALICE), Action.RUN, ["ops"], None, "you may not run ops"),
    # rooms, by id or by an alias that names the room now
    (in_room(ALICE, LOBBY), Action.RUN, ["lobby-only"], None, ""),
    (in_room(ALICE, DEPLOYS), Action.RUN, ["lobby-only"], None,
     "lobby-only cannot be run from this room"),
    (in_room(ALICE, "!other:example.org", 100, frozenset({"#deploys:example.org"})),
     Action.RUN, ["deploy"], None, ""),
    # power levels, in the command's room; a v12 room's creator outranks them all
    (in_room(ALICE, DEPLOYS, 50), Action.RUN, ["deploy"], None, ""),
    (in_room(ALICE, DEPLOYS, 49), Action.RUN, ["deploy"], None,
     "deploy needs power level 50 in this room (yours: 49)"),
    (in_room(ALICE, DEPLOYS, math.inf), Action.RUN, ["deploy"], None, ""),
    (in_room(ALICE, LOBBY, 100), Action.RUN, ["deploy"], None,
     "deploy cannot be run from this room"),
    # a batch is allowed only if every target in it is
    (in_room(ALICE, DEPLOYS, 10), Action.RUN, ["docs", "deploy"], None,
     "deploy needs power level 50 in this room (yours: 10)"),
    # cancel, rerun and logs follow the rules for starting...
    (in_room(BOB, DEPLOYS, 0), Action.CANCEL, ["deploy"], ALICE,
     "deploy needs power level 50 in this room (yours: 0)"),
    (in_room(BOB, DEPLOYS, 0), Action.LOGS, ["deploy"], ALICE,
     "deploy needs power level 50 in this room (yours: 0)"),
    (in_room(BOB, DEPLOYS, 50), Action.CANCEL, ["deploy"], ALICE, ""),
    # ...but one's own job may always be cancelled and read, not started again
    (in_room(ALICE, DEPLOYS, 0), Action.CANCEL, ["deploy"], ALICE, ""),
    (in_room(ALICE, LOBBY, 0), Action.LOGS, ["deploy"], ALICE, ""),
    (in_room(ALICE, DEPLOYS, 0), Action.RERUN, ["deploy"], ALICE,
     "deploy needs power level 50 in this room (yours: 0)"),
    # a target with rooms or power_level starts only from a room, whoever asks
    (API_ADMIN, Action.RUN, ["deploy"], None, "deploy can only be started from a Matrix room"),
    (API_ADMIN, Action.RERUN, ["mods"], None, "mods can only be started from a Matrix room"),
    (Caller(ALICE, Via.API), Action.RUN, ["deploy"], None,
     "deploy can only be started from a Matrix room"),
    (Caller(ALICE, Via.API), Action.CANCEL, ["deploy"], BOB,
     "deploy can only be started from a Matrix room"),
    # the service token may do anything else
    (API_ADMIN, Action.CANCEL, ["deploy"], ALICE, ""),
    (API_ADMIN, Action.LOGS, ["deploy"], ALICE, ""),
    (API_ADMIN, Action.RUN, ["ops", "docs"], None, ""),
    (Caller(ALICE, Via.API), Action.RUN, ["docs"], None, ""),
    (Caller(EVE, Via.API), Action.RUN, ["docs"], None, "you may not run docs"),
    # unknown targets fall back to [access] (the queue names them as unknown)
    (in_room(ALICE), Action.RUN, ["nosuch"], None, ""),
    (in_room(EVE), Action.RUN, ["nosuch"], None, "not in [access] allowed_users"),
    # reading is open
    (in_room(EVE), Action.READ, [], None, ""),
])
def test_decisions(caller: Caller, action: Action, targets: list[str], owner: str | None,
                   reason: str) -> None:
    decision = POLICY.decide(caller, action, targets, owner)
    assert (decision.allowed, decision.reason) == (not reason, reason)


def test_a_refusal_names_the_config_key_that_refused() -> None:
    assert POLICY.decide(in_room(EVE), Action.RUN, ["docs"]).rule == "allowed_users"
    assert POLICY.decide(in_room(ALICE, LOBBY), Action.RUN, ["deploy"]).rule == "rooms"
    assert POLICY.decide(in_room(ALICE), Action.RUN, ["deploy"]).rule == "power_level"


def test_targets_a_person_may_run_depend_on_the_room_and_their_power() -> None:
    assert POLICY.may_run(in_room(ALICE, LOBBY)) == ["docs", "lobby-only"]
    assert POLICY.may_run(in_room(ALICE, DEPLOYS, 50)) == ["deploy", "docs", "mods"]
    assert POLICY.may_run(in_room(OPS_CAROL, DEPLOYS, 50)) == ["ops"]
    assert POLICY.may_run(in_room(EVE)) == []
    assert POLICY.may_run(API_ADMIN) == ["docs", "ops"]


def test_known_people_are_those_allowed_to_run_something() -> None:
    assert [POLICY.known(user) for user in (ALICE, OPS_CAROL, EVE)] == [True, True, False]


V12 = Creation("12", frozenset({ALICE, BOB}))  # Alice created it, Bob is an additional creator
V11 = Creation("11", frozenset({ALICE}))
LEVELS = {"users": {ALICE: 100, "@mod:example.org": 50, "@old:example.org": "75"},
          "users_default": 5}


@pytest.mark.parametrize(("user", "levels", "creation", "power"), [
    (ALICE, LEVELS, V12, math.inf),
    (BOB, LEVELS, V12, math.inf),  # additional creators too, though not in `users`
    (ALICE, LEVELS, V11, 100),
    (BOB, LEVELS, V11, 5),  # users_default
    ("@mod:example.org", LEVELS, V12, 50),
    ("@old:example.org", LEVELS, V11, 75),  # old rooms allow strings
    (BOB, {}, V11, 0),
    (ALICE, None, V11, 100),  # no power levels yet: the creator has 100
    (BOB, None, V11, 0),
    (ALICE, LEVELS, Creation("org.matrix.hydra.11", frozenset({ALICE})), math.inf),
])
def test_power_levels_as_the_spec_reads_them(user: str, levels: dict[str, object] | None,
                                             creation: Creation, power: float) -> None:
    assert power_level(user, levels, creation) == power
