"""The edit scheduler, driven with a fake clock and a recording sender."""

from __future__ import annotations

import itertools
import logging
import re
import time

import pytest

from matrixjobs.errors import StoreUnavailableError
from matrixjobs.matrix.edits import (
    PING_FAILED,
    EditScheduler,
    Pings,
    RateLimitedError,
    SendFailedError,
)
from matrixjobs.matrix.ratelimit import TokenBucket
from matrixjobs.matrix.render import render_error
from matrixjobs.metrics import Metrics
from matrixjobs.models import Job, ProgressMessage, Status
from matrixjobs.progress.events import ProgressInfo, job_event


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[float, str, dict]] = []
        self.fail_with: list[Exception] = []
        self.txn_ids: list[str] = []
        self.uploads: list[tuple[str, bytes, str, str]] = []
        self.clock: Clock | None = None

    async def send(self, room_id, content, txn_id):
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.txn_ids.append(txn_id)
        self.sent.append((self.clock.now, room_id, content))
        return f"$event{len(self.sent)}"

    async def upload(self, room_id, data, filename, content_type):
        self.uploads.append((room_id, data, filename, content_type))
        return {"url": f"mxc://test/{len(self.uploads)}"}


def scheduler(store, rate=0.2, burst=10, interval=0.5, **kwargs):
    clock = Clock()
    sender = Recorder()
    sender.clock = clock
    bucket = TokenBucket(rate, burst, clock)
    sched = EditScheduler(sender, store, bucket, interval, clock=clock, monotonic=clock, **kwargs)
    return sched, sender, clock


def state(clock, status=Status.PROCESSING, current=None, total=10, job_id="j1", started=None):
    job = Job(id=job_id, type="command", name="docs", data={}, status=status, priority=0,
              retry_count=0, max_retries=0, timeout_s=60, created_at=started or clock.now,
              started_at=started or clock.now)
    if status.terminal:
        job.finished_at = clock.now
    progress = None
    if current is not None:
        progress = ProgressInfo(current=current, total=total, percentage=current / total * 100)
    return job_event(job, clock.now, progress, f"step {current}")


async def drain(sched, clock, until, step=0.05):
    while clock.now < until:
        while await sched.send_next():
            pass
        clock.now += step


def is_edit_of(content, original):
    return content.get("m.relates_to") == {"rel_type": "m.replace", "event_id": original}


async def test_first_message_is_a_reply_and_edits_replace_the_original(store):
    sched, sender, clock = scheduler(store)
    sched.track("!room", "@alice:x", "$command", state(clock, Status.PENDING))
    assert not await sched.send_next()  # a queued job's first message waits one interval
    clock.now += 0.5
    await sched.send_next()
    first = sender.sent[0][2]
    assert first["msgtype"] == "m.notice"
    assert first["m.relates_to"] == {"m.in_reply_to": {"event_id": "$command"}}
    assert first["format"] == "org.matrix.custom.html" and first["formatted_body"]
    clock.now += 1
    sched.update(state(clock, current=3))
    await sched.send_next()
    edit = sender.sent[1][2]
    assert is_edit_of(edit, "$event1")
    assert edit["body"] == "* " + edit["m.new_content"]["body"]
    assert edit["m.new_content"]["formatted_body"] and "3/10" in edit["m.new_content"]["body"]
    assert edit["m.mentions"] == {} and edit["m.new_content"]["m.mentions"] == {}
    [saved] = await store.open_messages()
    assert (saved.subject_id, saved.event_id, saved.edits) == ("j1", "$event1", 1)



class Unkept:
    """A store in trouble for the first message it is asked to keep, then well again."""

    def __init__(self, store):
        self.store = store
        self.refusals = 1

    async def save_message(self, message, now):
        if self.refusals:
            self.refusals -= 1
            raise StoreUnavailableError("store: locked; try again in 10 s")
        await self.store.save_message(message, now)

    async def update_message(self, subject_id, edits, final):
        await self.store.update_message(subject_id, edits, final)


