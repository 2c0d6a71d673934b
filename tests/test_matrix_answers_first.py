"""Answers first (#19, part 5), against a real Synapse with its DEFAULT rc_message (0.2/s,
burst 10) for the bot: a command's answer takes the next send the budget allows, ahead of
the ping and the log file of a job that just failed."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import MATRIX_TARGETS, make_config, python_target
from matrix_people import BotMessage
from test_matrix_e2e import Scene, finished, in_thread, start_bot

pytestmark = pytest.mark.timeout(120)

# Progress every 0.1 s for 3 s, then a failure: its edits spend the bot's budget down to the
# reserve, so when it fails the final edit takes the last send and the ping and the log file
# wait for the refill (one send every 5 s).
FAILS_LATE = python_target("""
    import sys, time
    for step in range(1, 31):
        time.sleep(0.1)
        print(f"::progress {step}/30 step {step}", flush=True)
    print("compiler exploded")
    sys.exit(3)
""", max_retries=0)


class LimitedScene(Scene):
    def config(self, **matrix: Any):
        return make_config(
            self.tmp_path,
            matrix={"homeserver": self.server.base_url, "user_id": self.bot_id,
                    "password": "bot-password", "rate_per_s": 0.2, "rate_burst": 10,
                    **matrix},
            access={"allowed_users": [self.alice.user_id]},
            progress={"interval_ms": 200},
            targets={**MATRIX_TARGETS, "fails_late": FAILS_LATE},
        )


def seconds_between(first: dict[str, Any], then: dict[str, Any]) -> float:
    """The homeserver's own clock: when it received each event."""
    return (then["origin_server_ts"] - first["origin_server_ts"]) / 1000


async def answer_to(scene: LimitedScene, text: str) -> tuple[float, BotMessage]:
    """Say `text`; return the seconds until its answer, by the homeserver's clock."""
    command = await scene.say(text)
    answer = await scene.reply_to(command, timeout=30)
    events = {e["event_id"]: e for e in await in_thread(scene.alice.timeline, scene.room)}
    return seconds_between(events[command], answer.original), answer


async def test_answers_go_before_a_failed_jobs_ping_and_log_file(synapse_limited, tmp_path):
    scene = LimitedScene(synapse_limited, tmp_path)
    for person in (scene.alice, scene.mallory):
        synapse_limited.exempt_from_rate_limit(person.user_id)  # only the bot is limited
    app = await start_bot(scene.config())
    try:
        await scene.open_room()
        build = await scene.say("!build fails_late")
        failed = await scene.reply_to(build, finished, timeout=60)
        assert failed.current.startswith("❌")
        bucket = app.components[0].scheduler.bucket
        budget = bucket.available()
        assert budget < 1, f"the budget should be short when the job fails ({budget:.2f})"

        # Right after the failure, its ping and log file waiting: the next send answers.
        first, answer = await answer_to(scene, "!build nosuchtarget")
        assert "unknown target 'nosuchtarget'" in answer.current
        # Asked again at once, with nothing left in the budget: one refill (5 s), still
        # ahead of the ping and the file.
        left = bucket.available()
        second, again = await answer_to(scene, "!build nosuchtarget")
        print(f"\nanswer latency: {first:.2f}s (budget {budget:.2f} when the job failed), "
              f"then {second:.2f}s (budget {left:.2f})")
        assert first <= 5.5 and second <= 5.5

        ping = await scene.reply_to(build, lambda body: body.startswith(scene.alice.user_id),
                                    timeout=30)
        log_file = await scene.reply_to(failed.event_id, timeout=30)
        assert log_file.original["content"]["msgtype"] == "m.file"
        for later in (ping, log_file):
            assert seconds_between(again.original, later.original) > 0
    finally:
        await app.stop()
