"""Cost of asking the policy who may run what, with 1,000 targets that all carry rules.

Goal (issue #19): a rule check per command costs < 1 ms with 1,000 targets. Timed: one
room command's check (a target with allowed_users globs, rooms and power_level), a batch
of 50 such targets, and `!targets`' listing (every target checked for one person). The
anchor is what a command cost before per-target rules: one `[access] allowed_users` match.

Usage: python bench/policy.py [--targets 1000] [--rounds 5]

The last line printed is JSON only: {"check_us", "batch50_us", "listing_us", "anchor_us",
"ratio" (check/anchor), "goal_met" (check < 1000 µs)}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from matrixjobs.config import AccessConfig, TargetConfig
from matrixjobs.policy import Action, Caller, Place, Policy

USER = "@alice:ops.example.org"
ROOM = "!deploys:example.org"


def targets(count: int) -> dict[str, TargetConfig]:
    made = {}
    for n in range(count):
        made[f"t{n}"] = TargetConfig.model_validate({
            "command": ["true"],
            "allowed_users": [f"@user{n}:example.org", "@*:ops.example.org"],
            "rooms": [f"#room{n}:example.org", ROOM],
            "power_level": 50,
            "approvals": n % 2,
        })
    return made


def per_call_us(call: Callable[[], object], seconds: float = 0.3) -> float:
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            call()
        calls += 100
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    access = AccessConfig(allowed_users=["@bob:example.org", "@*:ops.example.org"])
    policy = Policy(access, targets(args.targets))
    caller = Caller.in_room(USER, Place(ROOM, frozenset({"#room3:example.org"}), 50))
    last = f"t{args.targets - 1}"
    batch = [f"t{n}" for n in range(0, args.targets, max(args.targets // 50, 1))][:50]
    measures: dict[str, list[float]] = {"check": [], "batch50": [], "listing": [],
                                        "anchor": []}
    for _ in range(args.rounds):  # interleaved, so a noisy neighbour hurts all alike
        measures["check"].append(per_call_us(
            lambda: policy.decide(caller, Action.RUN, [last])))
        measures["batch50"].append(per_call_us(
            lambda: policy.decide(caller, Action.RUN, batch)))
        measures["listing"].append(per_call_us(lambda: policy.may_run(caller), 1.0))
        measures["anchor"].append(per_call_us(lambda: access.allows(USER)))
    medians = {name: statistics.median(values) for name, values in measures.items()}
    assert policy.decide(caller, Action.RUN, [last]), "the benchmark's caller must pass"
    print(f"{args.targets} targets, median of {args.rounds} rounds:")
    print(f"  one command's check      {medians['check']:9.2f} µs")
    print(f"  a batch of 50 targets    {medians['batch50']:9.2f} µs")
    print(f"  !targets (all checked)   {medians['listing']:9.2f} µs")
    print(f"  anchor: one allowed_users match {medians['anchor']:6.2f} µs "
          f"(ratio {medians['check'] / medians['anchor']:.1f}x)")
    print(json.dumps({"check_us": round(medians["check"], 3),
                      "batch50_us": round(medians["batch50"], 3),
                      "listing_us": round(medians["listing"], 3),
                      "anchor_us": round(medians["anchor"], 3),
                      "ratio": round(medians["check"] / medians["anchor"], 2),
                      "goal_met": medians["check"] < 1000}))


if __name__ == "__main__":
    main()