async def test_a_first_message_the_store_could_not_keep_is_sent_again_and_kept(store, caplog):
    """Sent again under the same transaction id (the homeserver answers it with the same
    event), so its edits can be found after a restart; said in one line, no traceback."""
    sched, sender, clock = scheduler(Unkept(store))
    sched.track("!room", "@alice:x", "$command", state(clock))
    await drain(sched, clock, clock.now + 5)
    assert sender.txn_ids[:2] == ["mj-j1-first", "mj-j1-first"]
    [saved] = await store.open_messages()
    assert saved.event_id == "$event2"
    [said] = [r for r in caplog.records if "could not keep" in r.getMessage()]
    assert said.exc_info is None and "store: locked" in said.getMessage()

async def test_updates_are_coalesced_and_edits_spaced_by_the_interval(store):
    sched, sender, clock = scheduler(store, rate=0, interval=0.5)
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING))
    await drain(sched, clock, clock.now + 0.01)
    for step in range(1, 41):  # 40 updates over 2 s
        sched.update(state(clock, current=step % 10, started=started))
        await drain(sched, clock, clock.now + 0.05, step=0.05)
    times = [at for at, _, _ in sender.sent[1:]]
    assert 3 <= len(times) <= 5
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(times))


async def test_five_second_job_shows_final_state_promptly_on_a_fresh_default_budget(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING))
    for step in range(50):  # progress every 100 ms for 5 s
        sched.update(state(clock, current=step / 5, started=started))
        await drain(sched, clock, clock.now + 0.1)
    finished = clock.now
    sched.update(state(clock, Status.COMPLETED, current=10, started=started))
    await drain(sched, clock, clock.now + 2)
    final = [at for at, _, c in sender.sent if "✅" in c.get("m.new_content", c)["body"]]
    assert final and final[0] - finished <= 1.5
    assert len(sender.sent) <= 11  # never more than the homeserver's burst in 5 s


async def test_final_states_jump_the_queue_and_reserve_survives_many_live_jobs(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    for number in range(1, 6):
        sched.track("!room", "@a:x", f"$c{number}",
                    state(clock, Status.PENDING, job_id=f"j{number}"))
    await drain(sched, clock, clock.now + 0.6)
    assert len(sender.sent) == 5  # five first messages
    for second in range(10):  # busy progress on all five
        for number in range(1, 6):
            sched.update(state(clock, current=second, job_id=f"j{number}"))
        await drain(sched, clock, clock.now + 1)
    before = len(sender.sent)
    for number in range(1, 6):
        sched.update(state(clock, Status.COMPLETED, current=10, job_id=f"j{number}"))
    await drain(sched, clock, clock.now + 0.1)
    finals = sender.sent[before:]
    assert len(finals) == 5 and all("✅" in c["m.new_content"]["body"] for _, _, c in finals)


async def test_job_that_ends_before_its_first_message_gets_one_message(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=1)  # starts with no budget
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    sched.update(state(clock, current=5))
    sched.update(state(clock, Status.FAILED, current=5))
    await drain(sched, clock, clock.now + 6)
    assert len(sender.sent) == 1
    assert "❌" in sender.sent[0][2]["body"] and "m.new_content" not in sender.sent[0][2]
    assert await store.open_messages() == []


async def test_rate_limit_response_backs_off_and_retries(store, caplog):
    sched, sender, clock = scheduler(store, rate=0)
    sender.fail_with = [RateLimitedError(3.0)]
    sched.track("!room", "@a:x", "$cmd", state(clock))
    clock.now += 0.5
    await sched.send_next()
    assert sender.sent == [] and "rate-limiting the bot" in caplog.text
    assert not await sched.send_next()
    clock.now += 3.01
    assert await sched.send_next() and len(sender.sent) == 1


async def test_sends_edits_and_429s_are_counted_once_each(store):
    metrics = Metrics([])
    sched, sender, clock = scheduler(store, rate=0, counter=metrics)
    sender.fail_with = [RateLimitedError(3.0)]
    sched.track("!room", "@a:x", "$cmd", state(clock))
    clock.now += 0.5
    await sched.send_next()  # refused with a 429: nothing went out
    clock.now += 3.01
    await sched.send_next()
    sched.update(state(clock, current=5))
    sched.update(state(clock, Status.COMPLETED, current=10))
    sched.reply("!room", "$other", sched._render(state(clock), clock.now))
    await drain(sched, clock, clock.now + 2)
    assert len(sender.sent) == 3  # the first message, its final edit, the reply
    counted = {(s.name, s.labels.get("kind")): s.value for family in metrics.registry.collect()
               for s in family.samples if s.name.endswith("_total")}
    assert counted[("matrixjobs_matrix_events_total", "sent")] == 2
    assert counted[("matrixjobs_matrix_events_total", "edited")] == 1
    assert counted[("matrixjobs_matrix_rate_limited_total", None)] == 1


async def test_transient_failures_back_off_and_permanent_ones_give_up(store):
    sched, sender, clock = scheduler(store, rate=0)
    sender.fail_with = [SendFailedError("connection reset")]
    sched.track("!room", "@a:x", "$cmd", state(clock))
    clock.now += 0.5
    await sched.send_next()
    assert not await sched.send_next()  # paused
    clock.now += 1.01
    await sched.send_next()
    assert len(sender.sent) == 1
    sender.fail_with = [SendFailedError("M_FORBIDDEN", permanent=True)]
    sched.reply("!gone", "$x", sched._render(state(clock), clock.now))
    await sched.send_next()
    assert sched.backlog == 0


async def test_edits_per_message_are_capped_but_the_final_one_still_goes(store):
    sched, sender, clock = scheduler(store, rate=0, interval=0.1, max_edits=5)
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    for step in range(30):
        sched.update(state(clock, current=step % 10))
        await drain(sched, clock, clock.now + 0.2)
    sched.update(state(clock, Status.COMPLETED, current=10))
    await drain(sched, clock, clock.now + 0.2)
    edits = [c for _, _, c in sender.sent if "m.new_content" in c]
    assert len(edits) == 5 and "✅" in edits[-1]["m.new_content"]["body"]


async def test_long_job_ends_with_a_reply_that_mentions_the_requester(store):
    sched, sender, clock = scheduler(store, rate=0, pings=Pings(long_s=30))
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING))
    await drain(sched, clock, clock.now + 0.1)
    clock.now += 45
    sched.update(state(clock, Status.COMPLETED, current=10, started=started))
    await drain(sched, clock, clock.now + 0.1)
    notice = sender.sent[-1][2]
    assert notice["m.mentions"] == {"user_ids": ["@alice:x"]}
    assert notice["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}
    assert "@alice:x" in notice["body"]


async def test_restored_message_keeps_editing_the_same_event(store):
    sched, sender, clock = scheduler(store, rate=0)
    message = ProgressMessage("j1", "!room", "$original", "@a:x", "$cmd", edits=7)
    sched.restore(message, state(clock, Status.COMPLETED, current=10))
    await sched.send_next()
    [(_, room, content)] = sender.sent
    assert room == "!room" and is_edit_of(content, "$original")


async def test_restored_message_that_was_never_sent_is_sent_now(store):
    sched, sender, clock = scheduler(store, rate=0)
    message = ProgressMessage("j1", "!room", None, "@a:x", "$cmd")
    sched.restore(message, state(clock, Status.PROCESSING, current=2))
    await sched.send_next()
    [(_, _, content)] = sender.sent
    assert "m.new_content" not in content
    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}
    [saved] = await store.open_messages()
    assert saved.event_id == "$event1"


async def test_a_job_quicker_than_the_interval_needs_a_single_event(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    await drain(sched, clock, clock.now + 0.2)
    sched.update(state(clock, Status.COMPLETED, current=10))
    await drain(sched, clock, clock.now + 1)
    [(_, _, content)] = sender.sent
    assert content["body"].startswith("✅") and "m.new_content" not in content


async def test_a_started_job_shows_running_in_its_first_message(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    sched.update(state(clock, current=1))
    assert not await sched.send_next()
    clock.now += 0.5
    await sched.send_next()
    assert sender.sent[0][2]["body"].startswith("🔄")


def test_after_a_429_exactly_one_send_is_allowed_when_the_wait_ends():
    clock = Clock()
    bucket = TokenBucket(0.2, 10, clock)
    bucket.limited(4.4)
    assert bucket.available() == 0
    clock.now += 4.4
    assert bucket.available() >= 1 - 1e-9


async def test_a_retried_first_message_reuses_its_transaction_and_content(store):
    sched, sender, clock = scheduler(store, rate=0)
    sender.fail_with = [SendFailedError("response lost")]
    sched.track("!room", "@a:x", "$cmd", state(clock, current=1))
    clock.now += 0.5
    await sched.send_next()  # failed: the server may or may not have it
    sched.update(state(clock, current=2))
    clock.now += 1.01
    await sched.send_next()
    assert sender.txn_ids == ["mj-j1-first"]
    assert "1/10" in sender.sent[0][2]["body"]  # the content first attempted
    await drain(sched, clock, clock.now + 1)
    assert "2/10" in sender.sent[-1][2]["m.new_content"]["body"]  # then edited forward
    assert len(set(sender.txn_ids)) == len(sender.txn_ids)


async def test_restored_unsent_message_is_followed_by_an_edit_with_the_latest_state(store):
    sched, sender, clock = scheduler(store, rate=0)
    message = ProgressMessage("j1", "!room", None, "@a:x", "$cmd")
    sched.restore(message, state(clock, Status.COMPLETED, current=10))
    await drain(sched, clock, clock.now + 1)
    assert len(sender.sent) == 2  # the first send may have been a repeat from before
    assert is_edit_of(sender.sent[1][2], "$event1")
    assert "✅" in sender.sent[1][2]["m.new_content"]["body"]
    assert await store.open_messages() == []


async def test_pings_wait_behind_the_final_reserve_but_answers_spend_it(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=3, interval=0.5)  # two tokens
    sched.track("!room", "@a:x", "$cmd", state(clock))
    clock.now += 0.5
    await sched.send_next()  # the first message: one token left, the reserve of one
    assert sender.sent[0][2]["m.relates_to"]["m.in_reply_to"]["event_id"] == "$cmd"
    sched.notify("!room", "$cmd0", render_error("a ping"), mentions=["@a:x"])
    assert not await sched.send_next()  # the last token is kept for the final edit...
    sched.reply("!room", "$ask", render_error("an answer"))
    assert await sched.send_next()  # ...but a person waiting for an answer gets it
    assert reply_target(sender.sent[-1][2]) == "$ask"
    sched.update(state(clock, Status.COMPLETED, current=10))
    clock.now += 5
    assert await sched.send_next()  # the next token: the final state, before the ping
    assert "✅" in sender.sent[-1][2]["m.new_content"]["body"]


async def test_reply_queue_is_bounded(store, caplog):
    sched, _sender, clock = scheduler(store, rate=0.2, burst=1)
    for n in range(80):
        sched.reply("!room", f"$x{n}", sched._render(state(clock), clock.now))
    assert sched.backlog == 50 and "dropping one" in caplog.text


async def test_flush_sends_every_latest_state_and_reply_at_once(store):
    """At shutdown nothing waits for the interval: first messages, progress, finals, replies."""
    sched, sender, clock = scheduler(store, rate=0, interval=5.0)
    for number in (1, 2):
        sched.track("!room", "@alice:x", f"$cmd{number}",
                    state(clock, Status.PENDING, job_id=f"j{number}"))
    clock.now += 5
    await drain(sched, clock, clock.now + 0.01)
    assert len(sender.sent) == 2
    sched.update(state(clock, current=4, job_id="j1"))
    sched.update(state(clock, Status.COMPLETED, current=10, job_id="j2"))
    sched.track("!room", "@alice:x", "$cmd3", state(clock, Status.PENDING, job_id="j3"))
    sched.reply("!room", "$cmd4", render_error("matrixjobs is shutting down"))
    assert await sched.flush(1.0) == 0
    bodies = [content.get("m.new_content", content)["body"] for _, _, content in sender.sent[2:]]
    assert len(bodies) == 4, bodies
    # Answers as they were asked for (j3's first message, the reply), final states, progress.
    assert "j3" in bodies[0]
    assert "shutting down" in bodies[1]
    assert bodies[2].startswith("✅")
    assert "4/10" in bodies[3]
    assert sched.backlog == 0


async def test_flush_gives_up_at_its_timeout_and_says_what_is_left(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=2, interval=0.5)  # one token
    for number in (1, 2, 3):
        sched.track("!room", "@alice:x", f"$cmd{number}",
                    state(clock, Status.COMPLETED, current=10, job_id=f"j{number}"))
    began = time.monotonic()
    assert await sched.flush(0.3) == 2  # the fake clock stands still: no refill
    assert time.monotonic() - began < 1.0
    assert len(sender.sent) == 1
    assert sender.sent[0][2]["m.relates_to"]["m.in_reply_to"]["event_id"] == "$cmd1"


async def test_a_failed_job_gets_its_log_as_a_file_in_a_thread_after_its_final_edit(store):
    async def load_log(job_id):
        return f"the log of {job_id}\n"

    sched, sender, clock = scheduler(store, rate=0, load_log=load_log)
    sched.track("!room", "@alice:x", "$cmd", state(clock, job_id="j7"))
    await drain(sched, clock, clock.now + 1)
    sched.update(state(clock, Status.FAILED, job_id="j7"))
    sched.track("!room", "@alice:x", "$cmd2", state(clock, Status.COMPLETED, job_id="j8"))
    await drain(sched, clock, clock.now + 1)
    assert sender.uploads == [("!room", b"the log of j7\n", "j7-docs.log", "text/plain")]
    contents = [content for _, _, content in sender.sent]
    kinds = [kind_of(content) for content in contents]
    assert kinds.index("final") < kinds.index("file")  # the file waits for the final edit
    [attachment] = [c for c in contents if c["msgtype"] == "m.file"]
    assert attachment == {
        "msgtype": "m.file", "body": "j7-docs.log", "filename": "j7-docs.log",
        "info": {"mimetype": "text/plain", "size": 14}, "url": "mxc://test/1",
        "m.mentions": {},
        "m.relates_to": {"rel_type": "m.thread", "event_id": "$event1", "is_falling_back": True,
                         "m.in_reply_to": {"event_id": "$event1"}},
    }
    assert len(sender.sent) == 5  # j7: first message, final edit, failure ping, file; j8: one
    assert sched.backlog == 0


async def test_a_file_whose_send_failed_is_sent_again_without_a_second_upload(store):
    async def load_log(job_id):
        return "log\n"

    sched, sender, clock = scheduler(store, rate=0, load_log=load_log)
    sched.track("!room", "@alice:x", "$cmd", state(clock, job_id="j7"))
    await drain(sched, clock, clock.now + 1)
    sched.update(state(clock, Status.FAILED, job_id="j7"))
    await sched.send_next()  # the final edit
    sender.fail_with.append(SendFailedError("network down"))
    await drain(sched, clock, clock.now + 5)
    assert len(sender.uploads) == 1
    assert [c["msgtype"] for _, _, c in sender.sent].count("m.file") == 1
    assert "mj-j7-log" in sender.txn_ids  # (the failure ping goes after it)


async def finish_quickly(sched, clock, status, job_id="j1"):
    """Track a job, end it in `status` a second later, and send everything."""
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING, job_id=job_id))
    await drain(sched, clock, clock.now + 0.6)
    clock.now += 1
    sched.update(state(clock, status, current=10, job_id=job_id, started=started))
    await drain(sched, clock, clock.now + 0.6)


def pings(sender):
    return [content for _, _, content in sender.sent if content["m.mentions"]]


async def test_a_short_success_pings_nobody_but_a_short_failure_does(store):
    sched, sender, clock = scheduler(store, rate=0)
    await finish_quickly(sched, clock, Status.COMPLETED)
    assert pings(sender) == []
    await finish_quickly(sched, clock, Status.FAILED, job_id="j2")
    [ping] = pings(sender)
    assert ping["body"].startswith("@alice:x ❌ docs (j2) failed")


async def test_a_fix_pings_and_says_fixed(store):
    async def previous(subject: str) -> Status | None:
        return Status.FAILED if subject == "j2" else Status.COMPLETED

    sched, sender, clock = scheduler(store, rate=0, pings=Pings(previous=previous))
    await finish_quickly(sched, clock, Status.COMPLETED)
    assert pings(sender) == []  # passed last time too
    await finish_quickly(sched, clock, Status.COMPLETED, job_id="j2")
    [ping] = pings(sender)
    assert ping["body"].startswith("@alice:x ✅ docs (j2) fixed, completed in 1s")


async def test_the_store_is_not_asked_about_the_last_run_when_fixed_pings_are_off(store):
    asked: list[str] = []

    async def previous(subject: str) -> Status | None:
        asked.append(subject)
        return Status.FAILED

    sched, sender, clock = scheduler(store, rate=0, pings=Pings(on=(PING_FAILED,),
                                                                previous=previous))
    await finish_quickly(sched, clock, Status.COMPLETED)
    assert asked == [] and pings(sender) == []


async def test_pings_can_be_turned_off(store):
    async def previous(subject: str) -> Status | None:
        return Status.FAILED

    sched, sender, clock = scheduler(store, rate=0, pings=Pings(on=(), long_s=0,
                                                                previous=previous))
    await finish_quickly(sched, clock, Status.FAILED)
    await finish_quickly(sched, clock, Status.COMPLETED, job_id="j2")
    assert pings(sender) == [] and len(sender.sent) == 4


# -- answers first (#19, part 5): what a person waits for goes first when budget is short ----

def reply_target(content):
    return (content.get("m.relates_to") or {}).get("m.in_reply_to", {}).get("event_id")


def kind_of(content) -> str:
    """What a send was, as the tables below name it."""
    if content["msgtype"] == "m.file":
        return "file"
    if content["m.mentions"]:
        return "ping"
    if "m.new_content" in content:
        return "final" if content["m.new_content"]["body"][0] in "✅❌" else "edit"
    return "answer" if reply_target(content) == "$ask" else "first"


async def load_log(job_id):
    return "log\n"


async def with_no_budget_left(store, jobs):
    """A scheduler on Synapse's default budget (0.2/s, burst 10) that has spent it all on
    `jobs`: live jobs whose first messages went ("final": j2, "edit": j3), and j7 whose failure
    was the last send ("file+ping": its log file and its ping wait)."""
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5,
                                     load_log=load_log)
    live = [("final", "j2"), ("edit", "j3"), ("file+ping", "j7")]
    for kind, job_id in live:
        if kind in jobs:
            sched.track("!room", "@a:x", f"$cmd-{job_id}", state(clock, job_id=job_id))
    clock.now += 0.5
    await drain(sched, clock, clock.now + 0.01)
    while sched.bucket.available() >= 2:  # the fake clock stands still: whole tokens
        sched.bucket.take()
    if "file+ping" in jobs:
        sched.update(state(clock, Status.FAILED, job_id="j7"))
        assert await sched.send_next()  # its final edit, on the last token
    while sched.bucket.available() >= 1:
        sched.bucket.take()
    sender.sent.clear()
    return sched, sender, clock


def ask(sched, clock, kind):
    """Make `kind` wait to be sent, a tenth of a second after the one before."""
    clock.now += 0.1
    if kind == "answer":
        sched.reply("!room", "$ask", render_error("unknown target 'nosuchtarget'"))
    elif kind == "first":
        sched.track("!room", "@a:x", "$cmd-j4", state(clock, Status.PENDING, job_id="j4"))
    elif kind == "final":
        sched.update(state(clock, Status.COMPLETED, current=10, job_id="j2"))
    elif kind == "edit":
        sched.update(state(clock, current=4, job_id="j3"))


SEND_ORDER = [  # what waits, in the order it came → the order it goes in, one send per 5 s
    (["file+ping", "answer"], ["answer", "file", "ping"]),
    (["final", "answer"], ["answer", "final"]),
    (["edit", "final"], ["final", "edit"]),
    (["file+ping", "final"], ["final", "file", "ping"]),
    (["edit", "first"], ["first", "edit"]),
    (["first", "answer"], ["first", "answer"]),
    (["answer", "first"], ["answer", "first"]),
    (["file+ping", "edit", "final", "first", "answer"],
     ["first", "answer", "final", "file", "ping", "edit"]),
]


@pytest.mark.parametrize(("waiting", "order"), SEND_ORDER,
                         ids=[" then ".join(w) for w, _ in SEND_ORDER])
async def test_answers_go_first_then_final_states_then_pings_files_and_edits(
        store, waiting, order):
    sched, sender, clock = await with_no_budget_left(store, waiting)
    for kind in waiting:
        ask(sched, clock, kind)
    await drain(sched, clock, clock.now + 100, step=0.1)
    assert [kind_of(content) for _, _, content in sender.sent] == order


ANSWER_LATENCY = [  # budget, what answers the command, progress interval → at most (s)
    ("available", "answer", 0.5, 0.0),
    ("available", "first", 0.5, 0.5),  # a !build's first message waits one interval...
    ("available", "first", 10.0, 0.5),  # ...but never over half a second
    ("at the reserve", "answer", 0.5, 0.0),  # answers spend the final edits' reserve
    ("spent on a failed job", "answer", 0.5, 5.0),  # one refill, ahead of its ping and file
    ("spent on a failed job", "first", 0.5, 5.0),
]


@pytest.mark.parametrize(("budget", "kind", "interval", "most"), ANSWER_LATENCY,
                         ids=[f"{k} with budget {b}, interval {i}s"
                              for b, k, i, _ in ANSWER_LATENCY])
async def test_a_command_is_answered_within_a_second_or_the_next_refill(
        store, budget, kind, interval, most):
    if budget == "spent on a failed job":
        sched, sender, clock = await with_no_budget_left(store, ["file+ping"])
    else:
        sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=interval)
        if budget == "at the reserve":
            for number in range(1, 4):  # three live jobs, busy
                sched.track("!room", "@a:x", f"$c{number}", state(clock, job_id=f"j{number}"))
            await drain(sched, clock, clock.now + 0.5)
            while sched.bucket.available() >= 1 + sched._reserve():
                sched.update(state(clock, current=clock.now % 10, job_id="j1"))
                await drain(sched, clock, clock.now + 0.5)
            sender.sent.clear()
    sched.interval_s = interval
    asked = clock.now + 0.1
    ask(sched, clock, kind)
    await drain(sched, clock, clock.now + 20, step=0.01)
    [answered] = [at for at, _, content in sender.sent if kind_of(content) == kind]
    assert answered - asked <= most + 0.011


async def test_a_run_of_answers_delays_final_states_but_never_drops_them(store):
    """Many answers in a row spend the reserve; final states still all go, and before the
    pings, files and edits that wait with them."""
    sched, sender, clock = await with_no_budget_left(store, ["final", "edit", "file+ping"])
    for _ in range(5):
        ask(sched, clock, "answer")
    ask(sched, clock, "final")
    ask(sched, clock, "edit")
    await drain(sched, clock, clock.now + 200, step=0.1)
    assert [kind_of(c) for _, _, c in sender.sent] == [
        "answer"] * 5 + ["final", "file", "ping", "edit"]
    assert sched.backlog == 0


# -- the scheduler's own decisions at debug level (#18, part 6) ------------------------------

async def step(sched):
    """One turn of `run`: a send, or the wait it explains."""
    if not await sched.send_next():
        sched._next_wake(explain=True)


def told(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "matrixjobs.matrix.edits"
             and r.levelname == "DEBUG"]
    assert all("\n" not in line for line in lines), "one line each"
    return lines


async def paused_after_a_failed_send(store):
    sched, sender, clock = scheduler(store, rate=0)
    sender.fail_with = [SendFailedError("connection reset")]
    sched.reply("!room", "$ask", render_error("x"))
    await step(sched)
    await step(sched)
    return sched, clock


async def limited_by_a_429(store):
    sched, sender, clock = scheduler(store, rate=0.2)
    sender.fail_with = [RateLimitedError(3.0)]
    sched.reply("!room", "$ask", render_error("x"))
    await step(sched)
    await step(sched)
    return sched, clock


async def out_of_budget(store):
    sched, _sender, clock = await with_no_budget_left(store, ["file+ping"])
    sched.reply("!room", "$ask", render_error("x"))
    await step(sched)
    clock.now += 5
    await step(sched)
    return sched, clock


async def held_by_the_reserve(store):
    sched, _sender, clock = scheduler(store, rate=0.2, burst=3)
    sched.track("!room", "@a:x", "$cmd-j1", state(clock, job_id="j1"))
    clock.now += 0.5
    await step(sched)
    sched.notify("!room", "$cmd0", render_error("x"), mentions=["@a:x"])
    await step(sched)
    return sched, clock


async def a_first_message_held(store):
    sched, _sender, clock = scheduler(store, rate=0.2, interval=0.5)
    sched.track("!room", "@a:x", "$cmd-j1", state(clock, job_id="j1"))
    await step(sched)
    clock.now += 0.5
    await step(sched)
    return sched, clock


async def edits_spaced(store):
    sched, _sender, clock = scheduler(store, rate=0, interval=0.5)
    sched.track("!room", "@a:x", "$cmd-j1", state(clock, job_id="j1"))
    clock.now += 0.5
    await step(sched)
    sched.update(state(clock, current=3))
    await step(sched)
    sched.update(state(clock, Status.COMPLETED, current=10))
    await step(sched)
    return sched, clock


N = r"[0-9]+\.[0-9]+"  # how long, how many: whatever the scene made them
DEBUG_LINES = [  # a scene → a line it leaves in the debug log
    (paused_after_a_failed_send, "every send waits 1.00s: paused after a failed send"),
    (limited_by_a_429, "429 for the answer to $ask: no sends for 3.0s, then one"),
    (limited_by_a_429, "the answer to $ask waits 3.00s: 429: the homeserver asked for 3.0s "
                       "without sends"),
    (out_of_budget, f"the answer to $ask waits {N}s: budget: {N} of 1 sends, refilled at 0.2/s"),
    (out_of_budget, "sent the answer to $ask 5.00s after it was asked for"),
    (held_by_the_reserve, f"the ping to $cmd0 waits {N}s: reserve: {N} sends in budget, 1 kept "
                          "for live messages' final edits"),
    (a_first_message_held, "j1's first message waits 0.50s: interval: a first message waits for "
                           "its job to move on"),
    (a_first_message_held, "sent j1's first message 0.50s after it was asked for"),
    (edits_spaced, "j1's edit waits 0.50s: interval: edits of a message go 0.5s apart"),
    (edits_spaced, "sent j1's final state 0.00s after it was known"),
]


@pytest.mark.parametrize(("scene", "line"), DEBUG_LINES,
                         ids=[line.replace(N, "N") for _, line in DEBUG_LINES])
async def test_debug_lines_say_why_a_send_waits_and_for_how_long(store, caplog, scene, line):
    caplog.set_level(logging.DEBUG, logger="matrixjobs.matrix.edits")
    await scene(store)
    pattern = re.compile("matrix: " + re.escape(line).replace(re.escape(N), N))
    assert [told for told in told(caplog) if pattern.fullmatch(told)], told(caplog)


async def test_a_wait_is_told_once_however_often_the_scheduler_wakes(store, caplog):
    caplog.set_level(logging.DEBUG, logger="matrixjobs.matrix.edits")
    sched, _sender, clock = await with_no_budget_left(store, ["edit"])
    for n in range(20):  # busy progress wakes the loop, which has no budget to edit with
        sched.update(state(clock, current=n % 10, job_id="j3"))
        clock.now += 0.1
        await step(sched)
    [waits] = [line for line in told(caplog) if "waits" in line]
    assert re.fullmatch(f"matrix: j3's edit waits {N}s: budget: {N} of 2 sends, refilled at "
                        "0.2/s", waits)
